"""The ceiling search: few trials, an exact and verified answer.

The search only sees a function ``run(b) -> Trial``, so it can be driven by a deterministic step in
unit tests and by real models on a device.

Strategy:

1. Run the start size (the user's own sample size). If it does not fit, halve until a size fits;
   if none does, say which size ran out of memory and which failed for another reason below it.
2. Where trials carry a trace (counting meters: the live bytes after every operator, see
   :mod:`maxbatch.memtrace`), predict the ceiling from it (one trial: the batched tensors grow;
   two: each operator's line), run the prediction, then its neighbour to verify.
3. Otherwise, or after two trace predictions missed: with one success at ``b0`` peaking at
   ``p0``, and ``base`` bytes live through every step, every byte above ``base`` is at most
   per-sample, so ``b0 + (usable - p0) / ((p0 - base) / b0)`` is a safe lower bound on the
   ceiling: jump there. With two successes, fit ``peak(b) = fixed + per_sample * b`` through the
   two largest, predict the ceiling, run the prediction, then its neighbour.
4. Where the model misses, bisect inside the bracket that is left (never a third failure in a
   row one grid step below the last while other sizes are left); without a usable model, double.

The answer ``ceiling`` always was run and fit, and ``ceiling + multiple_of`` was run and did not
(unless ``ceiling`` is the maximum allowed).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from maxbatch.errors import DoesNotFitError, WorkloadError
from maxbatch.results import MemoryModel, Trial
from maxbatch.search.bracket import Bracket, fit_memory_model
from maxbatch.settings import SearchSettings
from maxbatch.step.retry import lower_after_oom
from maxbatch.units import format_bytes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchOutcome:
    """What the search found.

    Attributes:
        ceiling: the largest size that was run and fit.
        trials: every trial, in order.
        memory_model: the model fitted from the trials, or None when fewer than two sizes fit.
        complete: False when the time budget stopped the search before the size above
            ``ceiling`` was settled.
        stop_reason: why the search ended, in words.
    """

    ceiling: int
    trials: tuple[Trial, ...]
    memory_model: MemoryModel | None
    complete: bool
    stop_reason: str


def _does_not_fit(s: Bracket, failure: WorkloadError | None = None) -> DoesNotFitError:
    """The error when nothing fits.

    It names the smallest size that ran out of memory and what it needed, and the non-memory
    failure below it (a model that rejects small batches) when there was one.

    Returns:
        The error.
    """
    t = min((t for t in s.trials if not t.fits), key=lambda t: t.batch_size)
    below = ""
    if failure is not None:
        cause = failure.__cause__
        why = str(failure) if cause is None else f"{type(cause).__name__}: {cause}"
        below = (
            f"; below it, at batch size {failure.batch_size}, the step failed for a reason "
            f"other than memory ({why}): the model may reject small batches (batch norm in "
            "training needs 2 or more)"
        )
    return DoesNotFitError(
        f"batch size {t.batch_size} does not fit: the step needs at least "
        f"{format_bytes(t.peak_bytes)} but {format_bytes(s.usable)} are usable{below}; free "
        "memory, lower the headroom, use a smaller model, shorter inputs or lower precision",
        batch_size=t.batch_size,
        needed_bytes=t.peak_bytes,
        available_bytes=s.usable,
    )


def _first_fit(s: Bracket, b: int) -> None:
    """Run ``b``, halving while it does not fit, until a size fits.

    Raises:
        DoesNotFitError: the smallest size does not fit, or a size below one that ran out of
            memory failed for another reason, or the time budget ran out first.
        WorkloadError: the first size failed for a reason other than memory.
    """  # noqa: DOC501 - DoesNotFitError, raised through _does_not_fit()
    start = b
    while True:
        try:
            if s.run(b).fits:
                return
        except WorkloadError as e:
            if b == start:
                raise
            raise _does_not_fit(s, e) from e.__cause__
        lower = lower_after_oom(b, smallest=s.grid.lower, halve=lambda n: s.grid.snap_down(n / 2))
        if lower is None:
            raise _does_not_fit(s)
        if s.over_budget():
            raise DoesNotFitError(
                f"time budget spent before any batch size fitted (smallest tried: {b})",
                batch_size=b,
                needed_bytes=s.trials[-1].peak_bytes,
                available_bytes=s.usable,
            )
        b = lower


#: The search's options when a caller gives none (every size, no budget).
ALL_DEFAULTS = SearchSettings()


def _cut_short(s: Bracket, max_trials: int | None) -> str:
    """Why the search stops before its bracket closes (the time budget, ``max_trials``), or ""."""
    if s.over_budget():
        spent = f"time budget of {s.budget:g}s spent"
    elif max_trials is not None and len(s.trials) >= max_trials:
        spent = f"{max_trials} trials run (max_trials)"
    else:
        return ""
    if s.hi is None:
        return f"{spent}: {s.lo} is verified to fit, larger sizes were not tried"
    return f"{spent}: {s.lo} is verified to fit, larger sizes up to {s.hi} were not settled"


def search(
    run: Callable[[int], Trial],
    *,
    start: int,
    usable_bytes: int,
    base_bytes: int = 0,
    settings: SearchSettings = ALL_DEFAULTS,
    clock: Callable[[], float] = time.monotonic,
    first_guess: int | None = None,
) -> SearchOutcome:
    """Find the largest batch size on the grid whose trial fits.

    Args:
        run: runs one trial at a batch size.
        start: the first size to try (snapped into the grid).
        usable_bytes: the bytes a trial may peak at.
        base_bytes: bytes live before any trial (model and state), for the first jump.
        settings: the search's options (the record is read here, field by field: its grid,
            time budget, ``on_trial``); the result cache's are the caller's.
        clock: time source (seconds).
        first_guess: a predicted ceiling (the fake-tensor estimate's) above ``start``: it is run
            first, then its neighbour (above if it fit, below if not), so that a right guess
            takes two trials; a wrong one falls back to the search from ``start``.

    Returns:
        The ceiling, every trial, the memory model, and why the search ended.

    Raises:
        DoesNotFitError: the smallest size does not fit.
    """
    grid = settings.grid
    s = Bracket(
        run,
        usable_bytes=usable_bytes,
        base_bytes=base_bytes,
        grid=grid,
        time_budget=settings.time_budget,
        clock=clock,
        on_trial=settings.on_trial,
    )
    b = grid.snap(start)
    settled = False
    if first_guess is not None:
        g = grid.snap(first_guess)
        if g > b:
            if s.run(g).fits:
                s.guess, settled = g, True  # next_size() verifies it from above
            elif g - grid.multiple_of > b and s.run(g - grid.multiple_of).fits:
                settled = True  # a near miss: its neighbour below fits
    if not settled:
        _first_fit(s, b)
    reason = ""
    while not s.finished() and not (reason := _cut_short(s, settings.max_trials)):
        s.run(s.next_size())
    complete = not reason
    assert s.lo is not None
    if settled and fit_memory_model(s.trials) is None and b < s.lo and complete:
        if not s.over_budget():
            # A right first guess leaves one fitting size: measure the start size too, so that
            # the result's memory model is fitted from measurements, not the estimate's.
            s.run(b)
    if complete:
        if s.upper is not None and s.lo >= s.upper:
            reason = f"reached the maximum batch size {s.upper}"
        else:
            reason = f"{s.lo} fits and {s.hi} does not"
    # The traces served the search; a result keeps none (they hold an entry per operator).
    trials = tuple(dataclasses.replace(t, trace=None) for t in s.trials)
    return SearchOutcome(
        ceiling=s.lo,
        trials=trials,
        memory_model=fit_memory_model(s.trials),
        complete=complete,
        stop_reason=reason,
    )
