"""Reliability sections across processes and at the edges (issue 18: 1, 2, 10, 11, 12, 15).

Each function returns ``(cases handled, cases tried, what went wrong)``; ``reliability.py``
prints them as rows:

- ``isolated_deaths``: children of ``--isolate`` that crash (SIGSEGV, SIGABRT, SIGBUS, SIGFPE,
  SIGILL, a SIGKILL without the kernel's OOM record), hang (``trial_timeout``, ``time_budget``,
  the process the step started included), or lose their parent to SIGKILL;
- ``early_signals``: SIGINT and SIGTERM while torch imports and while the model file loads, for
  ``python -m maxbatch`` and the console script;
- ``absurd_sizes``: sizes past any device, ``inf`` and ``nan`` through every entry point;
- ``meta_models``: models without weights given to the probe;
- ``report_link_parents``: ``--report`` under a parent that is a link, and a link named.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the model files that crash or hang, shared with the tests

from deaths import CRASH, HANG, alive, handles_sigterm  # noqa: E402

Outcome = tuple[int, int, list[str]]

_PARENT = (
    "import sys\nfrom maxbatch.run.isolate import probe_file\n"
    "probe_file(sys.argv[1], isolate=True, memory='1MiB', profile=False)\n"
)


def _until(check: Callable[[], bool], seconds: float = 120.0) -> bool:
    end = time.monotonic() + seconds
    while not check() and time.monotonic() < end:
        time.sleep(0.05)
    return check()


def _pids(path: Path) -> list[int]:
    _until(lambda: path.exists() and bool(path.read_text().strip()))
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _crash(tmp: Path, name: str) -> str | None:
    from maxbatch.errors import WorkloadError
    from maxbatch.run.isolate import probe_file

    path = tmp / f"crash_{name}.py"
    path.write_text(CRASH.format(name=name))
    try:
        probe_file(path, isolate=True, memory="1MiB", profile=False, optimizer="sgd")
    except WorkloadError as e:
        return None if f"died of {name}" in str(e) and e.batch_size == 4 else str(e)[:120]
    return "an answer"


def _hang(tmp: Path, **limits: Any) -> str | None:
    from maxbatch.errors import DoesNotFitError, WorkloadError
    from maxbatch.run.isolate import probe_file

    path, pids = tmp / "hang.py", tmp / ("pids_" + "_".join(limits))
    path.write_text(HANG)
    os.environ["HANG_PIDS"] = str(pids)
    want = "did not finish" if "trial_timeout" in limits else "time budget"
    try:
        probe_file(path, isolate=True, memory="1MiB", profile=False, **limits)
    except (WorkloadError, DoesNotFitError) as e:
        left = [p for p in (_pids(pids) if pids.exists() else []) if alive(p)]
        if want not in str(e):
            return str(e)[:120]
        ended = _until(lambda: not any(map(alive, left)), 60)
        return None if ended else f"still running: {left}"
    return "an answer"


def _orphan(tmp: Path) -> str | None:
    path, pids = tmp / "hang.py", tmp / "pids_orphan"
    path.write_text(HANG)
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(path)], env=_env(HANG_PIDS=str(pids))
    )
    try:
        child, helper = _pids(pids)
        parent.kill()
        parent.wait()
        gone = _until(lambda: not alive(child), 60)
    finally:
        parent.kill()
        parent.wait()
    os.kill(helper, signal.SIGKILL)  # the step's own helper, which it started itself
    return None if gone else f"the child {child} outlived its parent"


def isolated_deaths() -> Outcome:
    """Isolated children that crash, hang or are orphaned: each told apart and ended."""
    os.environ.update(_env())
    cases: dict[str, Callable[[Path], str | None]] = {
        name: (lambda tmp, name=name: _crash(tmp, name))
        for name in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGFPE", "SIGILL", "SIGKILL")
    }
    cases["hang, trial_timeout=15"] = lambda tmp: _hang(tmp, trial_timeout=15)
    cases["hang, time_budget=8"] = lambda tmp: _hang(tmp, time_budget=8)
    cases["parent killed by SIGKILL"] = _orphan
    wrong = []
    with tempfile.TemporaryDirectory() as tmp:
        for what, case in cases.items():
            why = case(Path(tmp))
            if why is not None:
                wrong.append(f"{what}: {why}")
    return len(cases) - len(wrong), len(cases), wrong


def _early(tmp: Path, argv: list[str], sig: int, when: str) -> str | None:
    model, loading = tmp / "slow.py", tmp / "loading"
    model.write_text('import os, time\nopen(os.environ["LOADING"], "w").close()\ntime.sleep(600)\n')
    loading.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [*argv, "probe", str(model), "--memory", "1MiB"],
        env=_env(LOADING=str(loading)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = (lambda: handles_sigterm(proc.pid)) if when == "import" else loading.exists
        _until(lambda: ready() or proc.poll() is not None)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    code = 143 if sig == signal.SIGTERM else 130
    lines = err.strip().splitlines()
    ok = proc.returncode == code and len(lines) == 1 and "no trial was running" in lines[0]
    return None if ok and not out else f"exit {proc.returncode}, {len(lines)} lines: {lines[-1:]}"


def early_signals() -> Outcome:
    """SIGINT / SIGTERM while torch imports and while the model file loads: one line, 130/143."""
    wrong, tried = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "maxbatch"
        script.write_text("import sys\nfrom maxbatch.cli import main\nsys.exit(main())\n")
        commands = {
            "-m": [sys.executable, "-m", "maxbatch"],
            "script": [sys.executable, str(script)],
        }
        for how, argv in commands.items():
            for sig in (signal.SIGINT, signal.SIGTERM):
                for when in ("import", "load"):
                    tried += 1
                    why = _early(Path(tmp), argv, sig, when)
                    if why is not None:
                        wrong.append(f"{how} {sig.name} at {when}: {why}")
    return tried - len(wrong), tried, wrong


DIGITS = "9" * 400
_SIZES: list[Any] = [DIGITS, f"{DIGITS}GiB", "1" + "0" * 30, "inf", "nan", "1e300", "2EiB"]
_SIZES += [math.inf, -math.inf, math.nan, 10**400, 1e300, 2**60 + 1]


def _refused(call: Callable[[], Any]) -> bool:
    from maxbatch.errors import ConfigError

    try:
        call()
    except ConfigError:
        return True
    except Exception:  # noqa: BLE001 - any other ending is the failure counted
        return False
    return False


def absurd_sizes() -> Outcome:
    """Absurd sizes through the library's entry points and both commands: a ConfigError, exit 2."""
    import torch
    from click.testing import CliRunner

    from maxbatch import estimate_batch_size, find_batch_size, virtual_device
    from maxbatch.cli import main

    def entered(value: Any) -> None:
        with virtual_device(value):
            pass

    model, sample = torch.nn.Linear(4, 2), torch.randn(2, 4)
    entries: dict[str, Callable[[Any], Any]] = {
        "find_batch_size": lambda v: find_batch_size(model, sample, memory=v, profile=False),
        "estimate_batch_size": lambda v: estimate_batch_size(model, sample, memory=v),
        "virtual_device": entered,
    }
    wrong, tried = [], 0
    for name, entry in entries.items():
        for value in _SIZES:
            tried += 1
            if not _refused(lambda entry=entry, value=value: entry(value)):
                wrong.append(f"{name}({str(value)[:20]})")
    mlp = str(ROOT / "examples" / "mlp.py")
    for command in ("probe", "estimate"):
        for value in (v for v in _SIZES if isinstance(v, str)):
            tried += 1
            res = CliRunner().invoke(main, [command, mlp, "--memory", value])
            lines = res.stderr.strip().splitlines()
            if res.exit_code != 2 or len(lines) != 1 or len(lines[0]) > 200:
                wrong.append(f"{command} --memory {value[:20]}: exit {res.exit_code}")
    return tried - len(wrong), tried, wrong


