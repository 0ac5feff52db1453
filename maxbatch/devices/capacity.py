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
- This machine's limits (free memory, the cgroup's, ``RLIMIT_AS``) are
  :mod:`maxbatch.devices.host`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

import torch

from maxbatch.devicekinds import kind_of
from maxbatch.devices.host import CGROUP, host_limit, host_room
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
    elif kind_of(info.kind).cache_is_free:
        capacity = info.capacity_bytes
    elif kind_of(info.kind).host_memory:
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
