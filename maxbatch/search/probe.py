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
from maxbatch.grid import ALL_SIZES, Grid
from maxbatch.memtrace import predict_ceiling
from maxbatch.results import MemoryModel, Trial
from maxbatch.step.retry import fitting_size, lower_after_oom
from maxbatch.units import format_bytes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
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


def fit_memory_model(trials: list[Trial] | tuple[Trial, ...]) -> MemoryModel | None:
    """Fit ``peak = fixed + per_sample * b`` from successful trials.

    Uses the two largest fitting sizes: memory is affine in ``b`` above a small crossover (below it
    a constant peak such as the optimizer step's dominates), so the points nearest the ceiling
    describe it best. Returns None with fewer than two distinct fitting sizes or a slope that is
    not positive.

    Returns:
        The fitted model, or None.
    """
    points = sorted({t.batch_size: t.peak_bytes for t in trials if t.fits}.items())
    if len(points) < 2:
        return None
    (b0, p0), (b1, p1) = points[-2], points[-1]
    slope = (p1 - p0) / (b1 - b0)
    if slope <= 0:
        return None
    return MemoryModel(fixed_bytes=p1 - slope * b1, bytes_per_sample=slope)


class _Search:
    def __init__(
        self,
        run: Callable[[int], Trial],
        *,
        usable_bytes: int,
        base_bytes: int,
        grid: Grid,
        time_budget: float | None,
        clock: Callable[[], float],
        on_trial: Callable[[Trial], None] | None,
    ):
        self.run_fn, self.usable, self.base = run, usable_bytes, base_bytes
        self.grid, self.upper, self.multiple_of = grid, grid.upper, grid.multiple_of
        self.budget, self.clock, self.on_trial = time_budget, clock, on_trial
        self.trials: list[Trial] = []
        self.done: dict[int, bool] = {}
        self.lo: int | None = None
        self.hi: int | None = None
        self.guess: int | None = None  # the last size the memory model predicted as the ceiling
        self.misses = 0  # model guesses that did not fit
        self.guess_basis: tuple[int, ...] = ()  # the sizes the last guess was fitted from
        self.bad_bases: set[tuple[int, ...]] = set()  # fits whose guesses did not fit
        self.trace_target: int | None = None  # the last size the traces predicted
        self.trace_misses = 0  # trace predictions that did not fit
        self.t0 = clock()

    def run(self, b: int) -> Trial:
        trial = self.run_fn(b)
        self.trials.append(trial)
        self.done[b] = trial.fits
        if trial.fits:
            self.lo = b if self.lo is None else max(self.lo, b)
        else:
            self.hi = b if self.hi is None else min(self.hi, b)
        if self.on_trial is not None:
            self.on_trial(trial)
        log.info(
            "batch %d: %s, peak %s, %.3fs",
            b,
            "fits" if trial.fits else "does not fit",
            format_bytes(trial.peak_bytes),
            trial.seconds,
        )
        return trial

    def over_budget(self) -> bool:
        return self.budget is not None and self.clock() - self.t0 > self.budget

    def inside(self, b: int) -> bool:
        assert self.lo is not None
        return b > self.lo and (self.hi is None or b < self.hi) and b not in self.done

    def next_size(self) -> int:
        """The next size to run; never a third failure in a row one grid step below the last."""
        b = self._next_size()
        last = self.trials[-2:]
        if (
            self.hi is not None
            and b == self.hi - self.multiple_of
            and len(last) == 2
            and not last[0].fits
            and not last[1].fits
            and last[0].batch_size - last[1].batch_size == self.multiple_of
        ):
            assert self.lo is not None
            mid = self.grid.snap_down((self.lo + self.hi) / 2)
            if self.inside(mid):
                return mid
        return b

    def traced_guess(self) -> int | None:
        """The ceiling that the counted trials' traces predict; None without traces."""
        fits = [t.trace for t in self.trials if t.fits and t.trace is not None]
        failed = [t.trace for t in self.trials if t.trace is not None and not t.trace.complete]
        guess, lines = predict_ceiling(fits, failed, self.usable)
        # The shape split is a guess; the safe jump is sure to fit where memory is affine.
        return guess if guess is None or lines else max(guess, self.safe_jump())

    def _traced_size(self) -> int | None:
        """The size the traces say to run next, or None to leave it to the peak's fit."""
        assert self.lo is not None
        last, self.trace_target = self.trace_target, None
        if last is not None and not self.done[last]:
            self.trace_misses += 1
        if self.trace_misses >= 2:
            return None  # the traces are not affine here: bisect
        guess = self.traced_guess()
        if guess is None:
            return None
        target = self.grid.snap(guess)
        if self.inside(target):
            self.trace_target = target
            return target
        if target <= self.lo and self.inside(self.lo + self.multiple_of):
            return (
                self.lo + self.multiple_of
            )  # the traces say lo is the ceiling: check its neighbour
        return None

    def _next_size(self) -> int:
        traced = self._traced_size()
        if traced is not None:
            return traced
        lo, hi, multiple_of = self.lo, self.hi, self.multiple_of
        assert lo is not None
        guess, self.guess = self.guess, None
        if guess is not None and not self.done[guess]:
            self.misses += 1
            self.bad_bases.add(self.guess_basis)
        # Verify a model guess from the side it landed on: its neighbour above if it fit; below if
        # it failed by little (a counting meter tells by how much; a failed CUDA trial cannot).
        if guess is not None and self.done[guess] and self.inside(guess + multiple_of):
            return guess + multiple_of
        if guess is not None and self.misses == 1 and self.inside(guess - multiple_of):
            failed = self.trials[-1]
            model = fit_memory_model(self.trials)
            near = (
                model is None
                or failed.peak_bytes <= self.usable + 2 * multiple_of * model.bytes_per_sample
            )
            if near:
                return guess - multiple_of
        # A fit is not trusted again once a guess from it failed; new points make a new fit.
        basis = tuple(sorted(t.batch_size for t in self.trials if t.fits)[-2:])
        model = fit_memory_model(self.trials) if basis not in self.bad_bases else None
        if model is not None:
            target = self.grid.snap(fitting_size(model, self.usable))
            if self.inside(target):
                self.guess, self.guess_basis = target, basis
                return target
            if target <= lo and self.inside(lo + multiple_of) and guess is None:
                return lo + multiple_of  # the model says lo is the ceiling: check its neighbour
        # A size sure to fit (if memory is affine and convex in b) refines the model from below.
        safe = self.safe_jump()
        if hi is None:
            target = 2 * lo if self.upper is None else min(2 * lo, self.upper)
            return max(target, safe, lo + multiple_of)
        mid = self.grid.snap_down((lo + hi) / 2)
        if self.inside(safe) and safe - lo >= (hi - lo) / 4:
            return safe
        return mid if self.inside(mid) else lo + multiple_of

    def safe_jump(self) -> int:
        """A size that fits if every byte above ``base`` of the largest success is per-sample."""
        assert self.lo is not None
        best = max((t for t in self.trials if t.fits), key=lambda t: t.batch_size)
        fixed = max(self.base, max(t.state_bytes or 0 for t in self.trials))
        per_sample = max(1.0, (best.peak_bytes - fixed) / best.batch_size)
        return self.grid.snap(best.batch_size + (self.usable - best.peak_bytes) / per_sample)

    def finished(self) -> bool:
        assert self.lo is not None
        if self.upper is not None and self.lo >= self.upper:
            return True
        return self.hi is not None and self.hi - self.lo <= self.multiple_of


