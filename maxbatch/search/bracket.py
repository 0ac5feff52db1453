"""The ceiling search's state: the trials so far, the bracket, the memory model, the next size.

:func:`maxbatch.search.probe.search` drives it; the strategy is its module doc's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from maxbatch.grid import Grid
from maxbatch.memtrace import predict_ceiling
from maxbatch.results import MemoryModel, Trial
from maxbatch.units import format_bytes

log = logging.getLogger(__name__)


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


class Bracket:
    """The search's state: its trials, the bracket ``[lo, hi)``, and the next size to run.

    Args:
        run: runs one trial.
        usable_bytes: the bytes a trial may peak at.
        base_bytes: the bytes live before any trial.
        grid: the sizes that may be run.
        time_budget: seconds the search may take, or None.
        clock: seconds as a float.
        on_trial: called with each trial.
    """

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
        """Run size ``b``, record it and narrow the bracket."""
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
        """Whether the time budget is spent."""
        return self.budget is not None and self.clock() - self.t0 > self.budget

    def inside(self, b: int) -> bool:
        """Whether ``b`` is inside the open bracket and not run yet."""
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
            target = self.grid.snap(model.fitting_size(self.usable))
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
        """Whether the ceiling is settled: it is the maximum, or the size above it did not fit."""
        assert self.lo is not None
        if self.upper is not None and self.lo >= self.upper:
            return True
        return self.hi is not None and self.hi - self.lo <= self.multiple_of
