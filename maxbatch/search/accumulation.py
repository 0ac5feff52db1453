"""The micro-batch ceiling when accumulating: measured, not assumed.

Accumulating keeps a second gradient per parameter alive while the next micro-batch's backward
runs (the new gradient is computed, then added), so the largest micro-batch of a plan with more
than one micro-batch per optimizer step is at or below the plain ceiling. When a plan needs it,
the probe measures it with trials that accumulate two micro-batches; the memory model carries the
extra term (:attr:`~maxbatch.results.MemoryModel.accumulation_bytes`), which predicts it, so the
search starts at the prediction: one trial when the plain ceiling holds, two (the prediction and
the size above it) when it does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch

from maxbatch.grid import Grid
from maxbatch.results import MemoryModel, Trial, predicted_ceiling
from maxbatch.search.meter import Meter
from maxbatch.search.probe import search
from maxbatch.search.trial import run_trial
from maxbatch.settings import SearchSettings
from maxbatch.step.workload import Workload


@dataclasses.dataclass(frozen=True, kw_only=True)
class Accumulated:
    """The accumulating trials' answer.

    Attributes:
        ceiling: the largest micro-batch whose accumulating trial fit.
        trials: the accumulating trials.
        extra_bytes: what accumulating added to the peak at the largest size both kinds of
            trial ran, or the gradients' bytes where none ran at both.
    """

    ceiling: int
    trials: tuple[Trial, ...]
    extra_bytes: float


def accumulating_trials(workload: Workload, meter: Meter) -> Callable[[int], Trial]:
    """``run(b)``: a trial of two micro-batches per optimizer step (the loop's order kept).

    Returns:
        The trial function.
    """
    loop = workload.loop.accumulating(2)

    def run(b: int) -> Trial:
        own, workload.loop = workload.loop, loop
        try:
            return run_trial(workload, meter, b)
        finally:
            workload.loop = own

    return run


def gradient_bytes(parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of one gradient per trainable parameter: accumulation's extra term, predicted.

    Returns:
        The bytes.
    """
    return sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)


def measure(
    run: Callable[[int], Trial],
    *,
    ceiling: int,
    model: MemoryModel | None,
    usable: int,
    grid: Grid,
    extra_guess: float,
    plain: tuple[Trial, ...],
    on_trial: Callable[[Trial], None] | None = None,
) -> Accumulated:
    """Search the micro-batch ceiling with accumulating trials, from the model's prediction.

    Args:
        run: an accumulating trial at a size.
        ceiling: the plain ceiling (above it nothing fits, accumulating or not).
        model: the plain trials' memory model.
        usable: the bytes a trial may peak at.
        grid: the sizes that may be tried.
        extra_guess: the predicted extra term (the gradients' bytes).
        plain: the plain trials (for the measured extra term).
        on_trial: called with each trial.

    Returns:
        The ceiling, the trials and the extra term.

    Raises:
        DoesNotFitError: even the smallest size does not fit when accumulating.
    """
    guessed = None if model is None else dataclasses.replace(model, accumulation_bytes=extra_guess)
    start = grid.snap(predicted_ceiling(guessed, usable, ceiling))
    below = Grid(
        min_batch_size=grid.min_batch_size,
        max_batch_size=max(ceiling, grid.lower),
        multiple_of=grid.multiple_of,
    )
    outcome = search(
        run,
        start=start,
        usable_bytes=usable,
        settings=SearchSettings(grid=below, on_trial=on_trial),
    )
    peaks = {t.batch_size: t.peak_bytes for t in plain if t.fits}
    both = [t for t in outcome.trials if t.fits and t.batch_size in peaks]
    if both:
        t = max(both, key=lambda t: t.batch_size)
        extra = float(max(0, t.peak_bytes - peaks[t.batch_size]))
    elif model is not None and (fits := [t for t in outcome.trials if t.fits]):
        t = max(fits, key=lambda t: t.batch_size)
        extra = max(0.0, t.peak_bytes - model.peak(t.batch_size))
    else:
        extra = extra_guess
    return Accumulated(ceiling=outcome.ceiling, trials=outcome.trials, extra_bytes=extra)
