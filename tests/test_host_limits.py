"""A virtual device larger than this machine: answered by the estimate, never by the host's OOM.

The probes run in a child process under ``resource.setrlimit(RLIMIT_AS)`` (1.5 GiB of address
space, about 0.9 GiB of it left once torch is loaded), as a container with little memory would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maxbatch.devices.host import HostLimit, host_limit, host_room

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "examples" / "mlp.py")
LIMIT = int(1.5 * 2**30)

resource = pytest.importorskip("resource")  # not on Windows

CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import torch
torch.set_num_threads(1)
from maxbatch.cli import main
main({args!r})
"""


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = CHILD.format(limit=LIMIT, args=["probe", *args])
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )


def test_host_limit_reads_the_tightest_limit(tmp_path: Path) -> None:
    here = host_limit(tmp_path)  # no cgroup files there: free memory or RLIMIT_AS
    assert here.free_bytes > 0 and here.source in {"free host memory", "RLIMIT_AS"}
    (tmp_path / "memory.max").write_text("1048576\n")
    (tmp_path / "memory.current").write_text("524288\n")
    tight = host_limit(tmp_path)
    assert tight == HostLimit(free_bytes=524288, source="cgroup memory.max", limit_bytes=1048576)
    assert "512.00 KiB left under cgroup memory.max (1.00 MiB)" in tight.describe()
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit
    assert host_limit(tmp_path).source != "cgroup memory.max"
    assert host_room(1000, HostLimit(free_bytes=1000, source="x")) == 1900


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["8GiB", "1000TiB"])
def test_a_capacity_larger_than_this_machine_is_estimated(memory: str) -> None:
    res = _probe(MLP, "--memory", memory, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ceiling_source"] == "estimated"
    assert data["trials"] == []  # no real trial: the host could not have held one near the cap
    assert "more than this machine can hold" in res.stderr  # said up front, before the answer
    est = subprocess.run(
        [sys.executable, "-m", "maxbatch", "estimate", MLP, "--memory", memory, "--json"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert est.returncode == 0, est.stderr
    assert data["ceiling"] == json.loads(est.stdout)["capacities"][0]["ceiling"]


@pytest.mark.slow
def test_text_output_says_estimated_and_a_cap_this_machine_holds_is_measured() -> None:
    res = _probe(MLP, "--memory", "8GiB", "--no-profile")
    assert res.returncode == 0, res.stderr
    assert "estimated" in res.stdout
    small = _probe(MLP, "--memory", "64MiB", "--no-profile", "--json")
    assert small.returncode == 0, small.stderr
    data = json.loads(small.stdout)
    assert data["ceiling_source"] == "measured" and data["ceiling"] == 414


def test_a_host_oom_below_the_virtual_cap_is_not_the_devices_answer() -> None:
    import torch
    from torch import nn

    from maxbatch import find_batch_size
    from maxbatch.errors import HostMemoryError

    model = nn.Linear(8, 2)

    def forward(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] >= 64:  # the host's allocator gives out (a real CPU OOM), the cap not
            torch.empty(2**62, dtype=torch.uint8)
        return m(batch)

    with pytest.raises(HostMemoryError, match="this machine ran out of memory at batch size"):
        find_batch_size(model, torch.randn(4, 8), forward_fn=forward, memory="1GiB")
    # without a cap the host is the device: its OOM is the answer
    result = find_batch_size(
        model, torch.randn(4, 8), forward_fn=forward, profile=False, max_batch_size=1000
    )
    assert result.ceiling == 63


@pytest.mark.slow
def test_without_memory_the_address_space_limit_is_the_cpu_capacity() -> None:
    # Issue 21: without --memory the capacity was the host's free memory, far above RLIMIT_AS, so
    # each failed trial died at its first allocation with no peak to predict from (20 trials).
    res = _probe(MLP, "--no-profile", "--no-cache", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert any("address-space limit" in n and "RLIMIT_AS" in n for n in data["notes"])
    assert not data["virtual"] and data["capacity_bytes"] < LIMIT
    sizes = [t["batch_size"] for t in data["trials"]]
    assert len(sizes) <= 4, sizes  # the first trial's peak predicts the ceiling
    assert data["ceiling"] + 1 in sizes  # still verified: the size above ran out of memory
