"""Smoke test of benchmarks/probe_trials.py: both searches on one tiny workload, in-process."""

import pytest
import torch
from scripts import benchmark_script
from torch import nn

from maxbatch.errors import DoesNotFitError
from maxbatch.results import Trial


@pytest.fixture(scope="module")
def bench_module():
    with benchmark_script("probe_trials") as module:
        yield module


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 8))
    return model, torch.randn(4, 256)


@pytest.fixture(scope="module")
def row(bench_module, tiny):
    model, sample = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bench = bench_module.Workbench(name="tiny-mlp", model=model, sample=sample)
    result = bench_module.compare(bench, "512KiB")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model state changed"
    return result


@pytest.mark.slow
def test_both_find_the_same_ceiling_and_maxbatch_needs_no_more_trials(bench_module, row):
    assert row.ceiling == row.baseline_ceiling
    assert row.ceiling > 4 * 4  # well above the sample size: both searches have work to do
    assert row.maxbatch_trials <= row.baseline_trials
    assert row.to_dict()["trials_ratio"] >= 1
    # Each tool ran the ceiling (fits) and the size above it (does not fit).
    assert (row.ceiling, True) in row.maxbatch_sizes
    assert (row.ceiling + 1, False) in row.maxbatch_sizes
    assert (row.ceiling, True) in row.baseline_sizes
    assert (row.ceiling + 1, False) in row.baseline_sizes
    line = bench_module.format_row(row)
    assert line.startswith("tiny-mlp")
    assert str(row.ceiling) in line


def test_a_fresh_rerun_confirms_the_ceiling(row):
    # Trials at ceiling and ceiling + 1 as the first of a new virtual device: the measured peaks
    # must not depend on which sizes ran before (e.g. on the sample having been seen).
    assert row.verified, row.problems
    assert row.problems == ()


def _fake_run(ceiling):
    def run(b):
        return Trial(batch_size=b, fits=b <= ceiling, peak_bytes=100 * b, seconds=0.0)

    return run


@pytest.mark.parametrize(
    ("start", "ceiling", "sizes"),
    [
        (4, 37, [4, 8, 16, 32, 64, 48, 40, 36, 38, 37]),
        (4, 4, [4, 8, 6, 5]),
        (16, 5, [16, 8, 4, 6, 5]),  # the start does not fit: halve, then bisect
        (2, 1, [2, 1]),
    ],
)
def test_doubling_bisection_sizes(bench_module, start, ceiling, sizes):
    found, trials = bench_module.doubling_bisection(_fake_run(ceiling), start, usable_bytes=1000)
    assert found == ceiling
    assert [t.batch_size for t in trials] == sizes


def test_doubling_bisection_raises_when_nothing_fits(bench_module):
    with pytest.raises(DoesNotFitError, match="batch size 1 does not fit") as info:
        bench_module.doubling_bisection(_fake_run(0), 4, usable_bytes=1000)
    assert info.value.batch_size == 1
    assert info.value.available_bytes == 1000
