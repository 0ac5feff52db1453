"""BucketBatchSampler in a Lightning DataModule: the example trains, shuffles per epoch, fits."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning.pytorch")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "integrations" / "lightning_buckets.py"


def run_example(*argv: str) -> Any:
    spec = importlib.util.spec_from_file_location("_maxbatch_example_lightning_buckets", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


@pytest.mark.slow
def test_the_data_module_trains_every_epoch_on_bucket_batches_that_fit() -> None:
    out = run_example("--items", "400", "--epochs", "2", "--memory", "24MiB")
    steps = out["steps_per_epoch"]
    # Lightning ran both epochs on the sampler's batches and called its set_epoch.
    assert len(out["batch_sizes"]) == 2 * steps and out["epoch"] == 1
    assert sum(out["batch_sizes"]) == 2 * 400
    # Inside a virtual device of the profiled capacity: no out-of-memory error ended the fit.
    assert 0.5 < out["peak_share"] <= 1.0
    ceilings = out["ceilings"]
    assert max(out["batch_sizes"]) == max(ceilings.values())
    assert 3 * steps <= out["worst_case_steps"]
    assert out["stats"]["steps"] == steps and out["stats"]["samples"] == 400
