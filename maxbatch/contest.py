"""Interleaved rounds between the sizes a pick hinges on, and how sure the pick is.

Sizes timed one after another meet different load, so a pick decided by a difference smaller
than the timing noise follows the load, not the step. When the pick hinges on sizes whose
difference from the rule's threshold is within their measured spread (the IQR of their
replicates) and more than the tolerance may be at stake, the pick, its rival and the best are
timed again in interleaved rounds, the order reversed each round so that load hits
them alike. Their replicates are pooled; each one's spread becomes the standard error of its
per-round throughput ratio to the best, and a size slower than the best by less than that spread
is tied with it, which the pick rule decides (:func:`maxbatch.pick.pick`: the smaller).
This module is pure: it sees the timed points and a ``time_again(b)`` function.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from maxbatch.pick import PickRule, sizes_text
from maxbatch.results import Throughput
from maxbatch.timing import measurement

ROUNDS = 2  #: interleaved rounds after a size's first timing

TimeAgain = Callable[[int], "Sequence[float] | None"]  # None: no time (budget) or out of memory


@dataclasses.dataclass(frozen=True)
class Confidence:
    """How sure the pick is: ``"high"``, ``"medium"`` or ``"low"``, and why."""

    level: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return the confidence as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Contest:
    """What the interleaved rounds measured.

    Attributes:
        points: every timed size, the contenders' replicates pooled over their rounds.
        spread: by contender, the standard error of its per-round throughput ratio to the best.
        rounds: per round, the throughput of each contender timed in it.
        contenders: the sizes timed again (empty when the margins exceeded the spread).
        blocked: why rounds were cut short, or "".
    """

    points: dict[int, Throughput]
    spread: dict[int, float]
    rounds: list[dict[int, float]]
    contenders: list[int]
    blocked: str = ""


def _relative_iqr(p: Throughput) -> float:
    return p.iqr_seconds / p.median_seconds


def _best(points: Mapping[int, Throughput]) -> Throughput:
    return max(points.values(), key=lambda p: (p.samples_per_second, -p.batch_size))


def contenders(
    points: Mapping[int, Throughput], chosen: int, rule: PickRule, tolerance: float
) -> list[int]:
    """The sizes the pick ``chosen`` hinges on: the best, the pick and its closest rival.

    Each throughput may be off by its relative IQR. A rival is, first, a timed size that may
    then be more than the tolerance faster than the pick (a smaller difference leaves both
    within the tolerance of each other, so it is not worth a round); for ``"within"``, then the
    next larger timed size when the pick may be more than half the tolerance short of its
    threshold, else the largest smaller size that may be within it after all. Empty when there
    is none.
    """
    best = _best(points)
    me = points[chosen]

    def lo(p: Throughput) -> float:
        return p.samples_per_second * (1 - _relative_iqr(p))

    def hi(p: Throughput) -> float:
        return p.samples_per_second * (1 + _relative_iqr(p))

    faster = [b for b, p in points.items() if b != chosen and hi(p) > lo(me) * (1 + tolerance)]
    rival = max(faster, key=lambda b: points[b].samples_per_second, default=None)
    if rival is not None or rule is PickRule.FASTEST:
        pass
    elif chosen != best.batch_size and lo(me) * (1 + tolerance / 2) < (1 - tolerance) * hi(best):
        # the pick may not be within the tolerance after all
        rival = min((b for b in points if b > chosen), default=None)
    else:  # a smaller size may be within after all
        floor = (1 - tolerance) * lo(best)
        rival = max((b for b, p in points.items() if b < chosen and hi(p) >= floor), default=None)
    if rival is None:
        return []
    return list(dict.fromkeys([best.batch_size, chosen, rival]))


def run_rounds(
    points: Mapping[int, Throughput],
    seconds: Mapping[int, Sequence[float]],
    sizes: list[int],
    time_again: TimeAgain,
    noisy: float,
) -> Contest:
    """Time ``sizes`` (the best first) in :data:`ROUNDS` interleaved rounds; pool and compare.

    ``seconds`` holds each size's replicates so far, the first round.
    """
    pooled = {b: list(seconds[b]) for b in sizes}
    rounds = [{b: points[b].samples_per_second for b in sizes}]
    blocked = ""
    for k in range(ROUNDS):
        order = sizes[::-1] if k % 2 == 0 else sizes
        this: dict[int, float] = {}
        for b in order:
            more = time_again(b)
            if not more:
                blocked = f"round {k + 2} could not time batch size {b}"
                break
            pooled[b].extend(more)
            this[b] = measurement(b, more, noisy).samples_per_second
        if blocked:
            break
        rounds.append(this)
    merged = dict(points) | {b: measurement(b, pooled[b], noisy) for b in sizes}
    ref = _best({b: merged[b] for b in sizes}).batch_size
    spread = {}
    for b in sizes:  # the standard error of the mean per-round ratio to the best
        ratios = [r[b] / r[ref] for r in rounds]
        spread[b] = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
    return Contest(merged, spread, rounds, sizes, blocked)


def _close(points: Mapping[int, Throughput], rule: PickRule, tolerance: float) -> list[int]:
    """Sizes whose ratio to the best lies within their relative IQRs of the rule's threshold."""
    best = _best(points)
    threshold = 1.0 if rule is PickRule.FASTEST else 1 - tolerance
    return [
        b
        for b, p in points.items()
        if b != best.batch_size
        and abs(p.samples_per_second / best.samples_per_second - threshold)
        <= _relative_iqr(p) + _relative_iqr(best)
    ]


