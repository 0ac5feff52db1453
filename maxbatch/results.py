"""The answer of :func:`~maxbatch.find_batch_size`: a frozen record that nests its stages' records.

``BatchSizeResult`` holds the pick and, one record per stage, what each stage found: the capacity
(:class:`CapacityAnswer`), the ceiling search (:class:`SearchAnswer`), the profiler
(:class:`ProfileAnswer`), the advice, the noise scale and the data scan
(:mod:`maxbatch.answers`). ``to_dict()`` and ``from_dict()`` keep the flat JSON keys users parse;
the flat names read as attributes too (``result.ceiling``, ``result.trials``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from maxbatch.answers import AccumulationPlan, Advice, DataScan, LearningRates, NoiseScale
from maxbatch.estimated import Breakdown, CapacityEstimate, Estimate
from maxbatch.measured import (
    DeviceInfo,
    MemoryModel,
    MemoryPoint,
    Skipped,
    Throughput,
    Trial,
    predicted_ceiling,
)
from maxbatch.resultparts import (
    CachedSearch,
    CapacityAnswer,
    FlatNames,
    ProfileAnswer,
    SearchAnswer,
)

__all__ = [
    "FLAT_KEYS",
    "UNTIMED_REASON",
    "AccumulationPlan",
    "Advice",
    "BatchSizeResult",
    "Breakdown",
    "CachedSearch",
    "CapacityAnswer",
    "CapacityEstimate",
    "DataScan",
    "DeviceInfo",
    "Estimate",
    "LearningRates",
    "MemoryModel",
    "MemoryPoint",
    "NoiseScale",
    "ProfileAnswer",
    "SearchAnswer",
    "Skipped",
    "Throughput",
    "Trial",
    "predicted_ceiling",
]

# The pick reason when nothing was timed, in the words of both entries (the CLI's flag, the
# library's argument): users of either read the same ``pick_reason``.
UNTIMED_REASON = "the ceiling: timing was off (--no-profile, profile=False)"

# The stage records' fields in the flat dict (its JSON keys): under their own names or these.
FLAT_KEYS: dict[str, dict[str, str]] = {
    "capacity": {},
    "search": {},
    "profile": {
        "stop_reason": "profile_stop_reason",
        "skipped": "profile_skipped",
        "confidence": "pick_confidence",
        "confidence_reason": "pick_confidence_reason",
        "seconds": "profile_seconds",
        "budget_seconds": "profile_budget_seconds",
    },
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchSizeResult(FlatNames):
    """What :func:`maxbatch.find_batch_size` returns.

    Attributes:
        batch_size: the recommended batch size (the pick).
        pick_reason: why ``batch_size`` was picked.
        device: the device probed, e.g. ``"cuda:0"`` or ``"cpu"``.
        device_name: a readable device name.
        mode: ``"train"`` or ``"inference"``.
        precision: autocast precision or None.
        optimizer: the optimizer class used in the step, or None.
        capacity: the bytes the probe could use (:class:`CapacityAnswer`).
        search: what the ceiling search found (:class:`SearchAnswer`): the ceiling, the trials,
            the memory model.
        profile: what the profiler timed and how sure the pick is (:class:`ProfileAnswer`).
        advice: what follows from the pick (accumulation plan, learning rates, epoch length),
            or None when no input for it was given.
        noise_scale: the gradient noise scale when it was asked for, else None.
        data: the scan of the data set the batches came from (with the worst-case batch at the
            ceiling), or None for a sample or ``make_batch``.
        notes: things the user should know (defaults taken, budget hit).
        seconds: total wall time.
        world_size: the ranks that probed together under ``torch.distributed`` (1: alone).
        from_cache: True when the answer came from the result cache (:mod:`maxbatch.store.cache`):
            the notes say how it was checked.
        cached_search: for an answer from the result cache, the search that found it, apart
            from this run's (:class:`CachedSearch`: ``key``, the entry's; ``trials``, the stored
            search's, with their timings of then; ``seconds``, its wall time then); else None.
            On a cache hit ``trials`` are the ones this run ran (the check: the ceiling and the
            size above; none with ``trust_cache``), ``seconds`` this run's time.
    """

    batch_size: int
    pick_reason: str
    device: str
    device_name: str
    mode: str
    precision: str | None
    optimizer: str | None
    capacity: CapacityAnswer
    search: SearchAnswer
    profile: ProfileAnswer = dataclasses.field(default_factory=ProfileAnswer)
    advice: Advice | None = None
    noise_scale: NoiseScale | None = None
    data: DataScan | None = None
    seconds: float
    notes: tuple[str, ...] = ()
    world_size: int = 1
    from_cache: bool = False
    cached_search: CachedSearch | None = None

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step: the advice's plan's, else 1."""
        plan = None if self.advice is None else self.advice.accumulation
        return 1 if plan is None else plan.accumulation_steps

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all ranks: ``micro-batch × world_size × steps``.

        The micro-batch is the advice's plan's when there is one, else ``batch_size``.
        """
        plan = None if self.advice is None else self.advice.accumulation
        micro = self.batch_size if plan is None else plan.micro_batch
        return micro * self.world_size * self.accumulation_steps

    def micro_ceiling(self) -> int:
        """The largest micro-batch for a plan that accumulates.

        Returns:
            Measured where accumulating trials ran, else predicted by the memory model's extra
            term (at most the ceiling).
        """
        if self.accumulation_ceiling is not None:
            return self.accumulation_ceiling
        return predicted_ceiling(self.memory_model, self.usable_bytes, self.ceiling)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict: flat, under the keys users parse."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in FLAT_KEYS:
                names = FLAT_KEYS[f.name]
                data.update({names.get(k, k): v for k, v in dataclasses.asdict(value).items()})
            else:
                data[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        data["accumulation_steps"] = self.accumulation_steps
        data["global_batch_size"] = self.global_batch_size
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchSizeResult:
        """The result back from its :meth:`to_dict` (a saved report, a cache entry).

        Returns:
            The result.

        Raises:
            KeyError, TypeError: ``data`` is not a result's dict.
        """
        parts: dict[str, Any] = {
            "capacity": CapacityAnswer.from_dict(_part(data, "capacity")),
            "search": SearchAnswer.from_dict(_part(data, "search")),
            "profile": ProfileAnswer.from_dict(_part(data, "profile")),
        }
        advice, noise, scan = data.get("advice"), data.get("noise_scale"), data.get("data")
        names = {f.name for f in dataclasses.fields(cls)} - {
            *parts,
            "advice",
            "noise_scale",
            "data",
        }
        own: dict[str, Any] = {k: v for k, v in data.items() if k in names}
        own["notes"] = tuple(own.get("notes", ()))
        stored = own.pop("cached_search", None)
        return cls(
            **own,
            **parts,
            advice=None if advice is None else _advice(advice),
            noise_scale=None if noise is None else _noise(noise),
            data=None if scan is None else _scan(scan),
            cached_search=None if stored is None else CachedSearch.from_dict(stored),
        )


def _part(data: Mapping[str, Any], part: str) -> dict[str, Any]:
    """The flat keys of one stage record, under the record's own field names."""
    names = FLAT_KEYS[part]
    record = {"capacity": CapacityAnswer, "search": SearchAnswer, "profile": ProfileAnswer}[part]
    out = {}
    for f in dataclasses.fields(record):
        key = names.get(f.name, f.name)
        if key in data:
            out[f.name] = data[key]
    return out


