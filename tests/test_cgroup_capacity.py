"""The CPU's capacity without ``memory=``: a container's cgroup limit bounds it.

Past a cgroup's ``memory.max`` the kernel's OOM killer ends the process (no probe survives a
SIGKILL), so the probe must aim below what the cgroup leaves, not at the host's free memory. The
cgroup files are written to a temporary folder that stands in for ``/sys/fs/cgroup``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import maxbatch.devices.capacity as capacity
from maxbatch import find_batch_size
from maxbatch.devices.device import describe
from maxbatch.settings import MemorySettings

MiB = 2**20


def _cgroup(root: Path, limit: int, usage: int) -> Path:
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{usage}\n")
    return root


def test_the_cgroup_limit_bounds_the_cpu_capacity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capacity, "CGROUP", _cgroup(tmp_path, 96 * MiB, 32 * MiB))
    plan = capacity.probe_capacity(describe(torch.device("cpu")), MemorySettings(), 5 * MiB, None)
    assert plan.capacity_bytes == 64 * MiB + 5 * MiB
    assert plan.note is not None and "cgroup memory.max" in plan.note
    assert not plan.virtual


def test_without_a_cgroup_limit_the_host_memory_is_the_capacity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capacity, "CGROUP", tmp_path)  # no memory files: no limit
    info = describe(torch.device("cpu"))
    plan = capacity.probe_capacity(info, MemorySettings(), 5 * MiB, None)
    assert plan.capacity_bytes > 5 * MiB
    assert plan.note is not None and "host's available memory" in plan.note


def test_a_probe_in_a_container_finds_the_ceiling_its_limit_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    sample = torch.randn(4, 64)
    monkeypatch.setattr(capacity, "CGROUP", _cgroup(tmp_path, 24 * MiB, 16 * MiB))
    contained = find_batch_size(model, sample, headroom=0, profile=False)
    # The cgroup leaves 8 MiB beside what the model and optimizer state already hold.
    assert not contained.virtual and contained.capacity_bytes > 8 * MiB
    virtual = find_batch_size(model, sample, memory=contained.capacity_bytes, profile=False)
    assert contained.ceiling == virtual.ceiling
    above = [t for t in contained.trials if t.batch_size == contained.ceiling + 1]
    assert above and not above[0].fits
