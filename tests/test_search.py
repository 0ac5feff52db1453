"""The ceiling search driven by deterministic memory curves (no torch)."""

from __future__ import annotations

import math

import pytest

from maxbatch.errors import ConfigError, DoesNotFitError
from maxbatch.grid import Grid
from maxbatch.results import Trial
from maxbatch.search.bracket import fit_memory_model
from maxbatch.search.probe import search
from maxbatch.settings import SearchSettings


def curve(fixed: float, per: float, cap: float, flat: float = 0.0):
    """A step whose peak is max(flat, fixed + per * b), failing above ``cap``."""
    calls: list[int] = []

    def run(b: int) -> Trial:
        calls.append(b)
        peak = int(max(flat, fixed + per * b))
        return Trial(batch_size=b, fits=peak <= cap, peak_bytes=peak, seconds=0.01, oom=peak > cap)

    run.calls = calls  # type: ignore[attr-defined]
    return run


def truth(fixed: float, per: float, cap: float, m: int = 1, upper: int | None = None) -> int:
    c = (math.floor((cap - fixed) / per) // m) * m
    return c if upper is None else min(c, (upper // m) * m)


CASES = [
    # fixed, per, cap, start, multiple_of, max
    (1e6, 1000, 2e6, 1, 1, None),
    (1e8, 12345, 3e9, 32, 1, None),
    (1e8, 12345, 3e9, 32, 8, None),
    (5e6, 3000, 9e6, 64, 1, None),
    (5e6, 3000, 9e6, 4096, 1, None),
    (1e6, 1, 1e12, 1, 1, None),
    (2e6, 1000, 1e9, 8, 1, 5000),
    (2e6, 1000, 1e9, 8, 64, None),
]


@pytest.mark.parametrize(("fixed", "per", "cap", "start", "m", "upper"), CASES)
def test_exact_and_verified(fixed, per, cap, start, m, upper) -> None:
    run = curve(fixed, per, cap)
    out = search(
        run,
        start=start,
        usable_bytes=int(cap),
        base_bytes=int(fixed * 0.3),
        settings=SearchSettings(grid=Grid(multiple_of=m, max_batch_size=upper)),
    )
    expected = truth(fixed, per, cap, m, upper)
    assert out.ceiling == expected
    tried = {t.batch_size: t.fits for t in out.trials}
    assert tried[out.ceiling] is True
    if upper is None or out.ceiling < (upper // m) * m:
        assert tried[out.ceiling + m] is False
    assert all(t.batch_size % m == 0 for t in out.trials)
    assert out.complete


@pytest.mark.parametrize(
    ("fixed", "per", "cap", "start"),
    [(1e8, 12345, 3e9, 32), (5e6, 3000, 9e6, 64), (1e6, 1000, 2e6, 1), (1e6, 1, 1e12, 1)],
)
def test_four_trials_when_memory_is_affine(fixed, per, cap, start) -> None:
    out = search(
        curve(fixed, per, cap), start=start, usable_bytes=int(cap), base_bytes=int(fixed * 0.3)
    )
    assert len(out.trials) <= 4


def test_convex_curve_still_exact() -> None:
    # a constant optimizer-step peak dominates small batches
    out = search(
        curve(5e6, 3000, 9e6, flat=8e6), start=2, usable_bytes=int(9e6), base_bytes=1_500_000
    )
    assert out.ceiling == 1333
    assert len(out.trials) < 25


def test_start_too_big_halves_then_finds() -> None:
    out = search(curve(5e6, 3000, 9e6), start=4096, usable_bytes=int(9e6), base_bytes=0)
    assert out.ceiling == 1333
    assert [t.batch_size for t in out.trials][:3] == [4096, 2048, 1024]


def test_nothing_fits() -> None:
    with pytest.raises(DoesNotFitError, match="batch size 1 does not fit") as info:
        search(curve(5e6, 3000, 4e6), start=8, usable_bytes=int(4e6))
    assert info.value.batch_size == 1
    assert info.value.needed_bytes >= 5_000_000
    assert info.value.available_bytes == 4_000_000


def test_min_batch_size_is_never_undercut() -> None:
    run = curve(5e6, 3000, 9e6)
    with pytest.raises(DoesNotFitError):
        search(
            run,
            start=4096,
            usable_bytes=int(9e6),
            settings=SearchSettings(grid=Grid(min_batch_size=2000)),
        )
    assert min(run.calls) == 2000


def test_max_batch_size_stops_without_failure() -> None:
    out = search(
        curve(1e6, 10, 1e12),
        start=4,
        usable_bytes=int(1e12),
        settings=SearchSettings(grid=Grid(max_batch_size=100)),
    )
    assert out.ceiling == 100
    assert all(t.fits for t in out.trials)
    assert out.stop_reason == "reached the maximum batch size 100"


def test_time_budget_returns_best_verified() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    out = search(
        curve(5e6, 3000, 9e6, flat=8e6),
        start=2,
        usable_bytes=int(9e6),
        settings=SearchSettings(time_budget=3.5),
        clock=clock,
    )
    assert not out.complete
    assert "time budget" in out.stop_reason
    assert {t.batch_size: t.fits for t in out.trials}[out.ceiling] is True


def test_bad_grid() -> None:
    with pytest.raises(ConfigError, match="multiple of 64"):
        search(
            curve(1, 1, 100),
            start=1,
            usable_bytes=100,
            settings=SearchSettings(grid=Grid(max_batch_size=50, multiple_of=64)),
        )


def test_fit_memory_model_uses_two_largest() -> None:
    trials = [
        Trial(batch_size=b, fits=True, peak_bytes=int(1000 + 10 * b), seconds=0.0)
        for b in (4, 100, 200)
    ]
    trials.append(Trial(batch_size=400, fits=False, peak_bytes=10**9, seconds=0.0, oom=True))
    model = fit_memory_model(trials)
    assert model is not None
    assert model.bytes_per_sample == pytest.approx(10)
    assert model.fixed_bytes == pytest.approx(1000)
    assert fit_memory_model(trials[:1]) is None
    flat = [Trial(batch_size=b, fits=True, peak_bytes=5000, seconds=0.0) for b in (1, 2)]
    assert fit_memory_model(flat) is None


@pytest.mark.parametrize(
    ("guess_offset", "trials"),
    [
        # each adds one trial at the start size, so the memory model has two measured points
        (0, 3),  # right: the guess fits, the size above does not
        (1, 3),  # one too high: it fails, the size below fits
        (-1, 3),  # one too low: the size above fits too, then the next one fails
    ],
)
def test_a_first_guess_near_the_ceiling_takes_three_trials(guess_offset, trials) -> None:
    fixed, per, cap = 1e8, 12345, 3e9
    expected = truth(fixed, per, cap)
    out = search(
        curve(fixed, per, cap),
        start=32,
        usable_bytes=int(cap),
        first_guess=expected + guess_offset,
    )
    assert out.ceiling == expected
    assert len(out.trials) == trials
    tried = {t.batch_size: t.fits for t in out.trials}
    assert tried[expected] is True and tried[expected + 1] is False
    assert out.memory_model is not None and out.memory_model.bytes_per_sample == pytest.approx(per)


@pytest.mark.parametrize("guess", [10, 5_000, 10**9])
def test_a_wrong_first_guess_still_ends_exact(guess) -> None:
    fixed, per, cap = 1e8, 12345, 3e9
    out = search(curve(fixed, per, cap), start=32, usable_bytes=int(cap), first_guess=guess)
    assert out.ceiling == truth(fixed, per, cap)


def test_a_first_guess_respects_the_grid_and_the_maximum() -> None:
    fixed, per, cap = 2e6, 1000, 1e9
    out = search(
        curve(fixed, per, cap),
        start=8,
        usable_bytes=int(cap),
        settings=SearchSettings(grid=Grid(multiple_of=64, max_batch_size=5000)),
        first_guess=truth(fixed, per, cap),
    )
    assert out.ceiling == (5000 // 64) * 64
    assert all(t.batch_size % 64 == 0 and t.batch_size <= 5000 for t in out.trials)
    assert [t.batch_size for t in out.trials] == [4992, 64]  # the maximum, then the start size
