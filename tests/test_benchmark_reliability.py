"""benchmarks/reliability.py: its figures are what the README says (the matrix: test_faults.py)."""

from __future__ import annotations

import pytest
from scripts import benchmark_script


@pytest.mark.slow
def test_ooms_leak_nothing_and_every_real_oom_is_recognised() -> None:
    with benchmark_script("reliability") as bench:
        assert bench.leaks_after_ooms(trials=5) == (5, 0, 0)
        found, messages = bench.recognised()
    assert found == messages >= 17


def test_every_bad_input_gets_its_code_and_one_line() -> None:
    with benchmark_script("reliability") as bench:
        right, total, others = bench.bad_inputs()
    assert others == [] and right == total >= 24


@pytest.mark.slow
def test_no_non_oom_failure_is_taken_for_an_oom() -> None:
    with benchmark_script("reliability") as bench:
        assert bench.misclassified() == (0, len(bench.NON_OOM))
