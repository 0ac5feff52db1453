"""What follows from a batch size: gradient accumulation, learning-rate scaling, epoch length.

Pure arithmetic: nothing here touches a model or a device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from maxbatch.errors import ConfigError
from maxbatch.grid import positive_int, positive_number
from maxbatch.results import BatchSizeResult


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
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


def iterations_per_epoch(dataset_size: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Steps in one pass over ``dataset_size`` samples (a last partial batch counts unless dropped).

    Returns:
        The optimizer steps per epoch.

    Raises:
        ConfigError: a size is not a positive integer.
    """
    n, b = positive_int(dataset_size, "dataset_size"), positive_int(batch_size, "batch_size")
    return n // b if drop_last else -(-n // b)


def accumulation_plan(global_batch: int, ceiling: int, pick: int | None = None) -> AccumulationPlan:
    """Split ``global_batch`` into equal micro-batches of at most ``ceiling`` samples.

    The micro-batch is the exact divisor of ``global_batch`` nearest (on a log scale, the larger
    on a tie) to ``pick``, the size picked for throughput, or to ``ceiling`` without one. When
    that divisor is more than 2x away (a prime global batch, say), it takes the micro-batch
    nearest the target instead, and states the difference and the exact alternative.

    Args:
        global_batch: samples per optimizer step wanted.
        ceiling: the largest micro-batch that fits.
        pick: the batch size picked for throughput.

    Returns:
        The plan: micro-batch, accumulation steps, effective batch, and a note.

    Raises:
        ConfigError: a size is not a positive integer, or ``pick`` is above ``ceiling``.
    """
    g, c = positive_int(global_batch, "global_batch"), positive_int(ceiling, "ceiling")
    if pick is not None and positive_int(pick, "pick") > c:
        raise ConfigError(f"pick={pick} is larger than the ceiling {c}")
    target = c if pick is None else pick
    divisors = {d for i in range(1, math.isqrt(g) + 1) if g % i == 0 for d in (i, g // i)}
    exact = min((d for d in divisors if d <= c), key=lambda d: (abs(math.log(d / target)), -d))
    if abs(math.log(exact / target)) <= math.log(2):
        steps, micro = g // exact, exact
    else:
        steps = max(-(-g // c), round(g / target))
        micro = min(c, round(g / steps))
    note = _plan_note(g, micro, steps, exact)
    if pick is not None and micro < pick:
        note += (
            f"; the global batch is below the picked {pick}, so expect lower throughput"
            if steps == 1
            else f"; the micro-batch is below the picked {pick}, so expect lower throughput"
        )
    if pick is not None and steps > 1 and g <= c:
        note += f"; {g} also fits in one step, but {pick} is the size picked for throughput"
    return AccumulationPlan(g, micro, steps, micro * steps, micro * steps == g, note)


def _plan_note(g: int, micro: int, steps: int, exact: int) -> str:
    """The plan in words: one step, exact accumulation, or the nearest with the difference."""
    if steps == 1 and micro == g:
        return f"1 step of {g} samples: no accumulation is needed"
    if steps * micro == g:
        return f"{steps} accumulation steps of {micro} samples make exactly {g}"
    many = g // exact
    return (
        f"{steps} accumulation step{'s' if steps > 1 else ''} of {micro} samples make "
        f"{steps * micro} ({steps * micro - g:+d} against {g}); exactly {g} takes {many} "
        f"step{'s' if many > 1 else ''} of {exact}"
    )


def scale_lr(base_lr: float, base_batch: int, new_batch: int) -> LearningRates:
    """Scale a learning rate tuned at ``base_batch`` to ``new_batch``: linear and square root.

    Returns:
        The linear and square-root scaled learning rates.

    Raises:
        ConfigError: ``base_lr`` is not a positive number or a batch is not a positive integer.
    """
    positive_number(base_lr, "base_lr")
    ratio = positive_int(new_batch, "new_batch") / positive_int(base_batch, "base_batch")
    return LearningRates(
        float(base_lr), base_batch, new_batch, base_lr * ratio, base_lr * math.sqrt(ratio)
    )


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
        crit = positive_int(critical_batch, "critical_batch")
        if global_batch is None:
            global_batch = crit if crit < b else round(crit / b) * b
            target = min(b, global_batch)  # below the pick: one micro-batch of it
            notes.append(
                f"suggested global batch {global_batch}, near the critical batch {crit}: larger "
                "batches buy little progress per step, smaller ones take needlessly many steps"
                + (
                    f"; the pick {b} is above it: its extra samples per step buy little, and "
                    "the critical batch grows as training proceeds"
                    if crit < b
                    else ""
                )
            )
        else:
            notes.append(
                f"the global batch {global_batch} is {global_batch / crit:.2g}x the critical "
                f"batch {crit}"
            )
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
    return Advice(b, c, effective, iterations, plan, rates, tuple(notes), critical_batch)


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


def per_rank(global_batch: int | None, world_size: int) -> int | None:
    """The part of ``global_batch`` (over all ranks) that each of ``world_size`` ranks takes.

    Returns:
        Each rank's share, or None without a global batch.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of ``world_size``.
    """
    if global_batch is None:
        return None
    if global_batch % world_size:
        raise ConfigError(
            f"global_batch={global_batch} is not a multiple of the {world_size} ranks"
        )
    return global_batch // world_size


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
    puts the same advice, as plain data, in its result's ``advice``. Under ``torch.distributed``
    ``global_batch`` is over all the result's ranks; each rank's share is planned.

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
