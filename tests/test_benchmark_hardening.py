"""benchmarks/hardening.py: its figures are what the README's Reliability table says."""

from __future__ import annotations

import pytest
from scripts import benchmark_script


def test_cache_clear_keeps_every_file_that_is_not_its_own() -> None:
    with benchmark_script("hardening") as bench:
        handled, tried, wrong = bench.cache_clear_safety()
    assert wrong == [] and handled == tried == 6


@pytest.mark.slow
def test_every_section_handles_every_case() -> None:
    with benchmark_script("hardening") as bench:
        found = bench.figures()
    assert list(found) == list(bench.SECTIONS)
    assert {name: wrong for name, (_, _, wrong) in found.items() if wrong} == {}
    assert all(tried >= 2 for _, tried, _ in found.values())
