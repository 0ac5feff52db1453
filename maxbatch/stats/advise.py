"""What follows from a batch size: gradient accumulation, learning-rate scaling, epoch length.

Pure arithmetic: nothing here touches a model or a device.
"""

from __future__ import annotations

import dataclasses

from maxbatch.answers import AccumulationPlan, Advice, LearningRates
from maxbatch.errors import ConfigError
from maxbatch.grid import positive_int
from maxbatch.results import BatchSizeResult
from maxbatch.stats.plans import accumulation_plan, iterations_per_epoch, scale_lr

__all__ = [
    "AccumulationPlan",
    "Advice",
    "LearningRates",
    "accumulation_plan",
    "advice_for",
    "advise",
    "check_even_split",
    "iterations_per_epoch",
    "per_rank",
    "scale_lr",
]


def advise(
    batch_size: int,
    ceiling: int,
    *,
    dataset_size: int | None = None,
    global_batch: int | None = None,
    base_batch: int | None = None,
    base_lr: float | None = None,
    critical_batch: int | None = None,
    accumulation_ceiling: int | None = None,
) -> Advice:
    """Everything that follows from ``batch_size``: accumulation, learning rates, epoch length.

    Args:
        batch_size: the picked batch size.
        ceiling: the largest batch size that fits.
        dataset_size: samples in the training set, for the steps per epoch.
        global_batch: the batch per optimizer step wanted (e.g. a paper's), reached by gradient
            accumulation when it is above the ceiling.
        base_batch: the batch size ``base_lr`` was tuned at.
        base_lr: a tuned learning rate, scaled to the effective batch.
        critical_batch: the critical batch estimate (:func:`maxbatch.noise_scale`); without a
            ``global_batch``, the global batch suggested is near it (a multiple of
            ``batch_size`` above it, itself below), and the rest of the advice follows from it.
        accumulation_ceiling: the largest micro-batch when accumulating (one more gradient per
            parameter is alive); a plan of more than one micro-batch stays at or below it.

    Returns:
        The :class:`Advice`.

    Raises:
        ConfigError: a value is invalid, or only one of ``base_batch`` and ``base_lr`` is given.
    """
    b, c = positive_int(batch_size, "batch_size"), positive_int(ceiling, "ceiling")
    if b > c:
        raise ConfigError(f"batch_size={b} is larger than the ceiling {c}")
    if (base_batch is None) != (base_lr is None):
        missing = "base_lr" if base_lr is None else "base_batch"
        raise ConfigError(f"scaling a learning rate needs base_batch and base_lr; give {missing}")
    notes: list[str] = []
    target = b
    if critical_batch is not None:
        global_batch, target, note = _near_critical(critical_batch, global_batch, b)
        notes.append(note)
    plan = None if global_batch is None else accumulation_plan(global_batch, c, target)
    if plan is not None and plan.accumulation_steps > 1 and accumulation_ceiling is not None:
        plan = _within_accumulation(plan, c, target, accumulation_ceiling)
    effective = b if plan is None else plan.effective_batch
    if plan is not None:
        notes.append(plan.note)
    iterations = None
    if dataset_size is not None:
        iterations = iterations_per_epoch(dataset_size, effective)
        partial = dataset_size % effective
        notes.append(
            f"an epoch of {dataset_size} samples is {iterations} optimizer steps of {effective}"
            + (f" (the last one {partial} samples)" if partial else "")
        )
    rates = None
    if base_batch is not None and base_lr is not None:
        rates = scale_lr(base_lr, base_batch, effective)
        notes.append(
            f"learning rate for batch {effective} (tuned {base_lr:g} at {base_batch}): "
            f"{rates.linear:.3g} linear (SGD), {rates.square_root:.3g} square root (Adam family)"
        )
    return Advice(
        batch_size=b,
        ceiling=c,
        effective_batch=effective,
        iterations_per_epoch=iterations,
        accumulation=plan,
        learning_rates=rates,
        notes=tuple(notes),
        critical_batch=critical_batch,
    )


