"""The arithmetic of a batch size: accumulation plans, scaled learning rates, steps per epoch.

Pure arithmetic: nothing here touches a model or a device. :mod:`maxbatch.stats.advise` puts it
together into the advice.
"""

from __future__ import annotations

import math

from maxbatch.answers import AccumulationPlan, LearningRates
from maxbatch.errors import ConfigError
from maxbatch.grid import positive_int, positive_number


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
    return AccumulationPlan(
        global_batch=g,
        micro_batch=micro,
        accumulation_steps=steps,
        effective_batch=micro * steps,
        exact=micro * steps == g,
        note=note,
    )


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
        base_lr=float(base_lr),
        base_batch=base_batch,
        batch=new_batch,
        linear=base_lr * ratio,
        square_root=base_lr * math.sqrt(ratio),
    )