def _advice(d: Mapping[str, Any]) -> Advice:
    plan, rates = d.get("accumulation"), d.get("learning_rates")
    return Advice(
        **{k: v for k, v in d.items() if k not in ("accumulation", "learning_rates", "notes")},
        accumulation=None if plan is None else AccumulationPlan(**plan),
        learning_rates=None if rates is None else LearningRates(**rates),
        notes=tuple(d.get("notes", ())),
    )


def _noise(d: Mapping[str, Any]) -> NoiseScale:
    names = {f.name for f in dataclasses.fields(NoiseScale)}
    kept: dict[str, Any] = {
        k: _NOT_FINITE[k] if v is None and k in _NOT_FINITE else v
        for k, v in d.items()
        if k in names
    }
    kept["notes"] = tuple(kept.get("notes", ()))
    return NoiseScale(**kept)


# ``to_dict`` writes a non-finite number as None: the ratio and its error are infinite when the
# gradient is not above its noise, the estimates themselves are finite (read back as NaN if not).
_NOT_FINITE = {
    "b_simple": math.inf,
    "std_error": math.inf,
    "trace_cov": math.nan,
    "grad_sq_norm": math.nan,
}


def _scan(d: Mapping[str, Any]) -> DataScan:
    bucket = d.get("bucket")
    return DataScan(
        **{k: v for k, v in d.items() if k not in ("bucket", "indices", "sizes")},
        bucket=None if bucket is None else tuple(bucket),
        indices=tuple(d["indices"]),
        sizes=tuple(d["sizes"]),
    )
