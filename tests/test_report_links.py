"""--report: a folder whose parents are symbolic links is written through them (as the shell
resolves a path); the folder itself, or a report file in it, may not be a link."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from maxbatch.cli import main
from maxbatch.errors import ConfigError
from maxbatch.reportfiles import check_report_dir, write_report

REPO = Path(__file__).resolve().parent.parent


def _linked(tmp: Path) -> tuple[Path, Path]:
    target = tmp / "target"
    target.mkdir()
    (tmp / "a").symlink_to(target, target_is_directory=True)
    return tmp / "a", target


def _write(folder: Path) -> list[str]:
    (folder / "report.json").write_text("{}")
    return ["report.json"]


@pytest.mark.parametrize("depth", [["b"], ["b", "c"]])
def test_a_parent_that_is_a_link_is_followed(tmp_path: Path, depth: list[str]) -> None:
    link, target = _linked(tmp_path)
    out = link.joinpath(*depth)
    assert check_report_dir(out) == out
    assert write_report(out, _write) == ["report.json"]
    assert (target.joinpath(*depth) / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "target"]  # nothing else made


def test_the_report_folder_itself_may_not_be_a_link(tmp_path: Path) -> None:
    link, target = _linked(tmp_path)
    for out in (link, tmp_path / "target" / ".." / "a"):
        with pytest.raises(ConfigError, match="is a symbolic link"):
            write_report(out, _write)
    assert list(target.iterdir()) == []


@pytest.mark.slow
def test_probe_report_under_a_linked_parent(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    link, target = _linked(tmp_path)
    model = tmp_path / "m.py"
    model.write_text("import torch\nmodel = torch.nn.Linear(4, 2)\nsample = torch.randn(2, 4)\n")
    argv = ["probe", str(model), "--memory", "64KiB", "--no-profile", "--no-cache"]
    res = CliRunner().invoke(main, [*argv, "--report", str(link / "b")])
    assert res.exit_code == 0, res.output
    assert json.loads((target / "b" / "report.json").read_text())["ceiling"] >= 2
    res = CliRunner().invoke(main, [*argv, "--report", str(link)])
    assert res.exit_code == 2 and "is a symbolic link" in res.stderr
