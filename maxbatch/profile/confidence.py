"""How sure a pick is: the confidence levels and the rules for a pick made without rounds.

The rounds' own confidence is :func:`maxbatch.profile.contest.decide`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from maxbatch.profile.pick import sizes_text
from maxbatch.results import Throughput
from maxbatch.settings import PickRule


class Contenders(Protocol):
    """What :func:`confidence` reads of a contest whose rounds could not be timed."""

    @property
    def contenders(self) -> Sequence[int]:
        """The sizes that could each be the pick."""
        ...

    @property
    def blocked(self) -> str:
        """Why their rounds were not timed."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Confidence:
    """How sure the pick is: ``"high"``, ``"medium"`` or ``"low"``, and why."""

    level: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return the confidence as a JSON-ready dict."""
        return dataclasses.asdict(self)


def relative_iqr(p: Throughput) -> float:
    """The spread of a point's replicates: IQR / median."""
    return p.iqr_seconds / p.median_seconds


def best_point(points: Mapping[int, Throughput]) -> Throughput:
    """The fastest point (the smaller size on a tie)."""
    return max(points.values(), key=lambda p: (p.samples_per_second, -p.batch_size))


def _close(points: Mapping[int, Throughput], rule: PickRule, tolerance: float) -> list[int]:
    """Sizes whose ratio to the best lies within their relative IQRs of the rule's threshold."""
    best = best_point(points)
    threshold = 1.0 if rule is PickRule.FASTEST else 1 - tolerance
    return [
        b
        for b, p in points.items()
        if b != best.batch_size
        and abs(p.samples_per_second / best.samples_per_second - threshold)
        <= relative_iqr(p) + relative_iqr(best)
    ]


def confidence(
    chosen: int,
    points: Mapping[int, Throughput],
    rule: PickRule,
    tolerance: float,
    *,
    contest: Contenders | None = None,
) -> Confidence:
    """How sure a pick made without (complete) interleaved rounds is.

    ``"low"`` when only one size was timed, when every timed size is noisy, when the pick's or
    the best's timing is noisy, or when rounds were wanted but none could be timed;
    ``"medium"`` when some size is within its measured spread of the rule's threshold but too
    little throughput is at stake for a round; else ``"high"``.

    Returns:
        The level and why.
    """
    if len(points) == 1:
        return Confidence(
            level="low", reason=f"only batch size {chosen} was timed: nothing to compare it with"
        )
    if all(p.noisy for p in points.values()):
        worst = max(relative_iqr(p) for p in points.values())
        return Confidence(
            level="low",
            reason=f"every timed size is noisy (IQR up to {worst:.0%} of the median): the "
            "machine was busy; run again when it is quiet",
        )
    if contest is not None:
        names = sizes_text(sorted(contest.contenders))
        return Confidence(
            level="low",
            reason=f"sizes {names} could each be the pick and no interleaved round of them fitted "
            f"({contest.blocked}): the pick compares sizes timed at different times",
        )
    for b in dict.fromkeys([chosen, best_point(points).batch_size]):
        if points[b].noisy:
            return Confidence(
                level="low",
                reason=f"the timing of batch size {b} is noisy (IQR "
                f"{relative_iqr(points[b]):.0%} of the median): the machine was busy; run again "
                "when it is quiet",
            )
    close = _close(points, rule, tolerance)
    if close:
        names, many = sizes_text(sorted(close)), len(close) > 1
        return Confidence(
            level="medium",
            reason=f"batch size{'s' if many else ''} {names} {'are' if many else 'is'} within "
            f"{'their' if many else 'its'} timing spread of the rule's threshold, but less "
            "than the tolerance is at stake, so no interleaved rounds were run",
        )
    return Confidence(
        level="high", reason="every timed size's margin to the rule's threshold exceeds its spread"
    )
