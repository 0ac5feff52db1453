"""The CLI under faults: report folders, hostile report files, signals, exits inside the step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from maxbatch.cli import main
from maxbatch.errors import ConfigError
from maxbatch.reportfiles import write_report

REPO = Path(__file__).resolve().parent.parent
MLP = str(REPO / "examples" / "mlp.py")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


# -- --report DIR: checked before the first trial, written atomically, never through a link --------


def _bad_report_dirs(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "file").write_text("x")
    (tmp / "dangling").symlink_to(tmp / "nowhere")
    (tmp / "linked").mkdir()
    (tmp / "linked" / "report.json").symlink_to(tmp / "outside.json")
    (tmp / "taken").mkdir()
    (tmp / "taken" / "report.md").mkdir()
    return {
        "a file": (tmp / "file", "is a file"),  # click's own check, also before any trial
        "under a file": (tmp / "file" / "sub", "is a file, not a folder"),
        "a dangling link": (tmp / "dangling", "is a symbolic link"),
        "a link inside": (tmp / "linked", "report.json is a symbolic link"),
        "a folder named like a file": (tmp / "taken", "report.md is a folder"),
    }


@pytest.mark.parametrize(
    "case",
    ["a file", "under a file", "a dangling link", "a link inside", "a folder named like a file"],
)
def test_a_bad_report_folder_fails_before_the_first_trial(tmp_path: Path, case: str) -> None:
    target, message = _bad_report_dirs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = invoke("probe", MLP, "--memory", "64MiB", "--report", str(target))
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "trial " not in res.stderr
    assert (
        sorted(p.name for p in tmp_path.rglob("*")) == before
    )  # nothing written, no link followed
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "outside.json").exists()


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def half(folder: Path) -> list[str]:
        (folder / "report.json").write_text("{}")
        raise ConfigError("plots need matplotlib")

    for out in (tmp_path / "new", tmp_path):  # a new folder, and an existing one
        with pytest.raises(ConfigError):
            write_report(out, half)
        assert not (tmp_path / "new").exists()
        assert list(tmp_path.iterdir()) == []  # no partial files, no temporary folder


def test_reports_replace_files_in_an_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("old")
    (tmp_path / "keep.txt").write_text("mine")
    names = write_report(
        tmp_path, lambda d: [(d / "report.json").write_text("new") and "report.json"]
    )
    assert names == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "report.json"]


# -- maxbatch report FILE: hostile files ----------------------------------------------------------

GOOD = {
    "ceiling": 40,
    "batch_size": 32,
    "device": "cpu",
    "device_name": "CPU",
    "mode": "train",
    "virtual": True,
    "capacity_bytes": 1000,
    "headroom_bytes": 0,
    "usable_bytes": 1000,
    "stop_reason": "verified",
    "pick_reason": "within 2%",
    "seconds": 1.0,
    "trials": [{"batch_size": 40, "fits": True, "peak_bytes": 900, "seconds": 0.1}],
}


def _report(tmp_path: Path, content: bytes | str | dict) -> str:
    path = tmp_path / "report.json"
    if isinstance(content, dict):
        content = json.dumps(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"ceiling": 4, "batch_size": 4, "trials": []}, "missing the keys ['capacity_bytes'"),
        ({**GOOD, "ceiling": "40"}, "report.ceiling should be an integer of at least 1, not str"),
        ({**GOOD, "trials": [{"batch_size": 4}]}, "report.trials[0].fits is missing"),
        ({**GOOD, "trials": {"a": 1}}, "report.trials should be a list, not dict"),
        ({**GOOD, "seconds": 1e308 * 10}, "report.seconds is out of range"),
        ({**GOOD, "memory_model": [1, 2]}, "report.memory_model should be an object"),
        ({**GOOD, "notes": [1]}, "report.notes[0] should be a str, not int"),
        (b"\xff\xfe{not utf-8", "not UTF-8 text (byte 0)"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, 2]", "a JSON object is expected"),
        ("{", "not JSON"),
    ],
    ids=[
        "some-keys",
        "wrong-type",
        "partial-trial",
        "trials-not-list",
        "infinite",
        "model-not-object",
        "note-not-string",
        "not-utf8",
        "deep",
        "array",
        "broken",
    ],
)
def test_a_bad_report_file_is_one_line_and_exit_2(
    tmp_path: Path, content: bytes | str | dict, message: str
) -> None:
    res = invoke("report", _report(tmp_path, content))
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


@pytest.mark.parametrize("markdown", [False, True])
def test_escape_sequences_in_a_report_never_reach_the_terminal(
    tmp_path: Path, markdown: bool
) -> None:
    evil = "\x1b]0;pwned\x07\x1b[2J\x9b31m"
    data = {**GOOD, "device_name": evil, "model_file": evil, "notes": [evil], "extra": evil}
    res = invoke("report", _report(tmp_path, data), *(["--markdown"] if markdown else []))
    assert res.exit_code == 0, res.output
    assert not any(c in res.output for c in "\x1b\x07\x9b")
    assert "\\x1b]0;pwned\\x07" in res.stdout


def test_a_partial_but_complete_report_renders(tmp_path: Path) -> None:
    res = invoke("report", _report(tmp_path, GOOD))
    assert res.exit_code == 0, res.output
    assert "batch size: 32 (within 2%)" in res.stdout


# -- signals and exits inside the step, in a real child process ----------------------------------

MODEL = textwrap.dedent(
    """
    import atexit, json, os, signal, sys
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    sample = torch.randn(4, 32)
    FAULT, AT = os.environ["FAULT"], int(os.environ["FAULT_AT"])

    def digest():
        return [float(p.double().sum()) for p in model.parameters()]

    before = digest()
    atexit.register(lambda: print(json.dumps({"restored": digest() == before}), file=sys.stderr))

    def forward(model, batch):
        out = model(batch)
        if batch.shape[0] >= AT:
            if FAULT == "exit":
                sys.exit(0)
            os.kill(os.getpid(), signal.SIGINT if FAULT == "int" else signal.SIGTERM)
        return out
    """
)


def _child(tmp_path: Path, fault: str, at: int = 8) -> subprocess.CompletedProcess[str]:
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAULT": fault, "FAULT_AT": str(at)}
    code = "from maxbatch.cli import main; main()"
    argv = [sys.executable, "-c", code, "probe", str(model), "--memory", "200KB"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "code", "line"),
    [
        ("int", 130, "maxbatch: interrupted after 1 trial; the model is restored"),
        ("term", 143, "maxbatch: terminated (SIGTERM) after 1 trial; the model is restored"),
    ],
)
def test_signals_restore_the_model_and_exit_with_their_code(
    tmp_path: Path, fault: str, code: int, line: str
) -> None:
    out = _child(tmp_path, fault)
    assert out.returncode == code, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-2:] == [line, '{"restored": true}'], out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr


@pytest.mark.slow
def test_sys_exit_inside_the_step_is_a_failed_step(tmp_path: Path) -> None:
    out = _child(tmp_path, "exit", at=4)
    assert out.returncode == 1, out.stderr
    assert "the step called sys.exit()" in out.stderr and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == '{"restored": true}'


def test_signals_are_handled_only_while_the_cli_runs() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert invoke("probe", MLP, "--memory", "64MiB", "--no-profile").exit_code == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize(
    "sample",
    [
        "'text'",
        "torch.zeros(0, 32)",
        "torch.tensor(1.0)",
        "[1, 2, 3]",
        "__import__('numpy').zeros((4, 32))",
        "{'x': torch.zeros(4, 32), 'y': torch.zeros(3)}",
    ],
)
def test_a_sample_that_is_not_a_batch_exits_2(tmp_path: Path, sample: str) -> None:
    model = tmp_path / "model.py"
    model.write_text(f"import torch\nmodel = torch.nn.Linear(32, 2)\nsample = {sample}\n")
    res = invoke("probe", str(model), "--memory", "64MiB")
    assert res.exit_code == 2, res.output
    assert "`sample` is not a batch" in res.stderr and len(res.stderr.strip().splitlines()) == 1
