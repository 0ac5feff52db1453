"""Model files whose step ends its process or hangs, and what ``/proc`` says of a process.

One home for what the isolation tests (``test_isolate_deaths.py``, ``test_early_signals.py``)
and the reliability benchmark (``benchmarks/processes.py``) write and read.
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

__all__ = ["CRASH", "HANG", "alive", "handles_sigterm"]

# A step that ends its process with a signal at every size (no core file: RLIMIT_CORE 0);
# ``CRASH.format(name="SIGSEGV")``.
CRASH = textwrap.dedent(
    """
    import os, resource, signal
    import torch

    model = torch.nn.Linear(8, 2)
    sample = torch.randn(4, 8)

    def forward(model, batch):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.{name})
        return model(batch)
    """
)

# A step that hangs, after writing its pid and the pid of a process it started (same group) to
# the file named by the environment's ``HANG_PIDS``.
HANG = textwrap.dedent(
    """
    import os, subprocess, sys, time
    import torch

    model = torch.nn.Linear(8, 2)
    sample = torch.randn(4, 8)

    def forward(model, batch):
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        with open(os.environ["HANG_PIDS"], "a") as f:
            f.write(f"{os.getpid()} {helper.pid}\\n")
        while True:
            time.sleep(1)
    """
)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def handles_sigterm(pid: int) -> bool:
    """Whether the process catches SIGTERM (Python does not by default: ours is installed)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
