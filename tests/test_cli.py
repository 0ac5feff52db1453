"""The CLI in-process with click's CliRunner: answers, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from maxbatch.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.slow
def test_probe_json_has_the_contract_keys() -> None:
    res = invoke("probe", str(EXAMPLES / "mlp.py"), "--memory", "64MiB", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {"ceiling", "batch_size", "device", "trials"} <= data.keys()
    assert data["device"] == "cpu"
    assert 1 <= data["batch_size"] <= data["ceiling"] and data["ceiling"] > 32
    for trial in data["trials"]:
        assert {"batch_size", "fits", "peak_bytes", "seconds"} <= trial.keys()
    fits = {t["batch_size"]: t["fits"] for t in data["trials"]}
    assert fits[data["ceiling"]] is True and fits[data["ceiling"] + 1] is False
    # one progress line per trial on stderr, nothing of it on stdout
    assert res.stderr.count("trial ") == len(data["trials"])
    # The profiler's account (issue 10): why it stopped, what it skipped, how sure the pick is.
    timed = {p["batch_size"] for p in data["throughput"]}
    assert data["ceiling"] in timed  # the top is always timed
    assert data["profile_stop_reason"]
    assert data["pick_confidence"] in ("high", "medium", "low")
    assert data["pick_confidence_reason"]
    for s in data["profile_skipped"]:
        assert s["batch_size"] not in timed and s["reason"]


@pytest.mark.slow
def test_probe_table_and_options() -> None:
    res = invoke(
        "probe",
        str(EXAMPLES / "cnn.py"),
        "--memory",
        "120MiB",
        "--multiple-of",
        "8",
        "--max-batch",
        "64",
        "--optimizer",
        "sgd",
    )
    assert res.exit_code == 0, res.output
    assert "ceiling: 64 (reached the maximum batch size 64)" in res.stdout
    assert "SGD" in res.stdout
    assert "\npick confidence: " in res.stdout and "\nprofiler stopped: " in res.stdout


@pytest.mark.slow
def test_inference_probe() -> None:
    res = invoke(
        "probe", str(EXAMPLES / "transformer.py"), "--memory", "64MiB", "--inference", "--json"
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["mode"] == "inference" and data["optimizer"] is None


def test_nothing_fits_exits_1_with_one_line() -> None:
    res = invoke("probe", str(EXAMPLES / "cnn.py"), "--memory", "1MiB")
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("maxbatch: error: batch size 1 does not fit")


BAD_FILES = {
    "syntax.py": ("model = (\n", "syntax error on line"),
    "nomodel.py": ("import torch\nsample = torch.zeros(2, 3)\n", "defines neither `model`"),
    "nosample.py": ("import torch\nmodel = torch.nn.Linear(3, 3)\n", "defines neither `sample`"),
    "wrongtype.py": ("model = 3\nsample = None\n", "expected a torch.nn.Module"),
    "raises.py": ("raise ImportError('no such thing')\n", "ImportError: no such thing"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_model_files_exit_2_with_one_line(tmp_path: Path, name: str) -> None:
    text, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    res = invoke("probe", str(path), "--memory", "64MiB")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"maxbatch: error: {path}: ")
    assert expected in lines[0]
    assert "Traceback" not in res.output


def test_missing_file_and_debug_traceback(tmp_path: Path) -> None:
    res = invoke("probe", str(tmp_path / "nope.py"))
    assert res.exit_code == 2
    assert "file not found" in res.stderr
    res = invoke("probe", str(tmp_path / "nope.py"), "--debug")
    assert res.exit_code == 2
    assert "Traceback" in res.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--memory", "lots"], "memory='lots' is not a size"),
        (["--device", "cuda:7"], "cuda:7"),
        (["--multiple-of", "0"], "multiple_of=0"),
    ],
)
def test_bad_options_exit_2(args: list[str], expected: str) -> None:
    res = invoke("probe", str(EXAMPLES / "mlp.py"), *args)
    assert res.exit_code == 2
    assert expected in res.stderr


def test_workload_failure_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text(
        "import torch\nmodel = torch.nn.Linear(3, 3)\nsample = torch.zeros(2, 3)\n"
        "def loss(output, batch):\n    raise ValueError('labels missing')\n"
    )
    res = invoke("probe", str(path), "--memory", "64MiB")
    assert res.exit_code == 1
    assert "labels missing" in res.stderr and "--debug" in res.stderr


def test_devices_lists_the_cpu() -> None:
    res = invoke("devices", "--json")
    assert res.exit_code == 0
    devices = json.loads(res.stdout)
    cpu = [d for d in devices if d["device"] == "cpu"]
    assert cpu and cpu[0]["total_bytes"] > cpu[0]["free_bytes"] > 0
    assert "cpu" in invoke("devices").stdout


def test_public_api_imports() -> None:
    import maxbatch

    for name in maxbatch.__all__:
        assert getattr(maxbatch, name) is not None
    assert sorted(maxbatch.__all__) == maxbatch.__all__


@pytest.mark.slow
def test_library_import_does_not_import_click() -> None:
    import subprocess
    import sys

    code = "import sys, maxbatch; print('click' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_report_files_and_rerender(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    res = invoke(
        "probe",
        str(EXAMPLES / "mlp.py"),
        "--memory",
        "64MiB",
        "--report",
        str(out),
        "--json",
        "--dataset-size",
        "10000",
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {"throughput", "memory", "memory_model", "pick_reason"} <= data.keys()
    assert data["throughput"] and data["batch_size"] <= data["ceiling"]
    assert data["advice"]["iterations_per_epoch"] == -(-10000 // data["batch_size"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["ceiling"] == data["ceiling"] and saved["batch_size"] == data["batch_size"]
    for png in ("memory.png", "throughput.png"):
        blob = (out / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    md = (out / "report.md").read_text()
    assert f"**Batch size: {data['batch_size']}**" in md and "(throughput.png)" in md
    again = invoke("report", str(out / "report.json"))
    assert again.exit_code == 0
    assert f"batch size: {data['batch_size']} (" in again.stdout
    assert "samples/s" in again.stdout
    again_md = invoke("report", str(out / "report.json"), "--markdown")
    assert again_md.stdout.startswith("# maxbatch: ")


def test_report_of_a_bad_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text('{"hello": 1}')
    res = invoke("report", str(bad))
    assert res.exit_code == 2 and "not a maxbatch report" in res.stderr
    res = invoke("report", str(tmp_path / "missing.json"))
    assert res.exit_code == 2 and "cannot read it" in res.stderr


def test_no_profile_picks_the_ceiling() -> None:
    res = invoke("probe", str(EXAMPLES / "mlp.py"), "--memory", "64MiB", "--no-profile", "--json")
    data = json.loads(res.stdout)
    assert data["batch_size"] == data["ceiling"] and data["throughput"] == []


@pytest.mark.parametrize(
    ("command", "default"),
    [("probe", "0 with --memory, else 5%]"), ("estimate", "0 for cpu, 5% for cuda]")],
)
def test_help_shows_the_headroom_default_once_formatted(command: str, default: str) -> None:
    res = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert default in res.stdout and "%%" not in res.stdout