def _near_critical(
    critical_batch: int, global_batch: int | None, pick: int
) -> tuple[int, int, str]:
    """The global batch near the critical batch (unless one was asked for), and why.

    Returns:
        ``(global_batch, target micro-batch, note)``.
    """
    crit, b = positive_int(critical_batch, "critical_batch"), pick
    if global_batch is not None:
        note = (
            f"the global batch {global_batch} is {global_batch / crit:.2g}x the critical "
            f"batch {crit}"
        )
        return global_batch, b, note
    suggested = crit if crit < b else round(crit / b) * b
    note = (
        f"suggested global batch {suggested}, near the critical batch {crit}: larger "
        "batches buy little progress per step, smaller ones take needlessly many steps"
        + (
            f"; the pick {b} is above it: its extra samples per step buy little, and "
            "the critical batch grows as training proceeds"
            if crit < b
            else ""
        )
    )
    return suggested, min(b, suggested), note


def _within_accumulation(
    plan: AccumulationPlan, ceiling: int, target: int, micro_ceiling: int
) -> AccumulationPlan:
    """The plan again under the micro-batch ceiling when accumulating, if it is above it.

    Returns:
        The plan (the same one when its micro-batch fits while accumulating).
    """
    if plan.micro_batch <= micro_ceiling:
        return plan
    a = positive_int(micro_ceiling, "accumulation_ceiling")
    again = accumulation_plan(plan.global_batch, a, min(target, a))
    why = (
        f"; accumulating keeps a second gradient per parameter alive, so the largest "
        f"micro-batch is {a}, not the ceiling {ceiling}"
    )
    return dataclasses.replace(again, note=again.note + why)


def check_even_split(global_batch: int | None, world_size: int) -> None:
    """Check that ``global_batch`` (over all ranks) splits evenly over ``world_size`` ranks.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of ``world_size``.
    """
    if global_batch is not None and global_batch % world_size:
        raise ConfigError(
            f"global_batch={global_batch} is not a multiple of the {world_size} ranks"
        )


def per_rank(global_batch: int | None, world_size: int) -> int | None:
    """The part of ``global_batch`` (over all ranks) that each of ``world_size`` ranks takes.

    Returns:
        Each rank's share, or None without a global batch.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of ``world_size``
            (:func:`check_even_split`).
    """
    check_even_split(global_batch, world_size)
    return None if global_batch is None else global_batch // world_size


def advice_for(
    result: BatchSizeResult,
    *,
    dataset_size: int | None = None,
    global_batch: int | None = None,
    base_batch: int | None = None,
    base_lr: float | None = None,
    critical_batch: int | None = None,
) -> Advice:
    """The advice for a result of :func:`~maxbatch.find_batch_size`: :func:`advise` at its pick.

    ``find_batch_size(..., dataset_size=..., global_batch=..., base_batch=..., base_lr=...)``
    puts the same advice (an :class:`Advice` record) in its result's ``advice``. Under
    ``torch.distributed`` ``global_batch`` is over all the result's ranks; each rank's share is
    planned.

    Args:
        result: a probe's result (its pick and its ceiling).
        dataset_size: samples in the training set, for the steps per epoch.
        global_batch: the batch per optimizer step wanted, over all ranks.
        base_batch: the batch size ``base_lr`` was tuned at.
        base_lr: a tuned learning rate, scaled to the effective batch.
        critical_batch: the critical batch (the noise scale), over all ranks; without a
            ``global_batch``, the suggested global batch is near it.

    Returns:
        The :class:`Advice`.

    Raises:
        ConfigError: a value is invalid, only one of ``base_batch`` and ``base_lr`` is given, or
            ``global_batch`` is not a multiple of the ranks.
    """
    return advise(
        result.batch_size,
        result.ceiling,
        accumulation_ceiling=result.micro_ceiling(),
        dataset_size=dataset_size,
        global_batch=per_rank(global_batch, result.world_size),
        base_batch=base_batch,
        base_lr=base_lr,
        critical_batch=None
        if critical_batch is None
        else max(1, critical_batch // result.world_size),
    )
