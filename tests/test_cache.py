"""The result cache: keys, hits checked by real trials, misses, corrupt entries, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maxbatch import find_batch_size
from maxbatch.cache import ResultCache, describe, key_of
from maxbatch.cli import main
from maxbatch.results import Trial

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def mlp(width: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, 4)
    )


def probe(model: torch.nn.Module, trials: list[Trial] | None = None, **kw):
    return find_batch_size(
        model,
        torch.randn(4, 32),
        memory="2MiB",
        optimizer="sgd",
        on_trial=None if trials is None else trials.append,
        **{"profile": False, **kw},
    )


def test_the_library_does_not_cache_unless_asked(own_cache_dir: Path) -> None:
    probe(mlp())
    assert not own_cache_dir.exists()


def test_a_hit_is_checked_by_running_the_ceiling_and_the_size_above(own_cache_dir: Path) -> None:
    first = probe(mlp(), cache=True)
    assert not first.from_cache
    assert len(list(own_cache_dir.glob("*.json"))) == 1
    trials: list[Trial] = []
    again = probe(mlp(), trials, cache=True)
    assert again.from_cache
    assert (again.ceiling, again.batch_size) == (first.ceiling, first.batch_size)
    assert [(t.batch_size, t.fits) for t in trials] == [
        (first.ceiling, True),
        (first.ceiling + 1, False),
    ]
    assert again.notes[0].startswith("from the cache")
    assert f"{first.ceiling} fits and {first.ceiling + 1} does not" in again.notes[0]
    assert again.to_dict()["from_cache"] is True


def test_trust_cache_runs_nothing() -> None:
    probe(mlp(), cache=True)
    trials: list[Trial] = []
    again = probe(mlp(), trials, cache=True, trust_cache=True)
    assert again.from_cache and trials == []
    assert "trusted without a check" in again.notes[0]


def test_a_hit_that_no_longer_holds_is_probed_again_and_replaced(own_cache_dir: Path) -> None:
    first = probe(mlp(), cache=True)
    (entry,) = own_cache_dir.glob("*.json")
    data = json.loads(entry.read_text())
    data["result"]["ceiling"] = first.ceiling + 10  # as if the device had had more memory
    for trial in data["result"]["trials"]:  # with trials that agree (else it is invalid)
        if trial["batch_size"] >= first.ceiling:
            trial["batch_size"] += 10
    entry.write_text(json.dumps(data))
    again = probe(mlp(), cache=True)
    assert not again.from_cache and again.ceiling == first.ceiling
    assert any(f"the cached ceiling {first.ceiling + 10} does not fit" in n for n in again.notes)
    assert json.loads(entry.read_text())["result"]["ceiling"] == first.ceiling


def test_a_corrupt_entry_is_ignored_with_a_warning(own_cache_dir: Path) -> None:
    first = probe(mlp(), cache=True)
    (entry,) = own_cache_dir.glob("*.json")
    entry.write_text('{"format": 1, "result": {"ceiling": ')  # a torn write by another tool
    with pytest.warns(UserWarning, match="ignoring the invalid cache entry"):
        again = probe(mlp(), cache=True)
    assert not again.from_cache and again.ceiling == first.ceiling
    assert json.loads(entry.read_text())["result"]["ceiling"] == first.ceiling  # rewritten
    assert [p.name for p in own_cache_dir.iterdir()] == [entry.name]  # no temporary file left


def key(model: torch.nn.Module, batch: object, opt: torch.optim.Optimizer | None, **settings):
    return key_of(describe(model, batch, opt, {}, {"memory": 1, **settings}))


def test_the_key_follows_what_changes_memory_and_nothing_else() -> None:
    model, batch = mlp(), torch.randn(4, 32)

    def sgd(**kw: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), **{"lr": 0.1, **kw})

    base = key(model, batch, sgd())
    assert key(mlp(), torch.randn(4, 32), sgd()) == base  # same structure, other values
    assert key(model, batch, sgd(lr=0.5)) == base  # the learning rate changes no memory
    assert key(mlp(width=65), batch, sgd()) != base
    assert key(model, batch.half(), sgd()) != base
    assert key(model, torch.randn(4, 33), sgd()) != base
    assert key(model, batch, sgd(momentum=0.9)) != base  # a momentum buffer per parameter
    assert key(model, batch, torch.optim.AdamW(model.parameters())) != base
    assert key(model, batch, sgd(), memory=2) != base
    model[0].weight.requires_grad_(False)
    assert key(model, batch, sgd()) != base


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.slow
def test_the_cli_caches_by_default_and_says_so(own_cache_dir: Path) -> None:
    args = ["probe", str(EXAMPLES / "mlp.py"), "--memory", "64MiB", "--no-profile"]
    first = invoke(*args, "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["from_cache"] is False
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "note: from the cache" in again.stdout
    assert again.stderr.count("trial ") == 2  # the check: the ceiling and the size above
    skipped = invoke(*args, "--no-cache", "--json")
    assert json.loads(skipped.stdout)["from_cache"] is False
    listed = invoke("cache", "list", "--json")
    (row,) = json.loads(listed.stdout)
    assert row["ceiling"] == json.loads(first.stdout)["ceiling"]
    assert row["model"].startswith("Sequential")
    assert "1 cached result(s)" in invoke("cache", "list").stdout
    assert "removed 1 cached result(s)" in invoke("cache", "clear").stdout
    assert "0 cached result(s)" in invoke("cache", "list").stdout
    assert not any(own_cache_dir.iterdir())


def test_xdg_cache_home_places_the_cache(own_cache_dir: Path) -> None:
    assert ResultCache().directory == Path(os.environ["XDG_CACHE_HOME"]) / "maxbatch"
    assert ResultCache().directory == own_cache_dir


def test_a_low_confidence_pick_is_not_replayed_from_the_cache(own_cache_dir: Path) -> None:
    """Issue 21.4: a pick noise could have flipped is probed and timed again, with a note."""
    first = probe(mlp(), cache=True, profile=True)
    (entry,) = own_cache_dir.glob("*.json")
    data = json.loads(entry.read_text())
    data["result"]["pick_confidence"] = "low"
    data["result"]["pick_confidence_reason"] = "every timed size is noisy"
    entry.write_text(json.dumps(data))
    again = probe(mlp(), cache=True, profile=True)
    assert not again.from_cache and again.ceiling == first.ceiling
    assert any(
        n.startswith(f"the cached pick ({first.batch_size}) had low confidence (every timed")
        and n.endswith("probed and timed again rather than replayed")
        for n in again.notes
    )