def meta_models() -> Outcome:
    """Models without weights given to the probe: one ConfigError that points at estimate."""
    import torch
    from click.testing import CliRunner

    from maxbatch import find_batch_size
    from maxbatch.cli import main

    with torch.device("meta"):
        whole = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
        part = torch.nn.Linear(4, 2)
    mixed = torch.nn.Sequential(torch.nn.Linear(8, 4), part)
    wrong, tried = [], 0
    for name, model in {"all on meta": whole, "one layer on meta": mixed}.items():
        tried += 1
        call = lambda model=model: find_batch_size(  # noqa: E731
            model, torch.randn(2, 8), memory="1MiB", profile=False
        )
        if not _refused(call):
            wrong.append(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "meta.py"
        path.write_text(
            "import torch\nwith torch.device('meta'):\n    model = torch.nn.Linear(8, 2)\n"
            "sample = torch.randn(2, 8)\n"
        )
        os.environ.update(_env())
        for extra in ([], ["--isolate"]):
            tried += 1
            res = CliRunner().invoke(main, ["probe", str(path), "--memory", "1MiB", *extra])
            lines = res.stderr.strip().splitlines()
            if res.exit_code != 2 or len(lines) != 1 or "only estimate" not in lines[0]:
                wrong.append(f"probe {' '.join(extra)}: exit {res.exit_code} {lines[-1:]}")
    return tried - len(wrong), tried, wrong


def report_link_parents() -> Outcome:
    """``--report`` under linked parents is written into the target; a named link is refused."""
    from maxbatch.errors import ConfigError
    from maxbatch.store.reportfiles import write_report

    def one(folder: Path) -> list[str]:
        (folder / "report.json").write_text("{}")
        return ["report.json"]

    wrong = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "target").mkdir()
        (root / "a").symlink_to(root / "target", target_is_directory=True)
        for sub in (("b",), ("b", "c")):
            write_report(root.joinpath("a", *sub), one)
            if not root.joinpath("target", *sub, "report.json").exists():
                wrong.append(f"a/{'/'.join(sub)} not written into the link's target")
        for named in (root / "a", root / "target" / ".." / "a"):
            try:
                write_report(named, one)
                wrong.append(f"{named} written through a link")
            except ConfigError:
                pass
    return 4 - len(wrong), 4, wrong
