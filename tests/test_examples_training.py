"""The training examples (examples/training/) run and show what the README says they show."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

TRAINING = Path(__file__).resolve().parent.parent / "examples" / "training"


def run_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_maxbatch_example_{name}", TRAINING / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main()


def test_virtual_device_example() -> None:
    out = run_example("virtual_device.py")
    assert out["peak"] <= out["capacity"] == 512 * 1024
    assert not out["doubled_fits"]


@pytest.mark.slow
def test_micro_batching_example() -> None:
    out = run_example("micro_batching.py")
    assert out["ceiling"] < 128 and out["changes"][0] == (128, out["ceiling"], "out of memory")
    # The probe's size fails too (the held batch of 256 and the accumulated gradients are not in
    # its memory model): refitted with them, the next size fits; halving gave 35 (issue 21).
    (_, refit, why), *after = out["changes"][1:]
    assert why == "out of memory" and out["ceiling"] // 2 < refit < out["ceiling"] and not after
    assert out["micro_batch_size"] <= out["ceiling"]
    assert out["losses"] == sorted(out["losses"], reverse=True)  # training goes on, and learns
