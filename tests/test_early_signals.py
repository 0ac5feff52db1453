"""Ctrl-C and SIGTERM in the command's first seconds (importing torch, loading the model file):
one line and 130 / 143, in a real process with real signals; the library is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from deaths import handles_sigterm

from maxbatch.earlysignals import is_command

ROOT = Path(__file__).resolve().parent.parent
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, signals")

# A model file that says it is loading, then takes its time (as a large checkpoint would).
SLOW_LOAD = textwrap.dedent(
    """
    import os, time
    open(os.environ["LOADING"], "w").close()
    time.sleep(600)
    """
)
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
LINES = {
    signal.SIGINT: "maxbatch: interrupted; no trial was running",
    signal.SIGTERM: "maxbatch: terminated (SIGTERM); no trial was running",
}


def _wait(until: object, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while not until() and time.monotonic() < end:  # type: ignore[operator]
        time.sleep(0.01)


def _command(tmp: Path, how: str) -> list[str]:
    if how == "-m":
        return [sys.executable, "-m", "maxbatch"]
    script = tmp / "maxbatch"  # as pip writes the console script
    script.write_text("import sys\nfrom maxbatch.cli import main\nsys.exit(main())\n")
    return [sys.executable, str(script)]


@LINUX
@pytest.mark.slow
@pytest.mark.parametrize("how", ["-m", "script"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("when", ["importing", "loading the model file"])
def test_a_signal_in_the_first_seconds_is_one_line_and_its_code(
    tmp_path: Path, how: str, sig: signal.Signals, when: str
) -> None:
    model, loading = tmp_path / "model.py", tmp_path / "loading"
    model.write_text(SLOW_LOAD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOADING": str(loading)}
    argv = [*_command(tmp_path, how), "probe", str(model), "--memory", "1MiB"]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        if when == "importing":  # as soon as the handlers are in, while torch imports
            _wait(lambda: handles_sigterm(proc.pid) or proc.poll() is not None)
        else:
            _wait(lambda: loading.exists() or proc.poll() is not None)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == CODES[sig], err
    assert err.strip().splitlines() == [LINES[sig]] and out == ""


@pytest.mark.parametrize(
    ("argv", "orig", "expected"),
    [
        (["/venv/bin/maxbatch", "probe"], ["/venv/bin/python", "/venv/bin/maxbatch"], True),
        (["-m"], ["python", "-m", "maxbatch", "probe", "m.py"], True),
        (["-m"], ["python", "-u", "-m", "maxbatch", "probe"], True),  # torchrun's workers
        (["-m"], ["python", "-m", "maxbatch.run.isotrial", "r.json"], False),  # a trial's child
        (["-m"], ["python", "-m", "pytest"], False),
        (["train.py"], ["python", "train.py"], False),
        (["-c"], ["python", "-c", "import maxbatch"], False),
    ],
)
def test_only_the_command_installs_handlers(
    argv: list[str], orig: list[str], expected: bool
) -> None:
    assert is_command(argv, orig) is expected


@pytest.mark.slow
def test_importing_the_library_changes_no_handler() -> None:
    code = (
        "import signal; before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)"
        "\nimport maxbatch\n"
        "assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