def confidence(
    chosen: int,
    points: Mapping[int, Throughput],
    contest: Contest | None,
    rule: PickRule,
    tolerance: float,
) -> Confidence:
    """How sure the pick is.

    After interleaved rounds: ``"high"`` when in every round the pick's throughput was within
    ``tolerance`` of that round's fastest contender, ``"medium"`` in most rounds, else ``"low"``.
    Without rounds: ``"low"`` when only one size was timed, when the rounds found no time, or
    when the pick's or the best's timing is noisy; ``"medium"`` when some size is within its
    measured spread of the rule's threshold (too little throughput at stake for a round);
    else ``"high"``.
    """
    if len(points) == 1:
        return Confidence("low", f"only batch size {chosen} was timed: nothing to compare it with")
    if contest is not None and contest.contenders:
        return _from_rounds(chosen, contest, tolerance)
    for b in dict.fromkeys([chosen, _best(points).batch_size]):
        if points[b].noisy:
            return Confidence(
                "low",
                f"the timing of batch size {b} is noisy (IQR {_relative_iqr(points[b]):.0%} of "
                "the median): the machine was busy; run again when it is quiet",
            )
    close = _close(points, rule, tolerance)
    if close:
        return Confidence(
            "medium",
            f"batch size {sizes_text(sorted(close))} lies within its measured spread of the "
            f"pick rule's threshold, with too little throughput at stake for another round",
        )
    return Confidence(
        "high", "every timed size's margin to the pick rule's threshold exceeded its spread"
    )


def _from_rounds(chosen: int, contest: Contest, tolerance: float) -> Confidence:
    pct, names = f"{tolerance * 100:g}%", sizes_text(sorted(contest.contenders))
    if len(contest.rounds) == 1:
        return Confidence(
            "low",
            f"the pick hinges on sizes within their measured spread ({names}) and no "
            f"interleaved round could be timed ({contest.blocked})",
        )
    agree = sum(r.get(chosen, 0.0) >= (1 - tolerance) * max(r.values()) for r in contest.rounds)
    total = len(contest.rounds)
    level = "high" if agree == total else "medium" if 2 * agree > total else "low"
    share = statistics.median(r.get(chosen, 0.0) / max(r.values()) for r in contest.rounds)
    return Confidence(
        level,
        f"in {agree} of {total} interleaved rounds of {names}, batch size {chosen} was within "
        f"{pct} of that round's fastest (median {share:.1%} of it)",
    )
