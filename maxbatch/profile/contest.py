"""Interleaved rounds between every size that can win, and how sure the pick is.

Sizes timed one after another meet different load, so a pick decided by a difference smaller
than the timing noise follows the load, not the step. The noise rules of the pick, in one place:

1. **Who can win.** After the search, every timed size whose throughput, give or take its
   measured spread (the IQR of its replicates), could make it the pick is a contender.
2. **Same rounds or no comparison.** When more than one size can win, all of them (up to
   :data:`MAX_CONTENDERS`, the likeliest first) are timed again in :data:`ROUNDS` interleaved
   rounds, the order reversed each round so that load hits them alike. The pick is decided on
   the rounds alone: first-pass replicates, timed in another period, are never pooled with
   them, and a size outside the rounds is never the pick.
3. **Ties by median, never by spread.** Sizes tie only when their median throughputs are within
   the tolerance (the rule then takes the smaller), never merely because their spreads overlap.
4. **Confidence.** ``high`` when the pick met the rule in every round, ``medium`` in most; when
   the rounds cannot separate the sizes, the pick is the fastest median and the confidence is
   ``low``, as it is when every timed size is noisy, when one size was timed, or when no round
   found time in the budget (:mod:`maxbatch.profile.confidence`).

This module is pure: it sees the timed points and a ``time_again(b)`` function.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence

from maxbatch.profile.confidence import Confidence, best_point, relative_iqr
from maxbatch.profile.pick import pick, sizes_text
from maxbatch.profile.timing import NOISY, measurement
from maxbatch.results import Throughput
from maxbatch.settings import PickRule

ROUNDS = 3  #: interleaved rounds of the contenders, after the search
MAX_CONTENDERS = 4  #: at most this many sizes in the rounds (the likeliest winners first)

TimeAgain = Callable[[int], "Sequence[float] | None"]  # None: no time (budget) or out of memory


@dataclasses.dataclass(frozen=True, kw_only=True)
class Contest:
    """What the interleaved rounds measured.

    Attributes:
        points: the contenders, measured on the complete rounds' replicates only.
        spread: by contender, the standard error of its per-round throughput ratio to the best.
        rounds: per complete round, the throughput of each contender.
        contenders: the sizes timed in the rounds.
        blocked: why rounds were cut short, or "".
        left_out: sizes that could win but did not fit in the rounds (:data:`MAX_CONTENDERS`).
    """

    points: dict[int, Throughput]
    spread: dict[int, float]
    rounds: list[dict[int, float]]
    contenders: list[int]
    blocked: str = ""
    left_out: tuple[int, ...] = ()


def _lo(p: Throughput, floor: float = 0.0) -> float:
    return p.samples_per_second * (1 - max(relative_iqr(p), floor))


def _hi(p: Throughput, floor: float = 0.0) -> float:
    return p.samples_per_second * (1 + max(relative_iqr(p), floor))


def can_win(
    points: Mapping[int, Throughput], chosen: int, rule: PickRule, tolerance: float
) -> list[int]:
    """Every timed size that could be the pick, give or take the spreads; the likeliest first.

    ``"fastest"``: the best, and every size that may be more than the tolerance faster than the pick
    (a smaller difference leaves both within the tolerance of each other). ``"within"``: the pick;
    every smaller size that may be within the tolerance of the best after all; and, when the pick
    itself may not be within it, every larger size that may be. Sizes whose spread cannot reach the
    rule's threshold are out: they cannot win. The best is always among them (it sets the threshold)
    when there is more than one. On a busy machine (some size timed noisy) a size's spread is at
    least :data:`~maxbatch.profile.timing.NOISY` of its throughput: load that changes between
    timings moves whole timings, which no single timing's IQR shows.

    Returns:
        The sizes, the best first, then by optimistic throughput; just ``[chosen]`` (or the
        best and the pick) when the pick does not hinge on the spread.
    """
    best, me = best_point(points), points[chosen]
    busy = NOISY if any(p.noisy for p in points.values()) else 0.0
    if rule is PickRule.FASTEST:
        edge = _lo(me, busy) * (1 + tolerance)
        out = [b for b, p in points.items() if b != chosen and _hi(p, busy) > edge]
    else:
        edge = (1 - tolerance) * _lo(best, busy)
        unsure = chosen != best.batch_size and _lo(me, busy) < (1 - tolerance) * _hi(best, busy)
        out = [
            b
            for b, p in points.items()
            if b != chosen and _hi(p, busy) >= edge and (b < chosen or unsure)
        ]
    if not out:
        return [chosen]
    rest = sorted(out, key=lambda b: -_hi(points[b], busy))
    return list(dict.fromkeys([best.batch_size, chosen, *rest]))


def contenders(
    points: Mapping[int, Throughput], chosen: int, rule: PickRule, tolerance: float
) -> list[int]:
    """The sizes for the interleaved rounds: :func:`can_win`, at most :data:`MAX_CONTENDERS`.

    Returns:
        The contenders, the best first; empty when only the pick can win.
    """
    sizes = can_win(points, chosen, rule, tolerance)
    return sizes[:MAX_CONTENDERS] if len(sizes) > 1 else []


def run_rounds(
    sizes: list[int],
    time_again: TimeAgain,
    noisy: float,
    left_out: Sequence[int] = (),
    *,
    room: Callable[[Sequence[int]], str | None] | None = None,
) -> Contest:
    """Time ``sizes`` in :data:`ROUNDS` interleaved rounds, the order reversed each round.

    Only complete rounds count, and only their replicates are pooled: the first pass, timed in
    another period, is left out of the comparison. ``room(sizes)`` says why a whole round does
    not fit (the budget), or None; a round that does not fit is not started, and when not even
    the first round fits, the least likely winners (the last of ``sizes``, at least two stay)
    are left out of the rounds to make room: they can then not be the pick.

    Returns:
        The complete rounds, the contenders measured on them and what blocked a round, if any.
    """
    sizes, left_out = list(sizes), list(left_out)
    while room is not None and len(sizes) > 2 and room(sizes) is not None:
        left_out.insert(0, sizes.pop())  # the least likely winner makes room for a round
    pooled: dict[int, list[float]] = {b: [] for b in sizes}
    rounds: list[dict[int, float]] = []
    blocked = ""
    for k in range(ROUNDS):
        order = sizes[::-1] if k % 2 == 0 else sizes
        if room is not None and (why := room(sizes)) is not None:
            blocked = f"round {k + 1} of {ROUNDS} was not started: {why}"
            break
        this: dict[int, list[float]] = {}
        for b in order:
            more = time_again(b)
            if not more:
                blocked = f"round {k + 1} of {ROUNDS} could not time batch size {b}"
                break
            this[b] = list(more)
        if blocked:
            break
        for b, more in this.items():
            pooled[b].extend(more)
        rounds.append({b: measurement(b, this[b], noisy).samples_per_second for b in sizes})
    merged = {b: measurement(b, pooled[b], noisy) for b in sizes} if rounds else {}
    spread = {}
    if merged:
        ref = best_point(merged).batch_size
        for b in sizes:  # the standard error of the mean per-round ratio to the best
            ratios = [r[b] / r[ref] for r in rounds]
            spread[b] = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
    return Contest(
        points=merged,
        spread=spread,
        rounds=rounds,
        contenders=sizes,
        blocked=blocked,
        left_out=tuple(left_out),
    )


def _agree(b: int, contest: Contest, tolerance: float) -> int:
    """In how many rounds ``b`` was within ``tolerance`` of that round's fastest."""
    return sum(r[b] >= (1 - tolerance) * max(r.values()) for r in contest.rounds)


