"""Few real trials (issue 10): traces operator by operator, the batch check, honest failures."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from scripts import benchmark_script
from torch import nn

from maxbatch import BatchSizeMismatchError, DoesNotFitError, find_batch_size
from maxbatch.cli import main
from maxbatch.memtrace import MemoryTrace, ceiling_from_lines, ceiling_from_shapes
from maxbatch.results import Trial
from maxbatch.search.probe import search


def _trace(b: int, live: list[int], batched: list[int], complete: bool = True) -> MemoryTrace:
    return MemoryTrace(batch_size=b, live=tuple(live), batched=tuple(batched), complete=complete)


# -- the predictions from traces -------------------------------------------------------------


def test_lines_are_exact_where_the_peak_bends() -> None:
    # op 0: the optimizer step, fixed 1000 B; op 1: activations, 100 + 10 B per sample.
    def live(b: int) -> list[int]:
        return [1000, 100 + 10 * b]

    low, high = _trace(4, live(4), [0, 40]), _trace(8, live(8), [0, 80])
    # the peak is flat at 4 and 8 (1000 B): a fit of the peak alone sees no growth at all
    assert ceiling_from_lines(low, high, 2000) == 190  # 100 + 10 * 190 = 2000
    assert ceiling_from_shapes(low, 2000) == 190
    assert ceiling_from_lines(low, _trace(8, live(8)[:1], [0]), 2000) is None  # other ops
    assert ceiling_from_lines(low, _trace(4, live(4), [0, 40]), 2000) is None  # same size


def test_a_failed_trace_gives_lines_up_to_the_refused_operator() -> None:
    low = _trace(4, [500, 1000, 100 + 10 * 4], [0, 0, 40])
    # at 400 the first operator was refused (4460 B would have been live)
    failed = _trace(400, [500 + 10 * 396], [3960], complete=False)
    # op 0 grows by 10 B per sample: 500 + 10 * (b - 4) <= 2000 up to 154; op 2, not reached,
    # comes from the shape split of the trial that fit: up to 190
    assert ceiling_from_lines(low, failed, 2000) == 154


# -- the search on real models: three trials, exact ---------------------------------------------


@pytest.fixture(scope="module")
def built():
    with benchmark_script("probe_models") as module:
        yield module.MODELS


def _first(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0])


def _classify(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out, batch[1])


def _fits(model: nn.Module, sample: object, cap: int, b: int) -> bool:
    """A fresh probe limited to ``b``: whether ``b`` fits on its own."""
    try:
        find_batch_size(
            model,
            sample,
            memory=cap,
            min_batch_size=b,
            max_batch_size=b,
            profile=False,
            forward_fn=_first,
            loss_fn=_classify,
        )
    except DoesNotFitError:
        return False
    return True


@pytest.mark.parametrize(
    ("name", "cap"), [("resnet18", 24 * 2**20), ("bn-mlp", 4 * 2**20), ("bn-mlp", 8 * 2**20)]
)
def test_three_trials_where_the_peak_is_not_affine(built, name: str, cap: int) -> None:
    # AdamW's step holds the peak at small batches and the activations at large ones: the
    # peak's fit through two sizes misses; the operators' lines do not.
    model, sample = built[name]()
    result = find_batch_size(
        model, sample, memory=cap, profile=False, forward_fn=_first, loss_fn=_classify
    )
    sizes = [(t.batch_size, t.fits) for t in result.trials]
    c = result.ceiling
    assert sizes == [(len(sample[0]), True), (c, True), (c + 1, False)]
    assert _fits(model, sample, cap, c) and not _fits(model, sample, cap, c + 1)
    assert all(t.trace is None for t in result.trials)  # results keep no traces
    assert "trace" not in result.trials[0].to_dict()


def _curve(rng: random.Random):
    """A step whose peak mixes a flat part, a line, a bend and size-dependent wiggles."""
    flat, fixed = rng.uniform(0, 9e5), rng.uniform(0, 3e5)
    per, bend = rng.uniform(100, 5000), rng.choice([0.0, rng.uniform(0, 5)])
    wiggle, period = rng.choice([0, 512, 4096, 20000]), rng.choice([2, 8, 16, 64])

    def peak(b: int) -> int:
        return int(max(flat, fixed + per * b + bend * b * b) + (wiggle if b % period else 0))

    def run(b: int) -> Trial:
        return Trial(
            batch_size=b,
            fits=peak(b) <= 1_000_000,
            peak_bytes=peak(b),
            seconds=0.0,
            oom=peak(b) > 1_000_000,
        )

    return run, int(min(flat, fixed) / 2)


def test_exact_and_never_three_failures_one_step_apart_on_random_curves() -> None:
    rng = random.Random(0)
    for _ in range(300):
        run, base = _curve(rng)
        if not run(1).fits:
            continue
        out = search(run, start=rng.choice([1, 8, 32]), usable_bytes=1_000_000, base_bytes=base)
        truth = next(b for b in itertools.count(out.ceiling + 1) if not run(b).fits) - 1
        assert out.ceiling == truth
        sizes = [(t.batch_size, t.fits) for t in out.trials]
        for i in range(2, len(sizes)):
            (a, fa), (b, fb), (c, fc) = sizes[i - 2 : i + 1]
            if not (fa or fb or fc) and a - b == b - c == 1:
                lo = max(x for x, fit in sizes[:i] if fit)
                assert c == lo + 1, sizes  # only when it was the last size left


# -- the user's batch --------------------------------------------------------------------------


def test_make_batch_with_other_rows_is_a_typed_error() -> None:
    model = nn.Linear(8, 2)
    with pytest.raises(BatchSizeMismatchError, match=r"make_batch\(2\) returned a batch of 4") as e:
        find_batch_size(model, lambda b: torch.randn(4, 8), memory="1MiB", max_batch_size=10**6)
    assert e.value.asked == 2 and e.value.returned == 4


FOUR_ROWS = """
import torch
model = torch.nn.Linear(8, 2)
def make_batch(batch_size):
    return torch.randn(4, 8)
"""


def test_cli_make_batch_with_other_rows_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "four.py"
    path.write_text(FOUR_ROWS)
    res = CliRunner().invoke(
        main, ["probe", str(path), "--memory", "1MiB", "--max-batch", "1000000"]
    )
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "make_batch(2) returned a batch of 4 rows" in lines[0]


# -- nothing fits -------------------------------------------------------------------------------

BATCH_NORM = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 10))
sample = torch.randn(16, 256)
"""


def test_nothing_fits_names_the_oom_and_the_failure_below(tmp_path: Path) -> None:
    path = tmp_path / "bn.py"
    path.write_text(BATCH_NORM)
    res = CliRunner().invoke(main, ["probe", str(path), "--memory", "6MiB", "--json"])
    assert res.exit_code == 1, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert "batch size 2 does not fit: the step needs at least" in line
    assert "below it, at batch size 1, the step failed for a reason other than memory" in line
    assert "Expected more than 1 value per channel" in line
    assert "worked at" not in line
    assert json.loads(res.stdout or "null") is None
    with pytest.raises(DoesNotFitError) as e:
        ns: dict[str, object] = {}
        exec(BATCH_NORM, ns)
        find_batch_size(ns["model"], ns["sample"], memory="6MiB")  # type: ignore[arg-type]
    assert e.value.batch_size == 2 and e.value.needed_bytes > e.value.available_bytes
