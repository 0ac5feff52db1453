"""`--report` without matplotlib (issue 21 item 7): the JSON and Markdown, one line on plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MLP = str(REPO / "examples" / "mlp.py")

# A real interpreter where ``import matplotlib`` fails as it does when the extra is not installed:
# ``None`` in sys.modules makes every import of it raise ModuleNotFoundError (nothing is mocked).
NO_MATPLOTLIB = (
    "import sys; sys.modules['matplotlib'] = None; "
    "from maxbatch.cli import main; main(prog_name='maxbatch')"
)


@pytest.mark.slow
def test_report_without_matplotlib_writes_the_json_and_markdown_and_says_how_to_plot(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report"
    argv = [sys.executable, "-c", NO_MATPLOTLIB, "probe", MLP, "--memory", "64MiB"]
    argv += ["--no-profile", "--report", str(out), "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["ceiling"] == json.loads(res.stdout)["ceiling"] > 0
    assert "![" not in (out / "report.md").read_text()  # no links to plots that are not there
    skipped = [line for line in res.stderr.splitlines() if "plots skipped" in line]
    assert skipped == [
        'plots skipped: they need matplotlib: pip install "maxbatch[plot]" '
        '(from a clone: pip install -e ".[plot]")'
    ]
