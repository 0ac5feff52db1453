"""The search for the best throughput among candidate batch sizes at or below the ceiling.

Each size is timed by :mod:`maxbatch.timing` and the pick made by :mod:`maxbatch.pick`. The
search (:func:`profile`) does not time every candidate. It sees only ``time_step(b)`` (the seconds
of each replicate) and a clock, so tests drive it with fakes:

1. Descent: from the largest multiple of 8 near the top, rungs about 4x apart, down while a rung
   is within the tolerance of the best (``"within"``; ``flat_gain`` for ``"fastest"``) or faster
   than the rung above it. The top comes first because the best is most often there, and so is
   most of the cost of a sweep.
2. Refinement: for ``"within"``, bisect (on a log scale) below the smallest size within the
   tolerance of the best; then, for both rules, bisect beside the best toward its faster timed
   neighbour, until no untimed candidate is left there.
3. Cost: a size is timed only while the time spent stays under ``share`` (24 %) of the predicted
   cost of timing every candidate (the first size always, unless ``prior`` costs, such as the
   probe's trials, predict it too dear: the descent then starts lower), and only if its predicted
   cost fits in the rest of ``budget``. Costs are predicted from the sizes timed so far.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from maxbatch.errors import ConfigError
from maxbatch.pick import TOLERANCE, PickRule, check_pick, pick
from maxbatch.results import Throughput
from maxbatch.timing import NOISY, REPLICATES, WARMUP, measurement, time_workload
from maxbatch.workload import Workload

log = logging.getLogger(__name__)

FLAT_GAIN = 0.01  #: a step that gains no more than 1 % counts as flat
SHARE = 0.24  #: the search stops at this share of the predicted cost of timing every candidate
ALIGN_SLACK = 1 / 32  #: the descent starts at the largest multiple of ALIGN this close to the top
ALIGN = 8  #: sizes near the ceiling are multiples of this (tensor-core friendly)
NEAR = 0.5  #: "near the ceiling": the top half, where powers of two leave a 2x gap
MAX_NEAR = 16  #: at most this many sizes near the ceiling (coarser multiples when needed)

TimeStep = Callable[[int], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the profiler timed and picked.

    Attributes:
        batch_size: the pick (the largest candidate when nothing could be timed).
        pick_reason: why, as a sentence.
        points: the timed sizes, by batch size.
        candidates: every size the search could have timed.
        complete: False when the time budget stopped the search.
        stop_reason: why the search ended.
        seconds: wall time of the search.
        out_of_memory: sizes that ran out of memory while timed (larger ones were then skipped).
    """

    batch_size: int
    pick_reason: str
    points: tuple[Throughput, ...]
    candidates: tuple[int, ...]
    complete: bool
    stop_reason: str
    seconds: float
    out_of_memory: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-ready dict."""
        return dataclasses.asdict(self)


def candidates(ceiling: int, *, min_batch_size: int = 1, multiple_of: int = 1) -> list[int]:
    """The sizes worth timing: a doubling ladder, multiples of 8 near the ceiling, the ceiling.

    The ladder is ``multiple_of * 2**k`` (the powers of two for ``multiple_of=1``). In the top
    half below the ceiling, where the ladder leaves a 2x gap, come the multiples of
    ``lcm(8, multiple_of)``, thinned to coarser multiples where there would be more than 16.
    Every size is a multiple of ``multiple_of`` from ``min_batch_size`` to ``ceiling``; the
    smallest such size and the largest (the ceiling when it is a multiple) are always included.

    Raises:
        ConfigError: an argument is not a positive integer, or no such size exists.
    """
    for name, value in (
        ("ceiling", ceiling),
        ("min_batch_size", min_batch_size),
        ("multiple_of", multiple_of),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    low = -(-min_batch_size // multiple_of) * multiple_of
    top = ceiling // multiple_of * multiple_of
    if low > top:
        raise ConfigError(f"no multiple of {multiple_of} lies in [{min_batch_size}, {ceiling}]")
    sizes = {low, top} | {multiple_of << k for k in range(top.bit_length())}
    step = math.lcm(ALIGN, multiple_of)
    start = math.ceil(top * (1 - NEAR))
    while (top - start) // step + 1 > MAX_NEAR:
        step *= 2
    sizes.update(range(-(-start // step) * step, top + 1, step))
    return sorted(b for b in sizes if low <= b <= top)


def _interpolate(known: Mapping[int, float], b: int) -> float:
    """``known`` at ``b``: linear between known sizes, in proportion to the nearest outside."""
    sizes = sorted(known)
    if not sizes[0] <= b <= sizes[-1]:
        near = sizes[0] if b < sizes[0] else sizes[-1]
        return known[near] * b / near
    return float(np.interp(b, sizes, [known[k] for k in sizes]))


def _middle(gap: list[int], low: int, high: int) -> int:
    """The size in ``gap`` nearest the geometric middle of ``low`` and ``high``."""
    centre = (math.log(low) + math.log(high)) / 2
    return min(gap, key=lambda b: (abs(math.log(b) - centre), b))


class _Search:
    """One search: the timed sizes, what timing each cost, and the limits on cost."""

    def __init__(
        self,
        time_step: TimeStep,
        sizes: list[int],
        budget: float | None,
        clock: Callable[[], float],
        share: float,
        noisy: float,
        on_point: Callable[[Throughput], None] | None,
        prior: Mapping[int, float],
    ):
        self.time_step, self.sizes, self.budget, self.clock = time_step, sizes, budget, clock
        self.prior = prior
        self.share, self.noisy, self.on_point = share, noisy, on_point
        self.points: dict[int, Throughput] = {}
        self.cost: dict[int, float] = {}  # seconds spent on each size, warm-up included
        self.oom: list[int] = []
        self.budget_hit = False
        self.start = clock()

    def rate(self, b: int) -> float:
        return self.points[b].samples_per_second

    def best(self) -> int:
        return max(self.points, key=lambda b: (self.rate(b), -b))

    def untimed(self) -> list[int]:
        limit = min(self.oom, default=math.inf)
        return [b for b in self.sizes if b not in self.cost and b < limit]

    def predict(self, b: int) -> float:
        """Seconds timing ``b`` should cost, from the timed sizes and the ``prior``.

        The prior's costs, scaled by what the timed sizes really cost against it, fill in
        where nothing was timed; with neither, 0.
        """
        known = dict(self.cost)
        if self.prior:
            scale, expected = 1.0, sum(_interpolate(self.prior, t) for t in self.cost)
            if self.cost and expected > 0:
                scale = sum(self.cost.values()) / expected
            known = {k: c * scale for k, c in self.prior.items()} | known
        return _interpolate(known, b) if known else 0.0

    def blocked(self, b: int, *, shared: bool) -> str | None:
        """Why ``b`` may not be timed now, or None."""
        cost, spent = self.predict(b), sum(self.cost.values())
        if self.budget is not None and self.clock() - self.start + cost >= self.budget:
            self.budget_hit = True
            return f"the time budget ({self.budget:g} s) has no room left for batch size {b}"
        if shared and spent + cost > self.share * (spent + sum(map(self.predict, self.untimed()))):
            return (
                f"timing {b} would pass {self.share:.0%} of the predicted cost of timing every size"
            )
        return None

    def measure(self, b: int) -> bool:
        """Time ``b`` (a noisy size twice, replicates pooled); False when it ran out of memory."""
        seconds: list[float] = []
        for attempt in range(2):
            if attempt and (
                not measurement(b, seconds, self.noisy).noisy or self.blocked(b, shared=False)
            ):
                break
            started = self.clock()
            more = self.time_step(b)
            self.cost[b] = self.cost.get(b, 0.0) + self.clock() - started
            if not more:
                self.oom.append(b)
                log.warning("batch size %s ran out of memory while being timed", b)
                return False
            seconds.extend(more)
        self.points[b] = point = measurement(b, seconds, self.noisy)
        log.info("batch size %s: %.1f samples/s", b, point.samples_per_second)
        if self.on_point is not None:
            self.on_point(point)
        return True

    def first_rung(self) -> int:
        """The top of the descent: the largest multiple of ``ALIGN`` near the largest size."""
        top = self.sizes[-1]
        aligned = [b for b in self.sizes if b % ALIGN == 0 and b >= (1 - ALIGN_SLACK) * top]
        return aligned[-1] if aligned else top

    def descend(self, keep: float) -> str:
        """Time rungs about 4x apart from the top down while they may hold the best or the edge.

        The descent stops at a rung below ``keep`` of the best and no faster than the rung above
        it: from there down the curve only falls away. After a size runs out of memory, the next
        rung is the candidate just below it.
        """
        b: int | None = self.first_rung()
        above: int | None = None
        skipped = ""
        while b is not None:
            fits = b in self.points
            if not fits:
                if (why := self.blocked(b, shared=bool(self.points or self.prior))) is not None:
                    if self.points and not self.budget_hit:
                        return why
                    skipped = skipped or f"{why}; "  # a smaller rung may still fit
                else:
                    fits = self.measure(b)
            if fits and above is not None and self.rate(b) < keep * self.rate(self.best()):
                if self.rate(b) <= self.rate(above):
                    return f"{skipped}the coarse descent fell away at batch size {b}"
            above = b if fits else above
            timed = b in self.cost
            lower = [c for c in self.sizes if c < b and (timed and not fits or c <= b / 4)]
            b = lower[-1] if lower else None
        if not self.points:
            return skipped.removesuffix("; ")
        return f"{skipped}the coarse descent reached the smallest size"

    def next_probe(self, rule: PickRule, tolerance: float) -> int | None:
        """The next size to time: below the tolerance edge ("within") first, then by the best."""
        timed, untimed = sorted(self.points), self.untimed()
        best = self.best()
        if rule is PickRule.WITHIN:
            edge = min(b for b in timed if self.rate(b) >= (1 - tolerance) * self.rate(best))
            lo = max((b for b in timed if b < edge), default=None)
            gap = [b for b in untimed if b < edge and (lo is None or b > lo)]
            if gap:
                return _middle(gap, lo if lo is not None else gap[0], edge)
        lo = max((b for b in timed if b < best), default=None)
        hi = min((b for b in timed if b > best), default=None)
        left = [b for b in untimed if b < best and (lo is None or b > lo)]
        right = [b for b in untimed if b > best and (hi is None or b < hi)]
        if left and right and hi is not None and lo is not None:
            left_first = self.rate(lo) >= self.rate(hi)
        else:
            left_first = bool(left)
        if left_first:
            return _middle(left, lo if lo is not None else left[0], best)
        if right:
            return _middle(right, best, hi if hi is not None else right[-1])
        return None

    def refine(self, rule: PickRule, tolerance: float) -> str:
        """Bisect below the tolerance edge and beside the best while the share allows."""
        while self.points and (b := self.next_probe(rule, tolerance)) is not None:
            if (why := self.blocked(b, shared=True)) is not None:
                return why
            self.measure(b)
        return "no untimed size is left beside the best" + (
            " or below the tolerance edge" if rule is PickRule.WITHIN else ""
        )


def profile(
    time_step: TimeStep,
    sizes: Iterable[int],
    *,
    rule: PickRule | str = PickRule.WITHIN,
    tolerance: float = TOLERANCE,
    budget: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    flat_gain: float = FLAT_GAIN,
    share: float = SHARE,
    noisy: float = NOISY,
    on_point: Callable[[Throughput], None] | None = None,
    prior: Mapping[int, float] | None = None,
) -> Profile:
    """Search the throughput curve over candidate ``sizes`` and pick one (see the module doc).

    Args:
        time_step: ``time_step(b)`` returns the seconds of each timed step at batch size ``b``,
            or an empty list when ``b`` ran out of memory.
        sizes: the candidates, e.g. from :func:`candidates`.
        rule: the pick rule, ``"within"`` or ``"fastest"`` (see :func:`pick`).
        tolerance: the tolerance of the ``"within"`` rule.
        budget: seconds the search may take; a size is timed only if its predicted cost fits.
        clock: seconds as a float, read around every ``time_step`` call.
        flat_gain: a relative gain no larger than this counts as flat.
        share: the search stops at this share of the predicted cost of timing every candidate.
        noisy: IQR / median above which a size is flagged noisy.
        on_point: called with each :class:`Throughput` as it is measured.
        prior: rough seconds of timing some sizes (e.g. from the probe's trials), so that
            ``share`` and ``budget`` hold from the first size. Without them and with a
            ``budget``, the smallest size is timed first to learn what a step costs.

    Returns:
        The timed points, the pick and why, and why the search stopped.
    """
    chosen = check_pick(rule, tolerance)
    ordered = sorted(set(sizes))
    if not ordered:
        raise ConfigError("there are no candidate batch sizes to time")
    search = _Search(time_step, ordered, budget, clock, share, noisy, on_point, dict(prior or {}))
    if budget is not None and not prior and search.blocked(ordered[0], shared=False) is None:
        search.measure(ordered[0])
    keep = 1 - (tolerance if chosen is PickRule.WITHIN else flat_gain)
    stop = search.descend(keep)
    if search.points:
        stop += f"; {search.refine(chosen, tolerance)}"
    if search.oom:
        stop += f"; batch size {min(search.oom)} ran out of memory while being timed"
    points = tuple(search.points[b] for b in sorted(search.points))
    if points:
        batch_size, reason = pick(points, rule=chosen, tolerance=tolerance)
    else:
        batch_size, reason = ordered[-1], f"the ceiling: no size could be timed ({stop})"
    seconds = clock() - search.start
    oom = tuple(sorted(search.oom))
    return Profile(
        batch_size, reason, points, tuple(ordered), not search.budget_hit, stop, seconds, oom
    )


def profile_workload(
    workload: Workload,
    ceiling: int,
    *,
    min_batch_size: int = 1,
    multiple_of: int = 1,
    rule: PickRule | str = PickRule.WITHIN,
    tolerance: float = TOLERANCE,
    budget: float | None = None,
    warmup: int = WARMUP,
    replicates: int = REPLICATES,
    clock: Callable[[], float] = time.perf_counter,
    on_point: Callable[[Throughput], None] | None = None,
    step_seconds: Mapping[int, float] | None = None,
    agree: Callable[[TimeStep], TimeStep] | None = None,
    search_clock: Callable[[], float] | None = None,
) -> Profile:
    """Time the real step over :func:`candidates` up to ``ceiling`` and pick a batch size.

    ``step_seconds`` (seconds of one step at some sizes, e.g. the probe's trials) predicts the
    cost of the first sizes, so that ``budget`` holds from the start. ``agree`` wraps the timing
    of one size and ``search_clock`` replaces ``clock`` for the search's own decisions (both are
    the ranks' agreement under ``torch.distributed``, see :mod:`maxbatch.distributed`).
    """
    steps = warmup + replicates
    prior = {b: s * steps for b, s in (step_seconds or {}).items()}

    def time_step(b: int) -> Sequence[float]:
        return time_workload(workload, b, warmup=warmup, replicates=replicates, clock=clock)

    return profile(
        time_step if agree is None else agree(time_step),
        candidates(ceiling, min_batch_size=min_batch_size, multiple_of=multiple_of),
        rule=rule,
        tolerance=tolerance,
        budget=budget,
        clock=clock if search_clock is None else search_clock,
        on_point=on_point,
        prior=prior,
    )
