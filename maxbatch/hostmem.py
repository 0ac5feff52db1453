"""What this process can really hold on the host: free memory, the cgroup's limit, RLIMIT_AS.

A virtual device on the CPU holds real tensors in host memory. Its capacity can be more than this
process can hold (a small container, ``ulimit -v``): then a trial near the ceiling would exhaust
the host, and an out-of-memory error from the host is no answer for the virtual device. Such a
capacity is said up front and answered by the fake-tensor estimate (no real trial), or refused.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import psutil
import torch

from maxbatch.errors import HostMemoryError
from maxbatch.estimate import first_guess
from maxbatch.grid import Grid
from maxbatch.probe import SearchOutcome
from maxbatch.spec import StepSpec, Target
from maxbatch.units import format_bytes

log = logging.getLogger(__name__)

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


def host_limit(cgroup_root: Path = CGROUP) -> HostLimit:
    """The tightest of free host memory, the cgroup's limit and RLIMIT_AS, as bytes left."""
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
    if resource is not None:
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


def estimate_beyond_host(
    step: StepSpec, usable_bytes: int, why_not: str, *, start: int, grid: Grid, target: Target
) -> SearchOutcome:
    """The ceiling from the fake-tensor estimate, for a capacity this machine cannot hold.

    Args:
        step: the probe's step, with the optimizer its workload chose.
        usable_bytes: the virtual device's usable bytes.
        why_not: :func:`beyond_host`'s sentence.
        start: the size the probe starts at.
        grid: the sizes the probe may try.
        target: how to count (the device's kind).

    Returns:
        The estimated ceiling as the search's outcome, without trials.

    Raises:
        HostMemoryError: the step cannot run on fake tensors (or nothing fits): one line naming
            this machine's memory.
    """
    log.warning("%s: the ceiling is estimated on fake tensors", why_not)
    guess, why = first_guess(step, usable_bytes, start=start, grid=grid, target=target)
    if guess is None:
        raise HostMemoryError(
            f"{why_not}, and `maxbatch estimate` cannot answer for it ({why}); lower --memory "
            "to what this machine holds",
            capacity_bytes=usable_bytes,
        )
    return SearchOutcome(
        ceiling=guess,
        trials=(),
        memory_model=None,
        complete=True,
        stop_reason=(
            f"estimated on fake tensors, not measured ({why} there): no trial near the "
            "capacity can run on this machine"
        ),
    )
