"""How isolated children die: crashes are named, hangs are killed with their group, a child dies
with its parent, and only the kernel's record of an OOM kill means "does not fit"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from deaths import CRASH, HANG, alive

from maxbatch.cli import main
from maxbatch.errors import ConfigError, DoesNotFitError, WorkloadError
from maxbatch.results import Trial
from maxbatch.run.childproc import oom_kill_records, oom_recorded, signal_name
from maxbatch.run.isolate import _budget_outcome, probe_file

ROOT = Path(__file__).resolve().parent.parent
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals, /proc")


pytestmark = pytest.mark.usefixtures("children_import_this_checkout")


def _gone(pids: list[int], wait: float = 60.0) -> bool:
    """Whether all of ``pids`` end within ``wait`` seconds (a bound, not a measurement)."""
    end = time.monotonic() + wait
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.2)
    return not any(alive(p) for p in pids)


def _pids(path: Path, wait: float = 120.0) -> list[int]:
    end = time.monotonic() + wait
    while not (path.exists() and path.read_text().strip()) and time.monotonic() < end:
        time.sleep(0.2)
    return [int(p) for p in path.read_text().split()]


@LINUX
@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGSEGV", "SIGABRT", "SIGKILL"])
def test_a_crashed_child_is_a_failed_step_that_names_its_signal(tmp_path: Path, name: str) -> None:
    path = tmp_path / "crash.py"
    path.write_text(CRASH.format(name=name))
    with pytest.raises(WorkloadError, match=f"batch size 4 died of {name}") as info:
        probe_file(path, isolate=True, memory="1MiB", profile=False, optimizer="sgd")
    assert info.value.batch_size == 4
    if name == "SIGKILL":  # sent by something other than the kernel's OOM killer
        assert "no out-of-memory kill was recorded" in str(info.value)
    else:
        assert "a crash, not an out-of-memory error" in str(info.value)


@LINUX
@pytest.mark.slow
def test_a_crash_on_the_command_line_is_one_line_and_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "crash.py"
    path.write_text(CRASH.format(name="SIGSEGV"))
    argv = ["probe", str(path), "--memory", "1MiB", "--no-profile", "--isolate"]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert "died of SIGSEGV" in lines[0] and "not an out-of-memory" in lines[0] and len(lines) == 2
    assert res.stdout == ""


@LINUX
@pytest.mark.slow
def test_a_hanging_child_is_killed_with_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, pids = tmp_path / "hang.py", tmp_path / "pids"
    path.write_text(HANG)
    monkeypatch.setenv("HANG_PIDS", str(pids))
    with pytest.raises(WorkloadError, match="did not finish within 20s") as info:
        probe_file(path, isolate=True, memory="1MiB", profile=False, trial_timeout=20)
    assert info.value.batch_size == 4
    assert _gone(_pids(pids))  # the child and the process it started


@LINUX
@pytest.mark.slow
def test_the_time_budget_bounds_a_hanging_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, pids = tmp_path / "hang.py", tmp_path / "pids"
    path.write_text(HANG)
    monkeypatch.setenv("HANG_PIDS", str(pids))
    with pytest.raises(DoesNotFitError, match="time budget of 8s spent before any batch size"):
        probe_file(path, isolate=True, memory="1MiB", profile=False, time_budget=8)
    if pids.exists():  # the child may not have reached the step within the budget
        assert _gone(_pids(pids))


PARENT = textwrap.dedent(
    """
    import sys
    from maxbatch.run.isolate import probe_file
    probe_file(sys.argv[1], isolate=True, memory="1MiB", profile=False)
    """
)


@LINUX
@pytest.mark.slow
def test_a_child_dies_with_its_parent_killed_by_sigkill(tmp_path: Path) -> None:
    path, pids = tmp_path / "hang.py", tmp_path / "pids"
    path.write_text(HANG)
    env = {**os.environ, "HANG_PIDS": str(pids)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(path)], env=env)
    try:
        child, helper = _pids(pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _gone([child])  # PR_SET_PDEATHSIG (and the stdin watch) end it
    finally:
        parent.kill()
        parent.wait()
    os.kill(helper, signal.SIGKILL)  # the helper is the step's own business, not maxbatch's


# -- pure parts: the kernel's records, the outcome when the budget ends mid-trial ----------------


def test_oom_kill_records_read_proc_and_both_cgroup_versions(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "vmstat").write_text("nr_free_pages 12\noom_kill 3\n")
    (proc / "self" / "cgroup").write_text("5:memory:/job/a\n0::/job/b\n")
    (cgroup / "memory" / "job" / "a").mkdir(parents=True)
    (cgroup / "memory" / "job" / "a" / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"
    )
    (cgroup / "job" / "b").mkdir(parents=True)
    (cgroup / "job" / "b" / "memory.events").write_text("low 0\noom 2\noom_kill 2\n")
    records = oom_kill_records(proc, cgroup)
    assert sorted(records.values()) == [1, 2, 3]
    assert oom_kill_records(tmp_path / "none", tmp_path / "none") == {}
    assert oom_recorded(records, {**records, str(proc / "vmstat"): 4})
    assert not oom_recorded(records, records) and not oom_recorded(records, {})


def test_the_records_of_this_machine_are_numbers() -> None:
    if not Path("/proc/vmstat").exists():
        pytest.skip("no /proc")
    assert all(isinstance(v, int) and v >= 0 for v in oom_kill_records().values())


def test_signal_names() -> None:
    assert signal_name(11).startswith("SIGSEGV (") and signal_name(77) == "signal 77"


def test_a_budget_that_ends_mid_trial_keeps_the_best_so_far() -> None:
    done = {
        4: Trial(batch_size=4, fits=True, peak_bytes=100, seconds=1.0),
        8: Trial(batch_size=8, fits=True, peak_bytes=180, seconds=1.0),
    }
    outcome = _budget_outcome(done, 16, 30.0, 1000)
    assert outcome.ceiling == 8 and not outcome.complete
    assert "while the trial at 16 ran" in outcome.stop_reason
    with pytest.raises(DoesNotFitError, match="before any batch size fitted"):
        _budget_outcome(
            {4: Trial(batch_size=4, fits=False, peak_bytes=2000, seconds=1.0, oom=True)},
            2,
            30.0,
            1000,
        )


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), "10", True])
def test_trial_timeout_must_be_positive_seconds(value: object) -> None:
    with pytest.raises(ConfigError, match="trial_timeout="):
        probe_file(ROOT / "examples" / "mlp.py", isolate=True, trial_timeout=value)


def test_trial_timeout_without_isolate_is_a_usage_error() -> None:
    argv = ["probe", str(ROOT / "examples" / "mlp.py"), "--memory", "64MiB", "--no-cache"]
    res = CliRunner().invoke(main, [*argv, "--trial-timeout", "5"])
    assert res.exit_code == 2 and "add --isolate" in res.stderr


@LINUX
@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_of_the_probe_kills_the_running_child(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    path, pids = tmp_path / "hang.py", tmp_path / "pids"
    path.write_text(HANG)
    env = {**os.environ, "HANG_PIDS": str(pids)}
    argv = [sys.executable, "-m", "maxbatch", "probe", str(path), "--memory", "1MiB", "--isolate"]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        child, helper = _pids(pids)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].endswith("after 0 trials; the model is restored"), err
    assert _gone([child, helper])  # the whole group: the step's own helper too
