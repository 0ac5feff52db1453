"""The fault matrix (issue 11): every set-up x every fault leaves the state bit-identical.

The set-ups, faults and the record compared live in ``benchmarks/faults.py``, which
``benchmarks/reliability.py`` also runs for the README's figures.
"""

from __future__ import annotations

import pytest
from scripts import benchmark_script

with benchmark_script("faults") as faults:
    SETUPS, FAULTS = faults.SETUPS, faults.FAULTS

ENDINGS = {"success": "answer", "error": "WorkloadError", "interrupt": "KeyboardInterrupt"}


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_state_is_bit_identical_after_every_fault(setup: str, fault: str) -> None:
    with benchmark_script("faults") as bench:
        case = bench.SETUPS[setup]()
        before = bench.capture(case)
        ending = bench.run(case, fault)
        after = bench.capture(case)
        assert bench.differences(before, after) == []
    if fault in ENDINGS:
        assert ending == ENDINGS[fault]
    else:  # a budget too small: the best verified size so far, or none yet
        assert ending in ("answer", "DoesNotFitError")
