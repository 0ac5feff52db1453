"""Ctrl-C or SIGTERM while the step is timed keeps the verified ceiling (issue 21 item 5).

A real child process runs the CLI; the test sends it a real signal once it prints its first timed
size (after the ceiling search), then checks the answer on stdout, the exit code and the cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A small model whose step is slow (a sleep in forward), so that timing takes seconds after the
# first timed size: the signal comes while the profiler is still at work.
MODEL = textwrap.dedent(
    """
    import time
    import torch

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            time.sleep(0.03)
            return self.fc(x)

    model = Slow()
    sample = torch.randn(8, 64)
    """
)


def _probe(tmp_path: Path, *args: str, stop: int | None = None) -> subprocess.CompletedProcess[str]:
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "maxbatch", "probe", str(model), "--memory", "2MiB", *args]
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    assert child.stderr is not None
    seen = []
    if stop is not None:
        for line in child.stderr:  # progress lines, one per trial and per timed size
            seen.append(line)
            if line.startswith("timed batch"):
                child.send_signal(stop)
                break
    out, err = child.communicate(timeout=300)
    return subprocess.CompletedProcess(argv, child.returncode, out, "".join(seen) + err)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [(signal.SIGINT, 130, "maxbatch: interrupted after"), (signal.SIGTERM, 143, "terminated")],
)
def test_an_interrupt_while_timing_prints_and_caches_the_ceiling(
    tmp_path: Path, sig: int, code: int, line: str
) -> None:
    stopped = _probe(tmp_path, "--json", stop=sig)
    assert stopped.returncode == code, stopped.stderr
    assert line in stopped.stderr.splitlines()[-1]
    answer = json.loads(stopped.stdout)
    ceiling = answer["ceiling"]
    assert answer["batch_size"] == ceiling and answer["complete"]
    timed = [p["batch_size"] for p in answer["throughput"]]
    assert timed and all(b <= ceiling for b in timed)
    assert "unfinished (not a pick)" in answer["pick_reason"]
    assert any(n.startswith("profiler: interrupted by") for n in answer["notes"])
    assert answer["pick_confidence"] is None  # nothing was picked by timing

    again = _probe(tmp_path, "--json", "--no-profile", "--trust-cache")
    assert again.returncode == 0, again.stderr
    cached = json.loads(again.stdout)
    assert cached["from_cache"] and cached["ceiling"] == cached["batch_size"] == ceiling
    assert "trial " not in again.stderr  # answered from the cache: no step ran
    assert not any("interrupted" in n for n in cached["notes"])
    assert cached["pick_reason"] == "the ceiling: timing was off (--no-profile, profile=False)"