def decide(contest: Contest, rule: PickRule, tolerance: float) -> tuple[int, str, Confidence]:
    """The pick from the interleaved rounds alone, why, and how sure it is.

    The rule picks on the rounds' medians. When the pick met the rule (within ``tolerance`` of
    the round's fastest) in every round: ``high``; in most: ``medium``. Otherwise the rounds
    cannot separate the sizes: the pick is the fastest median, ``low``.

    Returns:
        The batch size, the reason and the confidence.
    """
    points = list(contest.points.values())
    chosen, reason = pick(points, rule=rule, tolerance=tolerance)
    total, names = len(contest.rounds), sizes_text(sorted(contest.contenders))
    agree = _agree(chosen, contest, tolerance)
    pct = f"{tolerance * 100:g}%"
    where = f"{total} interleaved round{'s' if total > 1 else ''} of {names}"
    if 2 * agree <= total:
        fastest, why = pick(points, rule=PickRule.FASTEST, tolerance=0.0)
        sure = Confidence(
            level="low",
            reason=f"in {where}, batch size {chosen} was within {pct} of the round's fastest in "
            f"only {agree} of them: the rounds cannot separate the sizes, so the pick is the "
            "fastest median",
        )
        return fastest, f"by {where}: {why}", sure
    level = "high" if agree == total and total > 1 else "medium"
    sure = Confidence(
        level=level,
        reason=f"in {agree} of {where}, batch size {chosen} was within {pct} of that round's "
        "fastest",
    )
    return chosen, f"by {where}: {reason}", sure
