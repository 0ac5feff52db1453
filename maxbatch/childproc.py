"""A child process held on a leash: bounded in time, dying with its parent, its death told apart.

:func:`run_child` starts a command in a session (and process group) of its own, its stdin a pipe
the parent holds, and waits at most ``timeout`` seconds: past it, or if the parent is interrupted,
the whole group is killed with SIGKILL. The child calls :func:`die_with_parent` first thing: on
Linux the kernel sends it SIGKILL when the parent dies (``PR_SET_PDEATHSIG``), and everywhere a
thread kills its process group when the pipe on stdin reaches end of file (the parent's end closes
when the parent dies, however it dies).

A death by signal is an out-of-memory kill only with the kernel's record of one: SIGKILL while
the OOM-kill counters (``/proc/vmstat``, the cgroup's ``memory.events`` or ``memory.oom_control``)
went up. Any other death (SIGSEGV, SIGABRT, a SIGKILL someone else sent) is a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ChildExit", "die_with_parent", "oom_kill_records", "run_child", "signal_name"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def signal_name(number: int) -> str:
    """``SIGSEGV (Segmentation fault)`` for 11; ``signal 77`` for a number without a name."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    what = signal.strsignal(number)
    return f"{name} ({what})" if what else name


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildExit:
    """How a child ended.

    Attributes:
        returncode: the exit code, or minus the signal that killed it (as ``subprocess``).
        seconds: from its start to its end.
        stderr: the last lines it wrote to stderr.
        timed_out: it ran past the timeout and its process group was killed.
        oom_killed: it died of SIGKILL while the kernel recorded an out-of-memory kill.
    """

    returncode: int
    seconds: float
    stderr: str
    timed_out: bool = False
    oom_killed: bool = False

    @property
    def signal(self) -> int | None:
        """The signal that killed it, or None if it exited."""
        return -self.returncode if self.returncode < 0 and not self.timed_out else None


def _counter(path: Path, key: str) -> int | None:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def oom_kill_records(
    proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")
) -> dict[str, int]:
    """The kernel's out-of-memory kill counters this process can read, by file.

    ``/proc/vmstat``'s ``oom_kill`` (every kill on the machine, Linux 4.13+); the cgroup v2
    ``memory.events`` and the cgroup v1 ``memory.oom_control`` of this process's cgroup.

    Returns:
        ``{file: count}`` for each counter found (empty where none is, e.g. not Linux).
    """
    records: dict[str, int] = {}
    places: list[tuple[Path, str]] = [(proc / "vmstat", "oom_kill")]
    try:
        mine = (proc / "self" / "cgroup").read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        mine = []
    for line in mine:
        _, controllers, where = line.split(":", 2) if line.count(":") >= 2 else ("", "x", "")
        rel = where.lstrip("/")
        if controllers == "":
            places.append((cgroup / rel / "memory.events", "oom_kill"))
        elif "memory" in controllers.split(","):
            places.append((cgroup / "memory" / rel / "memory.oom_control", "oom_kill"))
    for file, key in places:
        count = _counter(file, key)
        if count is not None:
            records[str(file)] = count
    return records


def oom_recorded(before: Mapping[str, int], after: Mapping[str, int]) -> bool:
    """Whether any counter read both times went up."""
    return any(after[k] > v for k, v in before.items() if k in after)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own group (a new session)
    proc.wait()


def run_child(argv: Sequence[str], *, timeout: float | None) -> ChildExit:
    """Run ``argv`` in a new session, kill its group past ``timeout`` seconds or on interrupt.

    Returns:
        How it ended (see :class:`ChildExit`).
    """
    before = oom_kill_records()
    with tempfile.TemporaryFile(prefix="maxbatch-child-") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,  # held open by this process: EOF there means it died
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own group: killed whole, and no terminal's Ctrl-C
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # Ctrl-C, SIGTERM: the child must not outlive the probe
            _kill_group(proc)
            raise
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # what the child left behind (workers)
        seconds = time.perf_counter() - started
        err.seek(0)
        stderr = err.read().decode("utf-8", errors="replace")
    killed = proc.returncode == -signal.SIGKILL and not timed_out
    return ChildExit(
        returncode=proc.returncode,
        seconds=seconds,
        stderr=" | ".join(stderr.strip().splitlines()[-3:]),
        timed_out=timed_out,
        oom_killed=killed and oom_recorded(before, oom_kill_records()),
    )


def _watch_stdin() -> None:
    """Block on stdin; at end of file (the parent died) kill this process's group."""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """In the child: end when ``parent`` (the process that started it) ends, however it ends.

    On Linux the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``); everywhere a
    daemon thread kills this process's group when stdin (a pipe the parent holds) closes. A
    parent already gone before this ran ends the child at once.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_stdin, name="maxbatch-parent-watch", daemon=True).start()
