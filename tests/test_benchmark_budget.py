"""benchmarks/profiler_budget.py: a row per example, with the profiler's time and budget."""

import pytest
from scripts import benchmark_script


@pytest.mark.slow
def test_a_row_says_the_profilers_time_and_the_budget_it_printed() -> None:
    with benchmark_script("profiler_budget") as bench:
        row = bench.probe("noise_scale", ["--memory", "200MiB", "--max-batch", "256"])
    assert row["ceiling"] >= row["pick"] >= 1
    assert row["trials"] >= 2 and row["trial_seconds"] > 0
    assert row["budget_seconds"] is not None
    assert row["within"] is (row["profiler_seconds"] <= row["budget_seconds"])
    assert 0 < row["share"] < 1


def test_the_old_printed_limit_is_read_from_the_reasons() -> None:
    with benchmark_script("profiler_budget") as bench:
        found = bench.PRINTED.findall(
            "timing it (about 69.8 s) would take the profiler past 78.2 s: the larger of ...; "
            "would take the profiler past its budget of 25.7 s"
        )
    assert found == ["78.2", "25.7"]
