"""benchmarks/profiler_pick.py: the curves of known shape meet their targets, in-process."""

import pytest
from scripts import benchmark_script

from maxbatch.settings import TOLERANCE


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("profiler_pick") as module:
        yield module


def test_noise_free_curves_meet_the_target(bench) -> None:
    rows = [r for r in bench.run_curves(seeds=1) if r["noise"] == 0]
    assert len(rows) == 32  # 4 shapes x 4 ceilings x 2 rules
    for r in rows:
        # "fastest" finds the best; "within" gives up at most its 2 % tolerance.
        assert r["pick_over_best"] >= (1.0 if r["rule"] == "fastest" else 0.98) - 1e-9, r
        # At ceiling 70 (11 candidates) the top and the size below it, always timed, are
        # already 30 to 45 % of timing every size; above it the search stays under 25 %.
        limit = 0.5 if r["curve"].endswith("@70") else bench.SHARE
        assert r["time_share"] <= limit, r


def test_the_target_holds_under_one_percent_noise(bench) -> None:
    rows = [r for r in bench.run_curves(seeds=5) if r["noise"] == 0.01 and r["rule"] == "fastest"]
    picks = [r["pick_over_best"] >= bench.TARGET for r in rows]
    assert sum(picks) >= 0.95 * len(rows)
    assert min(r["pick_over_best"] for r in rows) >= 0.95
    above = [r["time_share"] <= bench.SHARE for r in rows if not r["curve"].endswith("@70")]
    assert sum(above) >= 0.9 * len(above)


def test_rising_curves_at_small_ceilings_pick_within_the_tolerance(bench) -> None:
    """Issue 10: GPU-like step times a + c*b at ceilings 2 to 64, on a seeded clock."""
    rows = bench.run_curves(seeds=5, ceilings=bench.SMALL, family=bench.gpu_shapes)
    clean = [r for r in rows if r["noise"] == 0]
    assert len(clean) == 8 * 3 * 2  # ceilings x curves x rules
    for r in clean:
        assert r["pick_over_best"] >= 1 - TOLERANCE - 1e-9, r
        assert r["confidence"] == "high", r
        assert r["over_probe"] <= 3.0, r  # the probe's time is the scale of the cost rule
    quiet = [r for r in rows if r["noise"] == 0.01]
    within = [r["pick_over_best"] >= 1 - TOLERANCE - 1e-9 for r in quiet]
    assert sum(within) >= 0.97 * len(quiet)
    assert min(r["pick_over_best"] for r in quiet) >= 0.95


def test_the_real_replay_judges_on_held_out_sweeps(bench) -> None:
    # Two sweeps of three sizes: the second is the truth for the first and the other way round.
    sizes = [1, 2, 4]

    def fast(b: int) -> tuple[list[float], float]:  # 1000 samples/s
        return [0.001 * b] * 5, 0.01 * b

    def slow(b: int) -> tuple[list[float], float]:  # 500 samples/s
        return [0.002 * b] * 5, 0.02 * b

    data = {
        "model": "m",
        "cap": "c",
        "ceiling": 4,
        "sizes": sizes,
        "prior": {},
        "probe_seconds": 0.0,
        "sweeps": [
            {1: slow(1), 2: fast(2), 4: slow(4)},
            {1: fast(1), 2: slow(2), 4: fast(4)},
        ],
    }
    rows = bench.judge_real(data)
    assert len(rows) == 4
    first = [r for r in rows if r["sweep"] == 0 and r["rule"] == "fastest"][0]
    # In sweep 0 only 2 runs at full speed (1000 samples/s), so it is that sweep's best; held
    # out (sweep 1), 2 runs at half speed while 1 and 4 run at full speed.
    assert first["sweep_best"] == 2
    assert first["sweep_best_over_held_out_best"] == pytest.approx(0.5)
    assert 0 < first["time_share"] <= 1
