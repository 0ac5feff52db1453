"""Throughput of candidate batch sizes at or below the ceiling, and the pick.

Each size is timed like ``torch.utils.benchmark`` times code: warm-up steps, the device
synchronised before every clock read, several replicates, their median and interquartile range, a
flag on noisy sizes. The search (:func:`profile`) does not time every candidate. It sees only
``time_step(b)`` (the seconds of each replicate) and a clock, so tests drive it with fakes:

1. Coarse: rungs about 4x apart, ending at the ceiling, climbed from the first one above 1/64 of
   it until a rung does not beat the best so far by more than ``flat_gain``; then the rungs below
   while the smallest timed one is (nearly) the best, or for ``"within"`` within ``tolerance``.
2. Fine: bisect, on a log scale, between the best size and its faster timed neighbour while each
   probe gains more than ``flat_gain``; then, for ``"within"``, below the smallest size within
   ``tolerance`` of the best.
3. A fine probe runs only while the time spent stays under ``share`` of the predicted cost of
   timing every candidate; any probe only if its predicted cost fits in the rest of ``budget``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from maxbatch.device import synchronize
from maxbatch.errors import ConfigError, MaxbatchError, WorkloadError
from maxbatch.oom import is_oom, release_memory
from maxbatch.results import Throughput
from maxbatch.workload import Workload, to_device

log = logging.getLogger(__name__)

WARMUP = 2  #: untimed steps per size: the first creates optimizer state, workspaces, caches
REPLICATES = 5  #: timed steps per size
NOISY = 0.1  #: IQR / median above this flags a size as noisy (torch.utils.benchmark's threshold)
TOLERANCE = 0.03  #: the "within" pick: the smallest size within 3 % of the best throughput
FLAT_GAIN = 0.01  #: a step that gains no more than 1 % counts as flat
SHARE = 0.2  #: fine probes stop at this share of the predicted cost of timing every candidate
START = 64  #: the coarse climb starts at the first rung above 1/START of the largest size
ALIGN = 8  #: sizes near the ceiling are multiples of this (tensor-core friendly)
NEAR = 0.5  #: "near the ceiling": the top half, where powers of two leave a 2x gap
MAX_NEAR = 16  #: at most this many sizes near the ceiling (coarser multiples when needed)

TimeStep = Callable[[int], Sequence[float]]


class PickRule(str, enum.Enum):
    """How the batch size is picked from the timed sizes."""

    WITHIN = "within"  # the smallest size within the tolerance of the best throughput
    FASTEST = "fastest"  # the best throughput outright


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


def measurement(batch_size: int, seconds: Sequence[float], noisy: float = NOISY) -> Throughput:
    """Summarise the replicate ``seconds`` of one size; flag it when IQR / median > ``noisy``."""
    q1, median, q3 = (float(q) for q in np.percentile(np.asarray(seconds), [25, 50, 75]))
    median = max(median, 1e-12)  # a clock too coarse for the step must not divide by zero
    iqr = q3 - q1
    return Throughput(
        batch_size, batch_size / median, median, iqr, len(seconds), iqr / median > noisy
    )


def check_pick(rule: PickRule | str, tolerance: float) -> PickRule:
    """Validate the pick rule and tolerance at the boundary, before touching the device.

    Raises:
        ConfigError: the rule is not ``"within"`` or ``"fastest"``, or the tolerance is not a
            number in ``[0, 1)``.
    """
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not 0 <= tolerance < 1
    ):
        raise ConfigError(f"tolerance={tolerance!r} must be a number in [0, 1), e.g. 0.03 for 3 %")
    try:
        return PickRule(str(getattr(rule, "value", rule)).lower())
    except ValueError:
        raise ConfigError(f"pick={rule!r} is not valid; choose one of: within, fastest") from None


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


def pick(
    points: Sequence[Throughput], *, rule: PickRule | str = "within", tolerance: float = TOLERANCE
) -> tuple[int, str]:
    """Pick a batch size from timed sizes and say why.

    Args:
        points: the timed sizes.
        rule: ``"within"`` (default): the smallest size whose throughput is within ``tolerance``
            of the best timed; ``"fastest"``: the best outright (the smaller size on a tie).
        tolerance: the share of the best throughput ``"within"`` may give up (default 3 %).

    Returns:
        The batch size and the reason, a sentence.

    Raises:
        ConfigError: the rule or tolerance is invalid.
        ValueError: ``points`` is empty.
    """
    chosen_rule = check_pick(rule, tolerance)
    if not points:
        raise ValueError("no batch size was timed, so there is nothing to pick from")
    best = max(points, key=lambda p: (p.samples_per_second, -p.batch_size))
    rate, count = f"{best.samples_per_second:,.1f} samples/s", f"{len(points)} sizes timed"
    pct = f"{tolerance * 100:g}%"
    floor = (1 - tolerance) * best.samples_per_second
    within = [p for p in points if p.samples_per_second >= floor]
    chosen = best if chosen_rule is PickRule.FASTEST else min(within, key=lambda p: p.batch_size)
    if chosen_rule is PickRule.FASTEST:
        reason = f"the fastest of the {count} ({rate})"
    elif chosen is best:
        reason = f"the fastest of the {count} ({rate}); no smaller size was within {pct}"
    else:
        share = chosen.samples_per_second / best.samples_per_second
        reason = (
            f"the smallest size within {pct} of the fastest: {share:.1%} of the {rate} "
            f"of batch size {best.batch_size}"
        )
    if chosen.noisy:
        spread = chosen.iqr_seconds / chosen.median_seconds
        reason += f"; its timing is noisy (IQR {spread:.0%} of the median)"
    return chosen.batch_size, reason


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
    ):
        self.time_step, self.sizes, self.budget, self.clock = time_step, sizes, budget, clock
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
        """Seconds timing ``b`` should cost: interpolated between timed sizes, else proportional."""
        timed = sorted(self.cost)
        if not timed or b > timed[-1]:
            return self.cost[timed[-1]] * b / timed[-1] if timed else 0.0
        return float(np.interp(b, timed, [self.cost[k] for k in timed]))

    def blocked(self, b: int, *, fine: bool) -> str | None:
        """Why ``b`` may not be timed now, or None."""
        cost, spent = self.predict(b), sum(self.cost.values())
        if self.budget is not None and self.clock() - self.start + cost >= self.budget:
            self.budget_hit = True
            return f"the time budget ({self.budget:g} s) has no room left for batch size {b}"
        if fine and spent + cost > self.share * (spent + sum(map(self.predict, self.untimed()))):
            return (
                f"timing {b} would pass {self.share:.0%} of the predicted cost of timing every size"
            )
        return None

    def measure(self, b: int) -> bool:
        """Time ``b`` (a noisy size twice, replicates pooled); False when it ran out of memory."""
        seconds: list[float] = []
        for attempt in range(2):
            if attempt and (
                not measurement(b, seconds, self.noisy).noisy or self.blocked(b, fine=False)
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

    def climb(self, rule: PickRule, tolerance: float, flat_gain: float) -> str:
        """Time the coarse rungs (~4x apart, ending at the largest size; see the module doc)."""
        rungs = [self.sizes[-1]]
        while lower := [b for b in self.sizes if b <= rungs[-1] / 4]:
            rungs.append(lower[-1])
        rungs.reverse()
        first = next(i for i, b in enumerate(rungs) if b * START >= rungs[-1])
        why = "the coarse climb reached the largest size"
        for b in rungs[first:]:
            if (blocked := self.blocked(b, fine=False)) is not None:
                return blocked
            before = self.best() if self.points else None
            if not self.measure(b):
                why = f"batch size {b} ran out of memory while being timed"
                break
            if before is not None and self.rate(b) <= self.rate(before) * (1 + flat_gain):
                why = f"the coarse climb flattened at batch size {b}"
                break
        keep = (1 - tolerance) if rule is PickRule.WITHIN else (1 - flat_gain)
        for b in reversed(rungs[:first]):
            low = min(self.points, default=None)
            if low is None or self.rate(low) < keep * self.rate(self.best()):
                break
            if (blocked := self.blocked(b, fine=False)) is not None:
                return blocked
            self.measure(b)
            why += f"; descended to {b}"
        return why

    def refine(self, rule: PickRule, tolerance: float, flat_gain: float) -> str:
        """Bisect next to the best while it gains; then, for "within", below the tolerance edge."""
        peak = True
        while self.points:
            best, timed, untimed = self.best(), sorted(self.points), self.untimed()
            edge = best
            if not peak:
                edge = min(b for b in timed if self.rate(b) >= (1 - tolerance) * self.rate(best))
            lo = max((b for b in timed if b < edge), default=None)
            hi = min((b for b in timed if b > edge), default=None)
            below = [b for b in untimed if b < edge and (lo is None or b > lo)]
            above = [b for b in untimed if b > edge and (hi is None or b < hi)]
            up = peak and bool(above)
            up = up and (
                not below or (hi is not None and (lo is None or self.rate(hi) >= self.rate(lo)))
            )
            gap = above if up else below
            if not gap:
                if peak and rule is PickRule.WITHIN:
                    peak = False
                    continue
                return f"no untimed size is left next to batch size {edge}"
            ends = (edge, hi or gap[-1]) if up else (lo or gap[0], edge)
            b = _middle(gap, *ends)
            if (why := self.blocked(b, fine=True)) is not None:
                return why
            if self.measure(b) and peak and self.rate(b) <= self.rate(best) * (1 + flat_gain):
                if rule is PickRule.FASTEST:
                    return f"batch size {b} gained no more than {flat_gain:.0%} on {best}"
                peak = False
        return ""


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
        share: fine probes stop at this share of the predicted cost of timing every candidate.
        noisy: IQR / median above which a size is flagged noisy.
        on_point: called with each :class:`Throughput` as it is measured.

    Returns:
        The timed points, the pick and why, and why the search stopped.
    """
    chosen = check_pick(rule, tolerance)
    ordered = sorted(set(sizes))
    if not ordered:
        raise ConfigError("there are no candidate batch sizes to time")
    search = _Search(time_step, ordered, budget, clock, share, noisy, on_point)
    stop = search.climb(chosen, tolerance, flat_gain)
    if not search.budget_hit and (refined := search.refine(chosen, tolerance, flat_gain)):
        stop += f"; {refined}"
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


