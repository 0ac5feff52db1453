"""The pick: which of the timed batch sizes to use, and why."""

from __future__ import annotations

import enum
from collections.abc import Sequence

from maxbatch.errors import ConfigError
from maxbatch.results import Throughput

TOLERANCE = 0.02  #: the "within" pick: the smallest size within 2 % of the best throughput


class PickRule(str, enum.Enum):
    """How the batch size is picked from the timed sizes."""

    WITHIN = "within"  # the smallest size within the tolerance of the best throughput
    FASTEST = "fastest"  # the best throughput outright


def check_pick(rule: PickRule | str, tolerance: float) -> PickRule:
    """Validate the pick rule and tolerance at the boundary, before touching the device.

    Returns:
        The rule.

    Raises:
        ConfigError: the rule is not ``"within"`` or ``"fastest"``, or the tolerance is not a
            number in ``[0, 1)``.
    """
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not 0 <= tolerance < 1
    ):
        raise ConfigError(f"tolerance={tolerance!r} must be a number in [0, 1), e.g. 0.02 for 2 %")
    try:
        return PickRule(str(getattr(rule, "value", rule)).lower())
    except ValueError:
        raise ConfigError(f"pick={rule!r} is not valid; choose one of: within, fastest") from None


def sizes_text(sizes: Sequence[int]) -> str:
    """``1, 2, 4`` for a few sizes; the first and last three around an ellipsis for many."""
    shown = [str(b) for b in sizes]
    if len(shown) > 8:
        shown = [*shown[:3], "...", *shown[-3:]]
    return ", ".join(shown)


def pick(
    points: Sequence[Throughput],
    *,
    rule: PickRule | str = "within",
    tolerance: float = TOLERANCE,
) -> tuple[int, str]:
    """Pick a batch size from timed sizes and say why.

    Sizes tie only when their median throughputs are within the tolerance, never merely because
    their spreads overlap (:mod:`maxbatch.contest` decides what the spreads allow).

    Args:
        points: the timed sizes.
        rule: ``"within"`` (default): the smallest size whose median throughput is within
            ``tolerance`` of the best timed; ``"fastest"``: the best outright (the smaller size
            on an exact tie).
        tolerance: the share of the best throughput ``"within"`` may give up (default 2 %).

    Returns:
        The batch size and the reason, a sentence that names the sizes timed.

    Raises:
        ConfigError: the rule or tolerance is invalid.
        ValueError: ``points`` is empty.
    """
    chosen_rule = check_pick(rule, tolerance)
    if not points:
        raise ValueError("no batch size was timed, so there is nothing to pick from")
    best = max(points, key=lambda p: (p.samples_per_second, -p.batch_size))
    timed = sorted(p.batch_size for p in points)
    rate = f"{best.samples_per_second:,.1f} samples/s"
    count = f"{len(timed)} sizes timed ({sizes_text(timed)})" if len(timed) > 1 else "size timed"
    give_up = tolerance if chosen_rule is PickRule.WITHIN else 0.0
    floor = (1 - give_up) * best.samples_per_second
    chosen = min((p for p in points if p.samples_per_second >= floor), key=lambda p: p.batch_size)
    pct = f"{tolerance * 100:g}%"
    if len(timed) == 1:
        reason = f"the only size timed ({rate})"
    elif chosen is best and chosen_rule is PickRule.FASTEST:
        reason = f"the fastest of the {count}: {rate}"
    elif chosen is best:
        reason = f"the fastest of the {count}: {rate}; no smaller size timed was within {pct} of it"
    else:
        share = chosen.samples_per_second / best.samples_per_second
        target = f"within {pct} of" if chosen_rule is PickRule.WITHIN else "as fast as"
        reason = (
            f"the smallest of the {count} {target} the fastest: {share:.1%} of the {rate} of "
            f"batch size {best.batch_size}"
        )
    if chosen.noisy:
        noise = chosen.iqr_seconds / chosen.median_seconds
        reason += f"; its timing is noisy (IQR {noise:.0%} of the median)"
    return chosen.batch_size, reason
