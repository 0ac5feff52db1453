"""Length buckets from a data set's lengths: the bins, each bucket's share, the histogram.

``bins_from_lengths(lengths, n)`` estimates bins the way lhotse estimates its duration bins: the
lengths sorted, cut so that every bucket holds about the same total length (so the same number of
tokens, not of items: a long-tailed set gets narrow buckets where most items are short). Each bin
is the longest length in its bucket, so the buckets' ceilings are verified at lengths that occur.
"""

from __future__ import annotations

from collections.abc import Sequence

from maxbatch.errors import ConfigError

#: Bars of the length histogram kept for the plot.
HISTOGRAM_BARS = 32


def parse_buckets(value: str) -> int | tuple[int, ...]:
    """``"8"`` (a number of buckets) or ``"64,128,256"`` (upper lengths) from the command line.

    Returns:
        The number of buckets, or the upper lengths.

    Raises:
        ConfigError: the value is neither.
    """
    parts = [p.strip() for p in value.split(",") if p.strip()]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if not numbers or any(n < 1 for n in numbers):
        raise ConfigError(
            f"--buckets {value!r}: give a number of buckets (8) or increasing upper lengths "
            "(64,128,256,512)"
        )
    return numbers[0] if len(value.split(",")) == 1 else tuple(numbers)


def bins_from_lengths(lengths: Sequence[int], buckets: int) -> tuple[int, ...]:
    """Upper lengths of ``buckets`` buckets holding about equal total length each.

    Returns:
        The distinct upper lengths, increasing (fewer than asked when lengths repeat).

    Raises:
        ConfigError: no lengths, or ``buckets`` < 1.
    """
    if buckets < 1:
        raise ConfigError(f"buckets={buckets}: need at least 1")
    ordered = sorted(lengths)
    if not ordered:
        raise ConfigError("a number of buckets needs the data set's lengths to cut them from")
    per_bucket = sum(ordered) / buckets
    bins: list[int] = []
    running = 0.0
    for length in ordered:
        running += length
        if running >= per_bucket * (len(bins) + 1) and len(bins) < buckets - 1:
            bins.append(length)
    bins.append(ordered[-1])
    return tuple(sorted(set(bins)))


def check_bins(bins: Sequence[int]) -> tuple[int, ...]:
    """Upper lengths given by the user, checked.

    Returns:
        The bins as a tuple.

    Raises:
        ConfigError: empty, below 1, or not strictly increasing.
    """
    out = tuple(int(b) for b in bins)
    if not out or out[0] < 1 or any(a >= b for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(f"bucket upper lengths {list(out)}: need increasing lengths >= 1")
    return out


def shares(lengths: Sequence[int], bins: Sequence[int]) -> list[tuple[int, int]]:
    """Per bucket: (its shortest length, how many items fall in it).

    An item falls in the first bucket whose upper length holds it; items longer than the last
    are in none. Without lengths the shortest length is the previous bin plus one.

    Returns:
        One (min_length, items) per bin.
    """
    rows: list[tuple[int, int]] = []
    low = 0
    for upper in bins:
        inside = (
            [n for n in lengths if low < n <= upper] if low else [n for n in lengths if n <= upper]
        )
        rows.append((min(inside) if inside else (low + 1 if low else 0), len(inside)))
        low = upper
    return rows


def histogram(
    lengths: Sequence[int], bars: int = HISTOGRAM_BARS
) -> tuple[tuple[int, int, int], ...]:
    """The lengths in equal-width bars: (low, high, count), both ends inclusive.

    Returns:
        The bars (empty without lengths).
    """
    if not lengths:
        return ()
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bars))
    counts: dict[int, int] = {}
    for n in lengths:
        k = (n - low) // width
        counts[k] = counts.get(k, 0) + 1
    return tuple(
        (low + k * width, min(high, low + (k + 1) * width - 1), counts.get(k, 0))
        for k in range((high - low) // width + 1)
    )