def _does_not_fit(s: _Search, failure: WorkloadError | None = None) -> DoesNotFitError:
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


def _first_fit(s: _Search, b: int) -> None:
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


def search(
    run: Callable[[int], Trial],
    *,
    start: int,
    usable_bytes: int,
    base_bytes: int = 0,
    grid: Grid = ALL_SIZES,
    time_budget: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_trial: Callable[[Trial], None] | None = None,
    first_guess: int | None = None,
) -> SearchOutcome:
    """Find the largest batch size on the grid whose trial fits.

    Args:
        run: runs one trial at a batch size.
        start: the first size to try (snapped into the grid).
        usable_bytes: the bytes a trial may peak at.
        base_bytes: bytes live before any trial (model and state), for the first jump.
        grid: the sizes that may be tried.
        time_budget: seconds after which the search stops with the best verified size.
        clock: time source (seconds).
        on_trial: called after every trial.
        first_guess: a predicted ceiling (the fake-tensor estimate's) above ``start``: it is run
            first, then its neighbour (above if it fit, below if not), so that a right guess
            takes two trials; a wrong one falls back to the search from ``start``.

    Returns:
        The ceiling, every trial, the memory model, and why the search ended.

    Raises:
        DoesNotFitError: the smallest size does not fit.
    """
    s = _Search(
        run,
        usable_bytes=usable_bytes,
        base_bytes=base_bytes,
        grid=grid,
        time_budget=time_budget,
        clock=clock,
        on_trial=on_trial,
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
    complete, reason = True, ""
    while not s.finished():
        if s.over_budget():
            complete = False
            reason = (
                f"time budget of {s.budget:g}s spent: {s.lo} is verified to fit, "
                f"larger sizes up to {s.hi} were not settled"
            )
            break
        s.run(s.next_size())
    assert s.lo is not None
    if settled and fit_memory_model(s.trials) is None and b < s.lo and not s.over_budget():
        # A right first guess leaves one fitting size: measure the start size too, so that the
        # result's memory model is fitted from measurements, not taken from the estimate.
        s.run(b)
    if complete:
        if s.upper is not None and s.lo >= s.upper:
            reason = f"reached the maximum batch size {s.upper}"
        else:
            reason = f"{s.lo} fits and {s.hi} does not"
    # The traces served the search; a result keeps none (they hold an entry per operator).
    trials = tuple(dataclasses.replace(t, trace=None) for t in s.trials)
    return SearchOutcome(s.lo, trials, fit_memory_model(s.trials), complete, reason)
