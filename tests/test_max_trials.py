"""``max_trials``: the ceiling search stops after that many trials with the best verified size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_search import curve

from maxbatch import find_batch_size
from maxbatch.errors import ConfigError
from maxbatch.run.isolate import probe_file
from maxbatch.search.probe import search
from maxbatch.settings import SearchSettings

ROOT = Path(__file__).resolve().parent.parent


def test_the_search_stops_after_max_trials_with_a_verified_size() -> None:
    full = search(curve(1e6, 1000, 5e8, flat=2e6), start=2, usable_bytes=int(5e8))
    assert len(full.trials) > 3  # the wide curve takes more than three trials
    run = curve(1e6, 1000, 5e8, flat=2e6)
    cut = search(run, start=2, usable_bytes=int(5e8), settings=SearchSettings(max_trials=3))
    assert len(cut.trials) == 3 and not cut.complete
    assert "3 trials run (max_trials)" in cut.stop_reason
    assert {t.batch_size: t.fits for t in cut.trials}[cut.ceiling] is True
    assert cut.ceiling <= full.ceiling
    assert [t.batch_size for t in cut.trials] == [t.batch_size for t in full.trials][:3]


def test_the_first_fitting_size_is_found_whatever_max_trials_says() -> None:
    # 64 does not fit: the search halves to a size that fits before max_trials can stop it.
    cut = search(
        curve(1e6, 1e5, 2e6), start=64, usable_bytes=int(2e6), settings=SearchSettings(max_trials=1)
    )
    assert any(t.fits for t in cut.trials) and not cut.complete


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def test_find_batch_size_stops_early_and_says_why() -> None:
    full = find_batch_size(
        _model(), torch.randn(4, 32), memory="2MiB", optimizer="sgd", profile=False
    )
    cut = find_batch_size(
        _model(), torch.randn(4, 32), memory="2MiB", optimizer="sgd", profile=False, max_trials=2
    )
    assert len(full.trials) > 2
    assert len(cut.trials) == 2 and not cut.complete
    assert "max_trials" in cut.stop_reason
    assert cut.ceiling <= full.ceiling and cut.batch_size == cut.ceiling


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_max_trials_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_trials"):
        find_batch_size(_model(), torch.randn(4, 32), memory="2MiB", max_trials=bad)  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_isolated_search_honours_max_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = probe_file(
        ROOT / "examples" / "mlp.py", isolate=True, memory="300MiB", profile=False, max_trials=2
    )
    assert len(result.trials) == 2 and not result.complete
    assert "max_trials" in result.stop_reason


def test_the_command_takes_max_trials() -> None:
    import json

    from click.testing import CliRunner

    from maxbatch.cli import main

    mlp = str(ROOT / "examples" / "mlp.py")
    args = ["probe", mlp, "--memory", "64MiB", "--no-profile", "--no-cache", "--json"]
    res = CliRunner().invoke(main, [*args, "--max-trials", "1"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["trials"]) == 1 and not data["complete"] and "max_trials" in data["stop_reason"]
    bad = CliRunner().invoke(main, [*args, "--max-trials", "0"])
    assert bad.exit_code == 2 and "max_trials=0 must be a positive integer" in bad.output
