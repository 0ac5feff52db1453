"""Records of a memory profile over input length: buckets, their batch sizes, the 2-D memory model.

The searches that build them live in :mod:`maxbatch.run.lengths` and
:mod:`maxbatch.run.bucketsizes`; rendering lives apart. These records hold no torch objects and
each has ``to_dict()``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from maxbatch.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthMemoryModel:
    """The memory model over batch size and length.

    ``peak(b, L) = fixed_bytes + b * (bytes_per_sample + bytes_per_token * L
    + bytes_per_token_pair * L**2)``: the linear term is what grows with each token (embeddings,
    recurrent states, feed-forward activations), the quadratic one what grows with each pair of
    tokens (attention scores without a fused kernel).

    Attributes:
        fixed_bytes: bytes that do not grow with the batch (parameters, gradients, optimizer state).
        bytes_per_sample: per-sample bytes that do not grow with length.
        bytes_per_token: per-sample bytes per unit of length (the linear term).
        bytes_per_token_pair: per-sample bytes per unit of length squared (the quadratic term).
    """

    fixed_bytes: float
    bytes_per_sample: float
    bytes_per_token: float
    bytes_per_token_pair: float = 0.0

    def per_sample(self, length: int) -> float:
        """Predicted bytes one sample of ``length`` adds to the peak."""
        return (
            self.bytes_per_sample
            + self.bytes_per_token * length
            + self.bytes_per_token_pair * length * length
        )

    def peak(self, batch_size: int, length: int) -> float:
        """Predicted peak bytes of a batch of ``batch_size`` samples of ``length``."""
        return self.fixed_bytes + batch_size * self.per_sample(length)

    def max_batch_size(self, length: int, usable_bytes: int) -> int:
        """The largest batch size the model predicts fits in ``usable_bytes`` at ``length``."""
        per_sample = self.per_sample(length)
        if per_sample <= 0:
            raise ConfigError(f"the memory model predicts no growth at length {length}")
        return max(0, math.floor((usable_bytes - self.fixed_bytes) / per_sample))

    def to_dict(self) -> dict[str, Any]:
        """Return the model as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthTrial:
    """One real run of the step at one batch size and one length.

    Attributes:
        batch_size: the batch size run.
        length: the batch's length (from a data set: its longest item, the others padded).
        fits: True when the step ran within the usable memory.
        peak_bytes: peak bytes of the trial (for an OOM: the bytes live when it was raised).
        seconds: wall time of the trial.
    """

    batch_size: int
    length: int
    fits: bool
    peak_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the trial as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bucket:
    """One length bucket: the items with ``min_length <= length <= max_length``.

    Attributes:
        max_length: the bucket's upper length; its ceiling holds for every item in it.
        ceiling: the largest batch size whose step fits at ``max_length`` (verified: it fits,
            ``ceiling + 1`` does not).
        min_length: the bucket's shortest length (0 for the first bucket when no data set is known).
        pick: the fastest batch size at or below the ceiling, if the bucket was profiled.
        items: how many items of the data set fall in the bucket.
        share: ``items`` over the data set's size (0.0 when no data set is known).
        predicted_ceiling: what the memory model predicted before the trials verified it.
    """

    max_length: int
    ceiling: int
    min_length: int = 0
    pick: int | None = None
    items: int = 0
    share: float = 0.0
    predicted_ceiling: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.min_length < 0 or self.min_length > self.max_length:
            raise ConfigError(
                f"bucket lengths {self.min_length}..{self.max_length}: need "
                "0 <= min_length <= max_length and max_length >= 1"
            )
        if self.ceiling < 1:
            raise ConfigError(f"bucket up to length {self.max_length}: ceiling {self.ceiling} < 1")
        if self.pick is not None and not 1 <= self.pick <= self.ceiling:
            raise ConfigError(f"bucket pick {self.pick} is not in 1..ceiling ({self.ceiling})")

    @property
    def batch_size(self) -> int:
        """The batch size to use: the pick when the bucket was profiled, else the ceiling."""
        return self.pick if self.pick is not None else self.ceiling

    @property
    def tokens_per_batch(self) -> int:
        """``batch_size * max_length``: the tokens (length units) of a full batch of the bucket."""
        return self.batch_size * self.max_length

    def to_dict(self) -> dict[str, Any]:
        """Return the bucket as a JSON-ready dict (with ``batch_size`` and ``tokens_per_batch``)."""
        row = dataclasses.asdict(self)
        row["batch_size"] = self.batch_size
        row["tokens_per_batch"] = self.tokens_per_batch
        return row

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Bucket:
        """Rebuild a bucket from :meth:`to_dict` output (extra keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BucketProfile:
    """Batch sizes that fill memory at every length: one verified ceiling per length bucket.

    Attributes:
        buckets: the buckets, shortest first (strictly increasing ``max_length``).
        memory_model: the fitted memory model over (batch, length), if one was fitted.
        trials: every real trial run to build the profile, in order.
        seconds: wall time to build the profile.
        device: the device profiled (``"cpu"``, ``"cuda:0"``...), if known.
        usable_bytes: the memory budget the ceilings fill, if known.
        histogram: the data set's lengths as ``(low, high, count)`` bins, for the plot.
        notes: remarks on the profile, in words.
    """

    buckets: tuple[Bucket, ...]
    memory_model: LengthMemoryModel | None = None
    trials: tuple[LengthTrial, ...] = ()
    seconds: float = 0.0
    device: str | None = None
    usable_bytes: int | None = None
    histogram: tuple[tuple[int, int, int], ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.buckets:
            raise ConfigError("a bucket profile needs at least one bucket")
        uppers = [b.max_length for b in self.buckets]
        if any(a >= b for a, b in zip(uppers, uppers[1:], strict=False)):
            raise ConfigError(f"bucket upper lengths must increase strictly, got {uppers}")

    @property
    def max_length(self) -> int:
        """The longest length the profile answers for (the last bucket's upper length)."""
        return self.buckets[-1].max_length

    def bucket_for(self, length: int) -> Bucket:
        """The shortest bucket whose upper length holds ``length``.

        Returns:
            That bucket.

        Raises:
            ConfigError: ``length`` is negative or longer than the last bucket's upper length.
        """
        if length < 0:
            raise ConfigError(f"length {length} is negative")
        index = bisect.bisect_left([b.max_length for b in self.buckets], length)
        if index == len(self.buckets):
            raise ConfigError(
                f"length {length} is longer than the profile's longest bucket ({self.max_length}): "
                "no batch size was verified for it; profile with a longer last bucket or truncate"
            )
        return self.buckets[index]

    def batch_size_for(self, length: int) -> int:
        """The batch size for items up to ``length``: that of the shortest bucket holding it.

        Returns:
            The bucket's pick when it was profiled, else its verified ceiling.

        Raises:
            ConfigError: ``length`` is negative or longer than the last bucket's upper length.
        """
        return self.bucket_for(length).batch_size

    def to_lhotse(self) -> dict[str, list[int]]:
        """The profile in lhotse's and NeMo's form.

        Returns:
            ``{"bucket_duration_bins": [...], "bucket_batch_size": [...]}``: one upper length and
            one batch size per bucket, the same number of each, as NeMo's OOMptimizer writes them.
        """
        return {
            "bucket_duration_bins": [b.max_length for b in self.buckets],
            "bucket_batch_size": [b.batch_size for b in self.buckets],
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-ready dict (``buckets`` is the per-bucket table)."""
        model = self.memory_model
        return {
            "buckets": [b.to_dict() for b in self.buckets],
            "memory_model": None if model is None else model.to_dict(),
            "trials": [t.to_dict() for t in self.trials],
            "real_trials": len(self.trials),
            "seconds": self.seconds,
            "device": self.device,
            "usable_bytes": self.usable_bytes,
            "histogram": [list(row) for row in self.histogram],
            "notes": list(self.notes),
            "lhotse": self.to_lhotse(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BucketProfile:
        """Rebuild a profile from :meth:`to_dict` output."""
        model = data.get("memory_model")
        return cls(
            buckets=tuple(Bucket.from_dict(b) for b in data["buckets"]),
            memory_model=None if model is None else LengthMemoryModel(**model),
            trials=tuple(LengthTrial(**t) for t in data.get("trials", ())),
            seconds=float(data.get("seconds", 0.0)),
            device=data.get("device"),
            usable_bytes=data.get("usable_bytes"),
            histogram=tuple((int(lo), int(hi), int(n)) for lo, hi, n in data.get("histogram", ())),
            notes=tuple(data.get("notes", ())),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthResult:
    """The longest length whose real step fits at one batch size (``find_max_length``).

    Attributes:
        max_length: the longest length that fit (verified: it fits; the next length on the grid
            does not, unless ``complete`` is False; a data set's: its longest item that fits).
        batch_size: the batch size every trial ran.
        length_multiple_of: the grid of lengths tried.
        trials: every real trial, in order.
        seconds: wall time of the search.
        device: the device probed.
        usable_bytes: the bytes a trial may peak at.
        memory_model: the memory model over (batch, length) the trials fitted.
        complete: False when the search stopped at ``max_length``'s limit, or at the data
            set's longest item, not at a failure.
        notes: remarks, in words.
        longest_item: a data set's longest item (None for ``make_batch``): no batch is longer.
        longest_item_fits: whether a batch of the data set's longest items fits at ``batch_size``
            (None: not known, past ``max_length``, or ``make_batch``).
    """

    max_length: int
    batch_size: int
    length_multiple_of: int = 1
    trials: tuple[LengthTrial, ...] = ()
    seconds: float = 0.0
    device: str | None = None
    usable_bytes: int | None = None
    memory_model: LengthMemoryModel | None = None
    complete: bool = True
    notes: tuple[str, ...] = ()
    longest_item: int | None = None
    longest_item_fits: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict (``max_length`` is the answer)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        model = self.memory_model
        out.update(
            trials=[t.to_dict() for t in self.trials],
            real_trials=len(self.trials),
            memory_model=None if model is None else model.to_dict(),
            notes=list(self.notes),
        )
        return out
