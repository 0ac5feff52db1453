"""How many bytes a step may use: the capacity and headroom policy of each device kind.

This is the one home of the usable bytes: ``capacity - reserved - headroom``. The probe's meter
and search and the estimate's rows all read them from a :class:`Capacity`.

- A ``memory=`` cap (the virtual device): the cap, no headroom by default.
- CUDA: the free memory plus what this process already holds; 5 % headroom (at least 256 MiB)
  for what counting live tensors cannot see (fragmentation, the context, cuBLAS/cuDNN
  workspaces, other processes growing meanwhile).
- CPU and MPS: the available memory (on the CPU, at most what a container's cgroup limit or
  RLIMIT_AS leaves) plus the model (already resident), the same headroom.
- Inside a user's :func:`~maxbatch.virtual_device` the smaller cap wins (theirs counts what
  ours does not): the probe is virtual, its capacity the room the enclosing counters leave.
- An estimate for CUDA also reserves :data:`CUDA_CONTEXT_BYTES` for the context.
- This machine's limits: a virtual device on the CPU holds real tensors in host memory, so its
  capacity is compared with what this process can still hold (free memory, the cgroup's limit,
  ``RLIMIT_AS``): a capacity beyond it is said up front (:attr:`Capacity.beyond_host`) and answered
  by the fake-tensor estimate, since a host out-of-memory error is no answer for the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil
import torch

from maxbatch.devices.virtual import EnclosingDevices
from maxbatch.errors import ConfigError
from maxbatch.results import DeviceInfo
from maxbatch.settings import MemorySettings, Target
from maxbatch.units import format_bytes

#: Default headroom on a real device: this share of the capacity, at least ``MIN_HEADROOM`` bytes.
HEADROOM_FRACTION = 0.05
MIN_HEADROOM = 256 * 1024**2

#: Memory a CUDA context takes on the device before any tensor: an assumption (it is 300 MiB to
#: over 1 GiB, by GPU, driver, CUDA version and lazy module loading), subtracted for a CUDA target.
CUDA_CONTEXT_BYTES = 500 * 1024**2


def default_headroom(capacity_bytes: int, *, virtual: bool) -> int:
    """The headroom used when none is given: 0 under a ``memory=`` cap, else 5 % (>= 256 MiB)."""
    if virtual:
        return 0
    return min(capacity_bytes // 2, max(MIN_HEADROOM, int(HEADROOM_FRACTION * capacity_bytes)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Capacity:
    """The bytes a step may use on one device (or one estimated capacity).

    Attributes:
        kind: the device kind (``"cuda"``, ``"mps"``, ``"cpu"``) or the estimate's target.
        capacity_bytes: the device's memory as the policy counts it.
        reserved_bytes: taken before any tensor (the CUDA context of an estimate), else 0.
        headroom_bytes: kept free below the capacity.
        base_bytes: live before any trial (the model and its state), for the search's first jump.
        virtual: True when the capacity is a ``memory=`` cap enforced by counting.
        note: how the capacity was found, when the user should know it.
        beyond_host: why a virtual capacity cannot be probed on this machine (it holds less), or
            None: the ceiling is then estimated on fake tensors.
    """

    kind: str
    capacity_bytes: int
    reserved_bytes: int = 0
    headroom_bytes: int
    base_bytes: int = 0
    virtual: bool
    note: str | None = None
    beyond_host: str | None = None

    @property
    def usable_bytes(self) -> int:
        """The bytes a trial may peak at: capacity minus the reserve and the headroom."""
        return self.capacity_bytes - self.reserved_bytes - self.headroom_bytes


def counts_live_bytes(kind: str, virtual: bool) -> bool:
    """Whether a probe on a device of ``kind`` counts live bytes (else CUDA's own counters)."""
    return virtual or kind != "cuda"


def is_virtual(device: torch.device, limits: MemorySettings) -> bool:
    """Whether a probe on ``device`` runs on a virtual device: a cap, or the user's around it."""
    return limits.virtual or EnclosingDevices.present(device)


@contextlib.contextmanager
def enclosing_room(device: torch.device, state: Iterable[torch.Tensor]) -> Iterator[int | None]:
    """Lend the user's enclosing virtual devices to the probe; yield the room they leave.

    Their caps are lifted inside and put back on leaving.

    Yields:
        The bytes the enclosing counters leave the probe, or None outside any.
    """
    lent = EnclosingDevices(device, state)
    try:
        yield lent.capacity_bytes
    finally:
        lent.restore()


def probe_capacity(
    info: DeviceInfo, limits: MemorySettings, base_bytes: int, enclosing_bytes: int | None
) -> Capacity:
    """The probe's capacity on the device ``info`` describes, with ``base_bytes`` already live.

    Args:
        info: the device, read before the workload was prepared.
        limits: the cap and the headroom asked for.
        base_bytes: what the model and its state hold before any trial.
        enclosing_bytes: the room the user's enclosing virtual devices leave, or None.

    Returns:
        The capacity, headroom and base bytes on this device.

    Raises:
        ConfigError: nothing is usable above what the model and optimizer already hold.
    """
    note = None
    virtual = limits.virtual or enclosing_bytes is not None
    if enclosing_bytes is not None:
        capacity = (
            enclosing_bytes
            if limits.memory_bytes is None
            else min(limits.memory_bytes, enclosing_bytes)
        )
        note = f"inside a virtual device: capacity {format_bytes(capacity)}"
    elif limits.memory_bytes is not None:
        capacity = limits.memory_bytes
    elif info.kind == "cuda":
        capacity = info.capacity_bytes
    elif info.kind == "cpu":
        # A container's cgroup limit is enforced by the kernel's OOM killer (SIGKILL: no probe
        # survives it), so it bounds the capacity; so does RLIMIT_AS, as under ``memory=``: past
        # it a step fails at its first large allocation and leaves no peak to predict from
        # (issue 21: 20 trials and 262 s under ``prlimit --as=6GiB`` when it was not taken).
        limit = host_limit(CGROUP)
        # Under RLIMIT_AS, address space the counter does not see (allocator slack, arenas)
        # counts too: the --memory path's margin (host_room) keeps the trials off its edge.
        aspace = limit.source == "RLIMIT_AS"
        capacity = host_room(base_bytes, limit) if aspace else limit.free_bytes + base_bytes
        owner = "address-space limit" if aspace else "container's limit"
        what = (
            "the host's available memory"
            if limit.limit_bytes is None
            else f"what the {owner} leaves ({limit.describe()})"
        )
        note = f"capacity is {what} plus the model: {format_bytes(capacity)}"
    else:
        capacity = info.capacity_bytes + base_bytes
        note = f"capacity is the host's available memory plus the model: {format_bytes(capacity)}"
    room = limits.headroom_bytes
    if room is None:
        room = default_headroom(capacity, virtual=virtual)
    plan = Capacity(
        kind=info.kind,
        capacity_bytes=capacity,
        headroom_bytes=room,
        base_bytes=base_bytes,
        virtual=virtual,
        note=note,
    )
    if plan.usable_bytes <= base_bytes:
        raise ConfigError(
            f"the usable memory ({format_bytes(plan.usable_bytes)} = capacity "
            f"{format_bytes(capacity)} - headroom {format_bytes(room)}) is not more than the "
            f"model and optimizer state already hold ({format_bytes(base_bytes)}); raise memory "
            "or lower headroom"
        )
    return plan


def estimate_capacity(capacity_bytes: int, headroom_bytes: int | None, target: Target) -> Capacity:
    """One capacity of an estimate: a CUDA target reserves the context and keeps 5 % free."""
    cuda = target is Target.CUDA
    room = headroom_bytes
    if room is None:
        room = default_headroom(capacity_bytes, virtual=not cuda)
    return Capacity(
        kind=target.value,
        capacity_bytes=capacity_bytes,
        reserved_bytes=CUDA_CONTEXT_BYTES if cuda else 0,
        headroom_bytes=room,
        virtual=not cuda,
    )


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
    if device.type != "cpu":
        return None
    limit = host_limit()
    room = host_room(base_bytes, limit)
    if capacity_bytes <= room:
        return None
    return (
        f"the capacity {format_bytes(capacity_bytes)} is more than this machine can hold for the "
        f"probe ({limit.describe()}: about {format_bytes(room)} with the model)"
    )
