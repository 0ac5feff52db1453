"""This machine's limits: the bytes this process can still allocate, for a virtual device.

A virtual device on the CPU holds real tensors in host memory, so its capacity is compared with
what this process can still hold (free memory, the cgroup's limit, ``RLIMIT_AS``): a capacity beyond
it is said up front (:attr:`~maxbatch.devices.capacity.Capacity.beyond_host`) and answered by the
fake-tensor estimate, since a host out-of-memory error is no answer for the device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import psutil
import torch

from maxbatch.devicekinds import kind_of
from maxbatch.units import format_bytes

#: Share of the host's room kept for what the counter does not see (the allocator's slack,
#: Python objects, the snapshot's host copies, the fake step of an estimate).
HOST_MARGIN = 0.10

CGROUP = Path("/sys/fs/cgroup")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostLimit:
    """The bytes this process can still allocate, and the limit that says so.

    Attributes:
        free_bytes: what can still be allocated under the tightest limit.
        source: which limit that is (``"free host memory"``, ``"cgroup memory.max"``, ...).
        limit_bytes: that limit's own size (the cgroup's or RLIMIT_AS's), None for free memory.
    """

    free_bytes: int
    source: str
    limit_bytes: int | None = None

    def describe(self) -> str:
        """E.g. ``1.21 GiB left under RLIMIT_AS (1.50 GiB)``, ``19.5 GiB of free host memory``."""
        if self.limit_bytes is None:
            return f"{format_bytes(self.free_bytes)} of {self.source}"
        return (
            f"{format_bytes(self.free_bytes)} left under {self.source} "
            f"({format_bytes(self.limit_bytes)})"
        )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup(root: Path) -> tuple[int, int, str] | None:
    """(limit, usage, name) of the cgroup this process is in (v2, else v1), or None."""
    limit = _read_int(root / "memory.max")
    usage = _read_int(root / "memory.current")
    if limit is not None and usage is not None:
        return limit, usage, "cgroup memory.max"
    limit = _read_int(root / "memory" / "memory.limit_in_bytes")
    usage = _read_int(root / "memory" / "memory.usage_in_bytes")
    if limit is not None and usage is not None and limit < 2**60:  # v1 says "none" with 2^63
        return limit, usage, "cgroup memory.limit_in_bytes"
    return None


def host_limit(cgroup_root: Path = CGROUP, *, address_space: bool = True) -> HostLimit:
    """The tightest of free host memory, the cgroup's limit and RLIMIT_AS, as bytes left.

    Args:
        cgroup_root: where the cgroup's memory files are.
        address_space: also take RLIMIT_AS (the soft limit less this process's virtual size).

    Returns:
        The tightest limit.
    """
    found = [
        HostLimit(free_bytes=int(psutil.virtual_memory().available), source="free host memory")
    ]
    group = _cgroup(cgroup_root)
    if group is not None:
        limit, usage, name = group
        found.append(HostLimit(free_bytes=max(0, limit - usage), source=name, limit_bytes=limit))
    try:
        import resource
    except ImportError:  # not on Windows
        resource = None  # type: ignore[assignment]
    if resource is not None and address_space:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            used = int(psutil.Process().memory_info().vms)
            found.append(
                HostLimit(free_bytes=max(0, soft - used), source="RLIMIT_AS", limit_bytes=soft)
            )
    return min(found, key=lambda h: h.free_bytes)


def host_room(base_bytes: int, limit: HostLimit) -> int:
    """The largest virtual capacity whose trials this machine can hold.

    Args:
        base_bytes: what the model and its state hold already (they are resident).
        limit: what this process can still allocate.

    Returns:
        The bytes.
    """
    return base_bytes + int((1 - HOST_MARGIN) * limit.free_bytes)


def beyond_host(capacity_bytes: int, base_bytes: int, device: torch.device) -> str | None:
    """Say so when a virtual capacity on the CPU is more than this process can hold, else None."""
    if not kind_of(device).host_memory:
        return None
    limit = host_limit()
    room = host_room(base_bytes, limit)
    if capacity_bytes <= room:
        return None
    return (
        f"the capacity {format_bytes(capacity_bytes)} is more than this machine can hold for the "
        f"probe ({limit.describe()}: about {format_bytes(room)} with the model)"
    )
