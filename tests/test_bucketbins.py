"""Bucket bins from lengths, the command line's --buckets, the fit's arithmetic (pure, fast)."""

from __future__ import annotations

import pytest

from maxbatch import ConfigError
from maxbatch.run.lengths import _next
from maxbatch.search.bucketbins import (
    bins_from_lengths,
    check_bins,
    histogram,
    parse_buckets,
    shares,
)
from maxbatch.search.lengthmodel import LengthFit, Point


def test_bins_hold_about_equal_total_length() -> None:
    lengths = [10] * 100 + [100] * 10  # 1000 tokens short, 1000 long
    assert bins_from_lengths(lengths, 2) == (10, 100)
    assert bins_from_lengths([5, 5, 5], 4) == (5,)  # repeated lengths: fewer buckets


@pytest.mark.parametrize(
    ("text", "expected"), [("8", 8), ("64,128,256", (64, 128, 256)), ("64,", (64,))]
)
def test_parse_buckets(text: str, expected: object) -> None:
    assert parse_buckets(text) == expected


@pytest.mark.parametrize("text", ["", "x", "0", "64,abc"])
def test_parse_buckets_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--buckets"):
        parse_buckets(text)


def test_check_bins_needs_increasing_lengths() -> None:
    with pytest.raises(ConfigError, match="increasing"):
        check_bins([64, 32])


def test_shares_and_histogram_count_every_item_once() -> None:
    lengths = [1, 2, 3, 8, 9, 30]
    assert shares(lengths, (3, 9, 30)) == [(1, 3), (8, 2), (30, 1)]
    bars = histogram(lengths, bars=4)
    assert sum(n for _, _, n in bars) == len(lengths)
    assert bars[0][0] == 1 and bars[-1][1] == 30


def _peak(b: int, n: int) -> int:
    return 1000 + b * (7 + 3 * n + 2 * n * n)


def test_the_fit_is_exact_for_quadratic_peaks_once_three_lengths_are_seen() -> None:
    fit = LengthFit(usable_bytes=50_000)
    for b, n in [(1, 8), (2, 8), (1, 16), (3, 32)]:
        fit.add(Point(batch_size=b, length=n, peak_bytes=_peak(b, n), trace=None))
    for n in (4, 12, 40):
        brute = max(b for b in range(1, 10_000) if _peak(b, n) <= 50_000)
        assert fit.ceiling(n, limit=10_000) == brute
    model = fit.model()
    assert model is not None
    assert model.bytes_per_token_pair == pytest.approx(2.0)
    assert fit.max_length(3, step=1, limit=1000) == max(
        n for n in range(1, 1000) if _peak(3, n) <= 50_000
    )


@pytest.mark.parametrize(
    ("lo", "hi", "guess", "tried", "missed", "expected"),
    [
        (10, 20, 15, 0, False, 15),  # the model's guess
        (10, 20, 10, 0, False, 11),  # it says lo: verify lo + 1
        (10, 20, 25, 0, False, 15),  # beyond a known failure: bisect
        (10, 20, 19, 0, True, 15),  # creeping below the failure it just caused: bisect
        (10, 20, 15, 9, False, 15),  # past FOLLOW_MODEL: bisect
        (4, 1 << 30, None, 0, False, 8),  # no failure, no guess: double
        (4, 1 << 30, 10**9, 0, False, 64),  # no failure: a wild guess is held back
    ],
)
def test_next_point(
    lo: int, hi: int, guess: int | None, tried: int, missed: bool, expected: int
) -> None:
    assert _next(lo, hi, guess, tried=tried, missed=missed) == expected