def _timed_steps(
    workload: Workload, b: int, warmup: int, replicates: int, clock: Callable[[], float]
) -> list[float]:
    batch = to_device(workload.make_batch(b), workload.device)
    for _ in range(warmup):
        workload.step(batch)
    seconds = []
    for _ in range(replicates):
        synchronize(workload.device)
        started = clock()
        workload.step(batch)
        synchronize(workload.device)
        seconds.append(clock() - started)
    return seconds


def time_workload(
    workload: Workload,
    batch_size: int,
    *,
    warmup: int = WARMUP,
    replicates: int = REPLICATES,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Time ``replicates`` real steps at ``batch_size``, one by one, after ``warmup`` steps.

    One batch is built on the device and the device is synchronised before every clock read.
    The workload is reset afterwards (the caller has called ``workload.save()``), so every size
    starts from the same state.

    Returns:
        The seconds of each timed step, or an empty list when the size ran out of memory.

    Raises:
        WorkloadError: the step failed for a reason other than memory.
    """
    oom, seconds = False, []
    try:
        seconds = _timed_steps(workload, batch_size, warmup, replicates, clock)
    except MaxbatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified right here, never swallowed
        if not is_oom(exc):
            message = f"the step failed while timing batch size {batch_size}"
            raise WorkloadError(
                f"{message}: {type(exc).__name__}: {exc}", batch_size=batch_size
            ) from exc
        oom = True
    finally:
        workload.reset()
    if oom:  # here, outside the except block, the traceback that held the batch is gone
        release_memory(workload.device)
    return seconds


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
) -> Profile:
    """Time the real step over :func:`candidates` up to ``ceiling`` and pick a batch size."""
    return profile(
        lambda b: time_workload(workload, b, warmup=warmup, replicates=replicates, clock=clock),
        candidates(ceiling, min_batch_size=min_batch_size, multiple_of=multiple_of),
        rule=rule,
        tolerance=tolerance,
        budget=budget,
        clock=clock,
        on_point=on_point,
    )
