"""The noise scale in the answer: library, CLI text and JSON, Markdown, advice, the example."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import maxbatch
from maxbatch.cli import main
from maxbatch.errors import ConfigError
from maxbatch.results import BatchSizeResult
from maxbatch.stats.advise import advise
from maxbatch.store.report import result_markdown

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "noise_scale.py"


@pytest.mark.slow
def test_probe_with_noise_scale_json_text_and_markdown() -> None:
    args = ["probe", str(EXAMPLE), "--memory", "200MiB", "--max-batch", "256", "--no-profile"]
    res = CliRunner().invoke(
        main, [*args, "--noise-scale", "--base-batch", "64", "--base-lr", "0.1", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    ns = data["noise_scale"]
    assert {"b_simple", "std_error", "trace_cov", "grad_sq_norm", "critical_batch"} <= ns.keys()
    assert 0 < ns["std_error"] < 0.2 * ns["b_simple"]
    assert (ns["b_small"], ns["b_big"]) == (32, 256)  # default micro-batch, under the pick
    advice = data["advice"]
    assert advice["critical_batch"] == ns["critical_batch"] == round(ns["b_simple"])
    plan = advice["accumulation"]
    assert plan["global_batch"] == ns["critical_batch"] and plan["micro_batch"] <= data["ceiling"]
    assert advice["learning_rates"]["batch"] == plan["effective_batch"]
    markdown = result_markdown(BatchSizeResult.from_dict(data))
    assert "B_simple ≈" in markdown and "grows as training proceeds" in markdown

    text = CliRunner().invoke(main, [*args, "--noise-scale"])
    assert text.exit_code == 0, text.output
    assert "noise scale: B_simple ≈" in text.stdout
    assert "critical batch ≈" in text.stdout and "measured at the current weights" in text.stdout
    assert "suggested global batch" in text.stdout


def test_noise_scale_needs_a_training_loss() -> None:
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="noise_scale needs the training loss"):
        maxbatch.find_batch_size(model, torch.randn(4, 4), mode="inference", noise_scale=True)


@pytest.mark.parametrize(
    ("pick", "critical", "global_batch", "micro", "steps"),
    [
        (256, 1000, 1024, 256, 4),  # a multiple of the pick near the critical batch
        (256, 100, 100, 100, 1),  # below the pick: one micro-batch of it
        (64, 5000, 4992, 64, 78),  # above the ceiling (256): accumulation reaches it
    ],
)
def test_advice_suggests_a_global_batch_near_the_critical_batch(
    pick, critical, global_batch, micro, steps
) -> None:
    a = advise(pick, 256, critical_batch=critical, base_batch=128, base_lr=0.1)
    assert a.accumulation is not None and a.critical_batch == critical
    assert (a.accumulation.global_batch, a.accumulation.micro_batch) == (global_batch, micro)
    assert a.accumulation.accumulation_steps == steps and a.effective_batch == micro * steps
    assert a.learning_rates is not None and a.learning_rates.batch == a.effective_batch
    assert f"near the critical batch {critical}" in a.notes[0]


def test_advice_keeps_a_global_batch_asked_for_and_compares_it() -> None:
    a = advise(64, 256, global_batch=512, critical_batch=128)
    assert a.effective_batch == 512 and "4x the critical batch 128" in a.notes[0]


def test_the_example_runs(capsys) -> None:
    namespace = runpy.run_path(str(EXAMPLE))
    namespace["main"](steps=50)
    out = capsys.readouterr().out
    assert "at initialisation: B_simple" in out and "step 50: tracked B_simple" in out
    assert "epoch 60: " in out and "samples per step, lr 0.1" in out


FEW = """
import torch
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
sample = torch.randn(8, 16)
"""


@pytest.mark.slow
def test_a_noise_scale_from_the_8_samples_of_sample_is_no_suggestion(tmp_path: Path) -> None:
    # Issue 21: the critical batch of a model file's 8-sample `sample` was advised as the global
    # batch to train with.
    model = tmp_path / "model.py"
    model.write_text(FEW)
    args = ["probe", str(model), "--memory", "32MiB", "--max-batch", "64", "--no-profile"]
    res = CliRunner().invoke(main, [*args, "--noise-scale", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["noise_scale"]["data_rows"] == 8
    assert any("fewer than the 256 of one draw" in n for n in data["noise_scale"]["notes"])
    advice = data["advice"]
    assert advice["critical_batch"] is None and advice["accumulation"] is None
    assert not any("suggested global batch" in n for n in advice["notes"])
    assert advice["notes"][0].startswith("no global batch suggested: the noise scale was measured")
    assert "`dataset` or `make_batch`" in advice["notes"][0]
    assert data["global_batch_size"] == data["batch_size"]
