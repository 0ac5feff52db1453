"""Hostile result caches: entries that lie, FIFOs named like entries, foreign files and links."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from maxbatch import find_batch_size
from maxbatch.cli import main
from maxbatch.store.cache import ResultCache


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def probe(**kw: Any) -> Any:
    return find_batch_size(
        mlp(), torch.randn(4, 32), memory="2MiB", optimizer="sgd", profile=False, cache=True, **kw
    )


#: (what, how the stored result is changed): each makes the entry invalid.
LIES: dict[str, Any] = {
    "ceiling a string": lambda r: r.update(ceiling=str(r["ceiling"])),
    "ceiling 0": lambda r: r.update(ceiling=0, batch_size=0),
    "ceiling -5": lambda r: r.update(ceiling=-5, batch_size=-5),
    "ceiling 1.5": lambda r: r.update(ceiling=1.5),
    "ceiling null": lambda r: r.update(ceiling=None),
    "ceiling true": lambda r: r.update(ceiling=True),
    "ceiling 10**12": lambda r: r.update(ceiling=10**12),
    "pick 10 x the ceiling": lambda r: r.update(batch_size=10 * r["ceiling"]),
    "no failing size above the ceiling": lambda r: r.update(
        trials=[t for t in r["trials"] if t["batch_size"] <= r["ceiling"]]
    ),
    "a size above the ceiling fits": lambda r: r["trials"].append(
        {**r["trials"][0], "batch_size": r["ceiling"] + 7, "fits": True}
    ),
    "a trial of size 0": lambda r: r["trials"].append({**r["trials"][0], "batch_size": 0}),
    "seconds NaN": lambda r: r.update(seconds=float("nan")),
    "trials not a list": lambda r: r.update(trials={"0": 1}),
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """One real probe's cache entry: its key and its data (the lies are made from it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        probe()
        (entry,) = ResultCache().directory.glob("*.json")
    return entry.stem, json.loads(entry.read_text())


@pytest.mark.parametrize("lie", LIES)
def test_an_entry_that_breaks_the_schema_or_invariants_is_ignored_with_a_warning(
    tmp_path: Path, stored: tuple[str, dict[str, Any]], lie: str
) -> None:
    key, data = stored
    store = ResultCache(tmp_path)
    assert store.get(key) is None
    forged = copy.deepcopy(data)
    LIES[lie](forged["result"])
    store.path(key).write_text(json.dumps(forged))
    with pytest.warns(UserWarning, match="ignoring the invalid cache entry"):
        assert store.get(key) is None
    with pytest.warns(UserWarning, match="ignoring the invalid cache entry"):
        assert store.entries() == []
    store.path(key).write_text(json.dumps(data))
    assert store.get(key) is not None  # the entry as stored is valid


def test_an_invalid_entry_means_a_fresh_probe_that_replaces_it(own_cache_dir: Path) -> None:
    first = probe()
    (entry,) = own_cache_dir.glob("*.json")
    data = json.loads(entry.read_text())
    LIES["pick 10 x the ceiling"](data["result"])
    entry.write_text(json.dumps(data))
    trials: list[Any] = []
    with pytest.warns(UserWarning, match="the pick .* is above the ceiling"):
        again = probe(on_trial=trials.append)
    assert not again.from_cache
    assert (again.ceiling, again.batch_size) == (first.ceiling, first.batch_size)
    assert len(trials) > 2  # a real search ran, not a check of the lie
    assert json.loads(entry.read_text())["result"]["batch_size"] == first.batch_size  # replaced


def test_an_entry_copied_under_another_key_is_not_used(own_cache_dir: Path) -> None:
    probe()
    (entry,) = own_cache_dir.glob("*.json")
    data = json.loads(entry.read_text())
    data["key"] = "0" * 32
    entry.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="is not its file name's"):
        assert not probe().from_cache


def _fifo_in_place_of_the_entry(own_cache_dir: Path) -> Path:
    probe()
    (entry,) = own_cache_dir.glob("*.json")
    entry.unlink()
    os.mkfifo(entry)
    return entry


def _in_a_thread(fn: Any) -> Any:
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) past 60 s."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "it hangs on the FIFO"
    return out[0]


def test_a_fifo_named_like_the_entry_neither_hangs_the_probe_nor_the_listing(
    own_cache_dir: Path,
) -> None:
    fifo = _fifo_in_place_of_the_entry(own_cache_dir)
    with pytest.warns(UserWarning, match="not a regular file"):
        again = _in_a_thread(probe)
    assert not again.from_cache and again.ceiling >= 1
    assert fifo.is_file()  # the fresh answer replaced the FIFO (an atomic rename)
    fifo.unlink()
    os.mkfifo(fifo)
    listed = _in_a_thread(lambda: CliRunner().invoke(main, ["cache", "list", "--json"]))
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


def test_cache_clear_removes_only_its_own_entries_and_follows_no_link(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text("{}")
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    cache = tmp_path / "cache"
    cache.mkdir()
    store = ResultCache(cache)
    own = "a" * 32
    (cache / f"{own}.json").write_text("{}")  # torn or not, the name is the cache's
    (cache / f".{own}.x1.tmp").write_text("")
    (cache / "notes.json").write_text("{}")
    (cache / f"{'b' * 32}.json").symlink_to(outside)  # a link named like an entry
    (cache / f"{'c' * 32}.json").mkdir()
    assert store.clear() == 1
    left = sorted(p.name for p in cache.iterdir())
    assert left == [f"{'b' * 32}.json", f"{'c' * 32}.json", "notes.json"]
    assert outside.read_text() == "{}"
    # A cache folder that is a link into a project: the project's files stay.
    linked = ResultCache(tmp_path / "linked")
    (tmp_path / "linked").symlink_to(project)
    assert linked.clear() == 0 and (project / "package.json").exists()
    assert linked.entries() == []


# -- a hit lists this run's trials; the stored search apart ------------------------------------


def test_a_hit_lists_the_check_as_its_trials_and_the_stored_search_apart(
    own_cache_dir: Path,
) -> None:
    first = probe()
    seen: list[Any] = []
    again = probe(on_trial=seen.append)
    assert again.from_cache
    assert list(again.trials) == seen  # the two trials this run ran: the check
    assert [(t.batch_size, t.fits) for t in again.trials] == [
        (first.ceiling, True),
        (first.ceiling + 1, False),
    ]
    stored = again.to_dict()["cached_search"]
    assert stored["trials"] == [t.to_dict() for t in first.trials]  # with their old timings
    assert stored["seconds"] == first.seconds and len(stored["key"]) == 32
    assert first.cached_search is None
    trusted = probe(trust_cache=True)
    assert trusted.trials == () and trusted.to_dict()["cached_search"] == stored
    assert again.cached_search is not None and again.cached_search.trials == first.trials


def test_a_hit_closing_line_says_what_this_run_did(own_cache_dir: Path) -> None:
    from maxbatch.store.report import closing_line, result_table

    first = probe()
    again = probe()
    line = closing_line(again)
    assert line.startswith("from the cache: 2 trials run now (the check), nothing timed, ")
    assert f"the stored search: {len(first.trials)} trials, 0 sizes timed, " in line
    assert result_table(again).endswith(line)
    assert closing_line(first).startswith(f"{len(first.trials)} trials, 0 sizes timed")
