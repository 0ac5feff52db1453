"""The profiler's timings and their cost: what each size cost, and the budgets that stop it.

Pure: it sees only ``time_step(b)`` (the seconds of each replicate, empty on out-of-memory) and
a clock. :class:`~maxbatch.profile.descent.Descent` decides which size to time next.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from maxbatch.profile.timing import measurement
from maxbatch.results import Throughput

log = logging.getLogger(__name__)

PROBE_RATIO = 2.0  #: the cost rule allows at least this many times the probe's own time
CONTEST_RATIO = 2.0  #: the profiler's budget: this times the cost rule, rounds included
SAFETY = 1.5  #: the profiler's budget allows for a step this much slower than its last warm one
STEPS = 7  #: steps per timing of one size (2 warm-up, 5 timed), as ``profile.timing`` runs

TimeStep = Callable[[int], Sequence[float]]


def _interpolate(known: Mapping[int, float], b: int) -> float:
    """``known`` at ``b``: linear between known sizes, in proportion to the nearest outside."""
    sizes = sorted(known)
    if not sizes[0] <= b <= sizes[-1]:
        near = sizes[0] if b < sizes[0] else sizes[-1]
        return known[near] * b / near
    return float(np.interp(b, sizes, [known[k] for k in sizes]))


class Timings:
    """The timed sizes of one search, what timing each cost, and the limits on cost.

    The budgets and the cost rule (see :mod:`maxbatch.profile.profiler`'s module doc); the order
    in which sizes are timed is :class:`~maxbatch.profile.descent.Descent`'s.

    Args:
        time_step: times one size (see :func:`maxbatch.profile.profiler.profile`).
        sizes: the candidates, ascending.
        budget: seconds the whole search may take, or None.
        clock: seconds as a float.
        share: the cost rule's share of the predicted cost of timing every candidate.
        probe_seconds: what the probe took; the cost rule allows :data:`PROBE_RATIO` times it.
        noisy: IQR / median above which a size is flagged noisy (and timed once more).
        on_point: called with each point as it is measured.
        prior: rough seconds of timing some sizes, to predict costs before any is timed.
        steps: steps per timing of one size (warm-up and replicates): a size's warm cost is its
            mean step times this.
    """

    def __init__(
        self,
        time_step: TimeStep,
        sizes: list[int],
        *,
        budget: float | None,
        clock: Callable[[], float],
        share: float,
        probe_seconds: float,
        noisy: float,
        on_point: Callable[[Throughput], None] | None,
        prior: Mapping[int, float],
        steps: int = STEPS,
    ):
        self.time_step, self.sizes, self.budget, self.clock = time_step, sizes, budget, clock
        self.prior, self.share, self.probe_seconds = prior, share, probe_seconds
        self.noisy, self.on_point, self.steps = noisy, on_point, steps
        self.allowance: float | None = None  # the profiler's budget, fixed once the rule applies
        self.points: dict[int, Throughput] = {}
        self.seconds: dict[int, list[float]] = {}  # the replicates behind each point
        self.cost: dict[int, float] = {}  # seconds spent on each size, warm-up included
        self.warm_spent = 0.0  # what the timings so far would have cost warm
        self.latest: dict[int, list[float]] = {}  # each size's latest replicates
        self.oom: list[int] = []
        self.skipped: dict[int, str] = {}  # sizes the cost rule or the budget kept out, and why
        self.budget_hit = False
        self.fell_at: int | None = None  # where the descent found the curve falling away
        self.near_top: int | None = None  # the size timed just below the top
        self.start = clock()

    def rate(self, b: int) -> float:
        """Samples per second measured at ``b``."""
        return self.points[b].samples_per_second

    def best(self) -> int:
        """The fastest timed size (the smaller on a tie)."""
        return max(self.points, key=lambda b: (self.rate(b), -b))

    def untimed(self) -> list[int]:
        """The candidates not timed yet, below any size that ran out of memory."""
        limit = min(self.oom, default=math.inf)
        return [b for b in self.sizes if b not in self.cost and b < limit]

    def predict(self, b: int) -> float:
        """Seconds timing ``b`` should cost, from the timed sizes and the ``prior``.

        A timed size costs its warm mean step times :attr:`steps`: the first timing's cold
        steps (optimizer state, workspaces, caches) do not repeat, and predicting from them made
        cheap sizes look 20-50x dearer than they are. The prior's costs (the probe's trials,
        counted and cold), scaled by what the timed sizes cost warm against them, fill in where
        nothing was timed; with neither, 0.

        Returns:
            The predicted seconds.
        """
        known = {t: float(np.mean(self.latest[t])) * self.steps for t in self.points}
        if self.prior:
            scale, expected = 1.0, sum(_interpolate(self.prior, t) for t in known)
            if known and expected > 0:
                scale = sum(known.values()) / expected
            known = {k: c * scale for k, c in self.prior.items()} | known
        return _interpolate(known, b) if known else 0.0

    def rule_limit(self) -> float:
        """The cost rule's limit now.

        Returns:
            The larger of ``share`` of timing every candidate (warm) and :data:`PROBE_RATIO`
            times the probe, in seconds.
        """
        whole = self.warm_spent + sum(map(self.predict, self.untimed()))
        return max(self.share * whole, PROBE_RATIO * self.probe_seconds)

    def fix_allowance(self) -> float:
        """The profiler's budget, every timing and interleaved round included.

        Fixed the first time it is asked for (when the cost rule first applies, after the top
        is timed warm): :data:`CONTEST_RATIO` times the cost rule's limit then, plus what the
        cold first steps already took beyond their warm cost, and never less than what was
        already spent; under ``budget`` when one is given.

        Returns:
            The seconds the whole profiler may take.
        """
        if self.allowance is None:
            spent = self.clock() - self.start
            cold = max(spent - self.warm_spent, 0.0)
            self.allowance = max(CONTEST_RATIO * self.rule_limit() + cold, spent)
            if self.budget is not None:
                self.allowance = min(self.allowance, max(self.budget, spent))
        return self.allowance

    def reserve(self) -> float:
        """Seconds the search leaves for interleaved rounds, once a noisy size makes them likely.

        Returns:
            The predicted cost of one round of two sizes like the best (the pick, its rival),
            with the rounds' :data:`SAFETY` margin, or 0 while no timed size is noisy.
        """
        if not any(p.noisy for p in self.points.values()):
            return 0.0
        return SAFETY * 2 * self.predict(self.best())

    def blocked(self, b: int, *, shared: bool, rounds: bool = False) -> str | None:
        """Why ``b`` may not be timed now (recorded as why it was skipped), or None.

        The budget always applies, and so does the profiler's budget once fixed (see
        :meth:`fix_allowance`); the cost rule (``shared``) holds the search to the larger of
        ``share`` of timing every candidate and :data:`PROBE_RATIO` times the probe, which
        leaves the rest of the profiler's budget to the interleaved rounds (``rounds``).

        Returns:
            Why, in words, or None when ``b`` may be timed.
        """
        cost, elapsed = self.predict(b), self.clock() - self.start
        guarded = elapsed + SAFETY * cost
        why = None
        if self.budget is not None and elapsed + cost >= self.budget:
            self.budget_hit = True
            why = f"the time budget ({self.budget:g} s) had no room left for it"
        elif (shared or rounds) and guarded > self.fix_allowance():
            why = (
                f"timing it (about {cost:.3g} s, from its warm steps) would take the profiler "
                f"past its budget of {self.allowance:.3g} s"
            )
        elif shared and not rounds and guarded + self.reserve() > self.fix_allowance():
            why = (
                f"timing it (about {cost:.3g} s, from its warm steps) would leave no room in the "
                f"profiler's budget of {self.allowance:.3g} s for a round of interleaved timing"
            )
        elif shared and not rounds:
            limit = self.rule_limit()
            if self.warm_spent + cost > limit:
                why = (
                    f"timing it (about {cost:.3g} s, from its warm steps) would take the search "
                    f"past {limit:.3g} s: the larger of {self.share:.0%} of timing every size "
                    f"and {PROBE_RATIO:g}x the probe's {self.probe_seconds:.3g} s (the rest of "
                    "the profiler's budget is kept for interleaved rounds)"
                )
        if why is not None:
            self.skipped.setdefault(b, why)
        return why

    def run(self, b: int) -> list[float] | None:
        """Time ``b`` once, counting its cost; None when it ran out of memory."""
        started = self.clock()
        more = list(self.time_step(b))
        took = self.clock() - started
        self.cost[b] = self.cost.get(b, 0.0) + took
        if not more:
            if b not in self.oom:
                self.oom.append(b)
            log.warning("batch size %s ran out of memory while being timed", b)
            self.warm_spent += took
            return None
        self.latest[b] = more
        self.warm_spent += min(took, float(np.mean(more)) * self.steps)
        return more

    def measure(self, b: int) -> bool:
        """Time ``b`` (a noisy size twice, replicates pooled); False when it ran out of memory."""
        seconds: list[float] = []
        for attempt in range(2):
            if attempt and (
                not measurement(b, seconds, self.noisy).noisy or self.retime_blocked(b)
            ):
                break
            more = self.run(b)
            if more is None:
                return False
            seconds.extend(more)
        self.seconds[b] = seconds
        self.points[b] = point = measurement(b, seconds, self.noisy)
        self.skipped.pop(b, None)
        log.info("batch size %s: %.1f samples/s", b, point.samples_per_second)
        if self.on_point is not None:
            self.on_point(point)
        return True

    def retime_blocked(self, b: int) -> str | None:
        """Why a noisy size may not be timed once more now, or None.

        The budget applies, and once the profiler's budget is fixed, it must keep the rounds'
        :meth:`reserve`: the rounds re-time the sizes that matter, in one period.

        Returns:
            Why, in words, or None.
        """
        if (why := self.blocked(b, shared=False)) is not None or self.allowance is None:
            return why
        if self.clock() - self.start + self.predict(b) + self.reserve() > self.allowance:
            return "no room in the profiler's budget for a second timing beside the rounds"
        return None

    def time_again(self, b: int) -> list[float] | None:
        """One more timing of ``b`` for an interleaved round, if the budgets have room."""
        if self.blocked(b, shared=False, rounds=True) is not None:
            self.skipped.pop(b, None)  # it was timed: only the round is missing
            return None
        return self.run(b)

    def round_blocked(self, sizes: Sequence[int]) -> str | None:
        """Why a whole interleaved round of ``sizes`` does not fit the budgets, or None."""
        cost, elapsed = sum(map(self.predict, sizes)), self.clock() - self.start
        if self.budget is not None and elapsed + SAFETY * cost >= self.budget:
            self.budget_hit = True
            return f"the time budget ({self.budget:g} s) had no room left for it"
        if elapsed + SAFETY * cost > self.fix_allowance():
            return (
                f"it (about {cost:.3g} s, from warm steps) would take the profiler past its "
                f"budget of {self.allowance:.3g} s"
            )
        return None
