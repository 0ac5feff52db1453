"""Smoke test of benchmarks/run.py: maxbatch and the installed peers on one tiny workload."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from scripts import BENCHMARKS, benchmark_script
from torch import nn

sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is not installed: its modules import each other

from peers import report, tools
from peers.core import measure, summarize
from peers.truth import sweep_sizes
from peers.workloads import Spec

#: Every peer and the module it needs; each test skips cleanly when its peer is not installed.
PEERS = [(t, tools.MODULES[t]) for t in tools.TOOLS if t != "maxbatch"]
CAP = "256KiB"


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    return model, (torch.randn(4, 64), torch.randint(0, 4, (4,)))


TINY = Spec(
    "tiny",
    "tiny MLP",
    _tiny,
    lambda model, batch: model(batch[0]),
    lambda out, batch: F.cross_entropy(out, batch[1]),
    caps=(CAP,),
    quick_caps=(CAP,),
)


@pytest.fixture(scope="module")
def row():
    # Downward searches start lower than in the benchmark: the tiny ceiling is far below 4096 and
    # each failed attempt of Accelerate and toma pays a full garbage collection.
    saved, tools.START = tools.START, 512
    try:
        return measure(TINY, CAP, [t for t in tools.TOOLS if tools.available(t)])
    finally:
        tools.START = saved


@pytest.mark.slow
def test_the_brute_force_ceiling_is_verified_and_maxbatch_finds_it(row):
    assert row.truth.verified
    assert 16 < row.truth.ceiling < 512  # room to search, and below where downward searches start
    mine = row.run("maxbatch")
    assert mine is not None and mine.error is None
    assert mine.answer == row.truth.ceiling
    assert mine.answer_ran
    assert mine.pick is not None and 1 <= mine.pick <= mine.answer
    assert mine.probe_steps is not None and 1 <= mine.probe_steps <= mine.steps
    assert mine.probe_seconds is not None and 0 < mine.probe_seconds <= mine.seconds
    assert row.metrics(mine)["answer_over_true"] == 1.0
    assert row.relative_speed(mine.answer) is not None


@pytest.mark.parametrize(("tool", "module"), PEERS)
def test_each_installed_peer_answer_is_recorded(row, tool, module):
    pytest.importorskip(module)
    run = row.run(tool)
    assert run is not None
    assert run.error is None
    assert run.answer is not None and run.answer >= 1
    assert run.attempts and run.steps >= 1 and run.seconds > 0
    m = row.metrics(run)
    assert m["answer_over_true"] == run.answer / row.truth.ceiling
    assert m["steps_vs_maxbatch"] is not None and m["time_vs_maxbatch"] is not None
    if run.answer <= row.truth.ceiling:
        assert m["throughput_vs_best"] is not None


def test_the_report_renders_every_tool(row, tmp_path):
    summary = summarize([row], [r.tool for r in row.runs])
    assert [s["tool"] for s in summary] == [r.tool for r in row.runs]
    text = report.format_row(row)
    assert text.startswith("tiny")
    assert len(text.splitlines()) == len(row.runs)
    info = {
        "command": "test",
        "date": "today",
        "wall_seconds": 1.0,
        "cpu": "cpu",
        "cpus": 1,
        "platform": "p",
        "python": "3",
        "torch_threads": 1,
        "versions": {"maxbatch": "0"},
    }
    md = report.markdown([row], summary, info, None)
    assert "| maxbatch |" in md
    path = tmp_path / "out.json"
    report.write_json(path, [row], summary, info)
    data = json.loads(path.read_text())
    assert data["rows"][0]["truth"]["ceiling"] == row.truth.ceiling
    assert {t["tool"] for t in data["rows"][0]["tools"]} == {r.tool for r in row.runs}


@pytest.mark.parametrize(
    ("ceiling", "sample", "extra", "expected"),
    [
        (10, 4, [], [4, 8, 10]),
        (100, 8, [96, 50, 200, None], [8, 16, 32, 50, 64, 80, 88, 96, 100]),
        (5, 8, [3], [3, 5]),
    ],
)
def test_sweep_sizes(ceiling, sample, extra, expected):
    assert sweep_sizes(ceiling, sample, extra) == expected


@pytest.mark.slow
def test_the_command_line_writes_json_markdown_and_a_chart(tmp_path):
    pytest.importorskip("matplotlib")
    argv = ["--quick", "--workloads", "tabular-dict", "--tools", "maxbatch", "--out", str(tmp_path)]
    with benchmark_script("run") as module:
        assert module.main(argv) == 0
    data = json.loads((tmp_path / "peers-quick.json").read_text())
    assert [r["cap"] for r in data["rows"]] == list(module.WORKLOADS["tabular-dict"].quick_caps)
    assert (tmp_path / "peers-quick.md").read_text().startswith("# maxbatch and its peers")
    assert (tmp_path / "peers-quick.png").stat().st_size > 0
