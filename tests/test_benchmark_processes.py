"""benchmarks/processes.py (reliability section 5): the in-process sections hold in full."""

from __future__ import annotations

from scripts import benchmark_script


def test_absurd_sizes_meta_models_and_linked_report_parents_are_all_handled() -> None:
    with benchmark_script("processes") as bench:
        for section in (bench.absurd_sizes, bench.meta_models, bench.report_link_parents):
            handled, tried, wrong = section()
            assert wrong == [] and handled == tried > 0, section.__name__
