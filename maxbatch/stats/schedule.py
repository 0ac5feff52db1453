"""``batch_schedule``: a learning-rate decay turned into the equivalent batch-size ramp.

SGD's noise scale is about ``lr * N / B`` (Smith et al. 2017, "Don't Decay the Learning Rate,
Increase the Batch Size"): dividing the learning rate by ``f`` or multiplying the batch by ``f``
give the same noise, and the larger batch takes ``f`` times fewer steps. Where the LR falls below
its peak, the batch grows by the same factor instead (up to ``max_batch``, after which the LR
decays for the rest); batches above the memory ceiling are reached by gradient accumulation.
Pure arithmetic: nothing here touches a model or a device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from maxbatch.errors import ConfigError
from maxbatch.grid import positive_int
from maxbatch.stats.advise import accumulation_plan

LrSchedule = Sequence[tuple[int, float]] | Callable[[int], float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulePhase:
    """One phase of a batch-size schedule, from ``at`` until the next phase starts.

    Attributes:
        at: the epoch (or optimizer step of this schedule, for ``unit="step"``) it starts at.
        micro_batch: samples per forward/backward (at most the ceiling).
        accumulation: micro-batches per optimizer step.
        lr: the learning rate: ``lr / global_batch`` equals the original schedule's
            ``lr / base_batch`` at the same point.
        global_batch: ``micro_batch * accumulation``, samples per optimizer step.
    """

    at: int
    micro_batch: int
    accumulation: int
    lr: float
    global_batch: int

    def to_dict(self) -> dict[str, Any]:
        """Return the phase as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _milestones(lr_schedule: LrSchedule, until: int | None) -> list[tuple[int, float]]:
    if callable(lr_schedule):
        if until is None:
            raise ConfigError("an LR schedule given as a function needs until= (its length)")
        points = [(t, lr_schedule(t)) for t in range(positive_int(until, "until"))]
    else:
        points = [tuple(p) for p in lr_schedule]  # type: ignore[misc]
    if not points:
        raise ConfigError("the LR schedule is empty; give (epoch, lr) pairs")
    for i, (at, lr) in enumerate(points):
        if isinstance(at, bool) or not isinstance(at, int) or at < 0:
            raise ConfigError(f"the LR schedule's point {at!r} is not an epoch or step (int >= 0)")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ConfigError(f"the LR schedule's rate at {at} is {lr!r}: not a number")
        if lr <= 0:
            raise ConfigError(f"the LR schedule's rate at {at} is {lr!r}: it must be positive")
        if i and at <= points[i - 1][0]:
            raise ConfigError(
                f"the LR schedule's points must increase: {at} after {points[i - 1][0]}"
            )
    if points[0][0] != 0:
        raise ConfigError(f"the LR schedule must start at 0, not {points[0][0]}")
    return [(int(at), float(lr)) for at, lr in points]


def batch_schedule(
    lr_schedule: LrSchedule,
    *,
    base_batch: int,
    ceiling: int,
    micro_batch: int | None = None,
    max_batch: int | None = None,
    until: int | None = None,
    unit: str = "epoch",
) -> list[SchedulePhase]:
    """Turn a learning-rate schedule into the batch-size ramp with the same noise ``lr·N/B``.

    Args:
        lr_schedule: ``[(at, lr), ...]`` from ``at=0``, each rate holding until the next point
            (a step decay), or a function ``lr(at)`` evaluated at ``0 .. until-1``.
        base_batch: the batch size the schedule was tuned at.
        ceiling: the largest micro-batch that fits (the probe's ceiling).
        micro_batch: the micro-batch to prefer (the pick); default the ceiling.
        max_batch: the largest global batch wanted (e.g. the critical batch from
            :func:`maxbatch.noise_scale`, or a share of the data set); past it the learning rate
            decays instead. Default: no limit.
        until: the schedule's length, for a function.
        unit: ``"epoch"``: phases start at the same epochs (fewer steps per epoch as the batch
            grows); ``"step"``: the schedule's points are optimizer steps at ``base_batch``, and
            each phase starts at the step of this schedule where as many samples have been seen.

    Returns:
        The phases in order; consecutive points with the same plan and rate are merged.

    Raises:
        ConfigError: a value is invalid.
    """
    base = positive_int(base_batch, "base_batch")
    cap = positive_int(ceiling, "ceiling")
    prefer = cap if micro_batch is None else positive_int(micro_batch, "micro_batch")
    if prefer > cap:
        raise ConfigError(f"micro_batch={prefer} is above the ceiling {cap}")
    top = None if max_batch is None else positive_int(max_batch, "max_batch")
    if top is not None and top < base:
        raise ConfigError(f"max_batch={top} is below base_batch={base}")
    if unit not in ("epoch", "step"):
        raise ConfigError(f"unit={unit!r} is not valid; choose epoch or step")
    phases: list[SchedulePhase] = []
    peak, step, samples = 0.0, 0.0, 0
    for at, lr in _milestones(lr_schedule, until):
        peak = max(peak, lr)
        wanted = round(base * peak / lr)
        if top is not None:
            wanted = min(wanted, top)
        plan = accumulation_plan(wanted, cap, min(prefer, wanted))
        new_lr = lr * plan.effective_batch / base  # keeps lr / B as the original schedule's
        if unit == "step":
            if phases:
                step += (at * base - samples) / phases[-1].global_batch
            samples = at * base
        start = math.ceil(step - 1e-9) if unit == "step" else at
        last = phases[-1] if phases else None
        if (
            last
            and (last.micro_batch, last.accumulation)
            == (
                plan.micro_batch,
                plan.accumulation_steps,
            )
            and math.isclose(last.lr, new_lr, rel_tol=1e-12)
        ):
            continue
        phases.append(
            SchedulePhase(
                at=start,
                micro_batch=plan.micro_batch,
                accumulation=plan.accumulation_steps,
                lr=new_lr,
                global_batch=plan.effective_batch,
            )
        )
    return phases
