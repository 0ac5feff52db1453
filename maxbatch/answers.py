"""What follows from an answer, as plain frozen records: the advice, the noise scale, the data scan.

The result of :func:`~maxbatch.find_batch_size` nests them (:mod:`maxbatch.results`); the stages
that make them (:mod:`maxbatch.stats.advise`, :mod:`maxbatch.stats.noise`,
:mod:`maxbatch.step.data`) live above and re-export them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class AccumulationPlan:
    """Micro-batches that add up to a global batch.

    Attributes:
        global_batch: the global batch asked for.
        micro_batch: samples per forward/backward (at most the ceiling).
        accumulation_steps: micro-batches per optimizer step.
        effective_batch: ``micro_batch * accumulation_steps``.
        exact: True when ``effective_batch == global_batch``.
        note: the plan in words, with the difference when it is not exact.
    """

    global_batch: int
    micro_batch: int
    accumulation_steps: int
    effective_batch: int
    exact: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearningRates:
    """A learning rate tuned at ``base_batch``, scaled to ``batch``.

    Attributes:
        base_lr: the tuned learning rate.
        base_batch: the batch size it was tuned at.
        batch: the batch size to scale to.
        linear: ``base_lr * batch / base_batch``: the linear scaling rule for SGD (Goyal et al.,
            2017, "Accurate, Large Minibatch SGD"), usually with a warm-up.
        square_root: ``base_lr * sqrt(batch / base_batch)``: the square-root rule for Adam-family
            optimizers (Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive
            Gradient Algorithms").
    """

    base_lr: float
    base_batch: int
    batch: int
    linear: float
    square_root: float

    def to_dict(self) -> dict[str, Any]:
        """Return the values as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Advice:
    """What follows from the picked batch size.

    Attributes:
        batch_size: the batch size per step (the pick).
        ceiling: the largest batch size that fits.
        effective_batch: samples per optimizer step (the accumulation plan's, else
            ``batch_size``).
        iterations_per_epoch: optimizer steps per epoch, when the dataset size is known.
        accumulation: the plan for a global batch, when one was asked for.
        learning_rates: the scaled learning rates, when a base was given.
        notes: the advice in words.
        critical_batch: the critical batch estimate (the noise scale), when it was measured.
    """

    batch_size: int
    ceiling: int
    effective_batch: int
    iterations_per_epoch: int | None = None
    accumulation: AccumulationPlan | None = None
    learning_rates: LearningRates | None = None
    notes: tuple[str, ...] = ()
    critical_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the advice as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoiseScale:
    """The simple noise scale and the two estimates it is the ratio of.

    Attributes:
        b_simple: ``trace_cov / grad_sq_norm``, the critical batch size estimate: ``inf`` when
            the gradient could not be told from noise (``grad_sq_norm <= 0``).
        std_error: its standard error, by the delta method over the draws (or, for the
            tracker, over the effective number of steps in its moving average).
        trace_cov: ``tr(Σ)``, the trace of the per-sample gradient covariance.
        grad_sq_norm: ``|G|²``, the squared norm of the true gradient.
        b_small: the small batch size (one micro-batch).
        b_big: the big batch size (all micro-batches of a draw).
        draws: draws averaged (optimizer steps, for the tracker).
        method: how ``std_error`` was computed.
        notes: what the user should know about this estimate.
        data_rows: the samples the draws came from when fewer than one draw (``b_big``): the
            estimate is the noise of those samples only, not of the data; None otherwise.
    """

    b_simple: float
    std_error: float
    trace_cov: float
    grad_sq_norm: float
    b_small: int
    b_big: int
    draws: int
    method: str = "delta method over draws"
    notes: tuple[str, ...] = ()
    data_rows: int | None = None

    @property
    def critical_batch(self) -> int | None:
        """``b_simple`` rounded: the batch size beyond which more samples per step help little.

        None when ``b_simple`` is not finite.
        """
        return max(1, round(self.b_simple)) if math.isfinite(self.b_simple) else None

    def to_dict(self) -> dict[str, Any]:
        """Return the estimate as a JSON-ready dict (non-finite numbers become None)."""
        data = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in dataclasses.asdict(self).items()
        }
        data["critical_batch"] = self.critical_batch
        return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataScan:
    """What the scan of a data set found, and the worst-case batch at one batch size.

    Attributes:
        items: items in the data set (or the loader's sampler).
        scanned: items whose size was read.
        sampled: True when fewer than all were read (``scan_limit``): the worst case is a sample's.
        seconds: wall time of the scan.
        size_of: how sizes were read: ``"elements"`` or ``"size_fn"``.
        bucket: the batch sampler's largest bucket (indices), or None without one.
        batch_size: the batch size the worst-case batch below is for.
        indices: the items of that batch, largest first (at most 16 listed).
        sizes: their sizes.
    """

    items: int
    scanned: int
    sampled: bool
    seconds: float
    size_of: str
    bucket: tuple[int, ...] | None
    batch_size: int
    indices: tuple[int, ...]
    sizes: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the scan as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @property
    def note(self) -> str:
        """One line for the report: where the worst case came from."""
        what = "largest bucket" if self.bucket is not None else "largest items"
        listed = ", ".join(f"#{i} ({s})" for i, s in zip(self.indices, self.sizes, strict=True))
        more = " ..." if self.batch_size > len(self.indices) else ""
        line = (
            f"worst case from the data: batch {self.batch_size} from the {what}: {listed}{more}; "
            f"{self.scanned} of {self.items} items read in {self.seconds:.2f} s"
        )
        if self.sampled:
            line += " (a random sample: raise scan_limit to read them all)"
        return line
