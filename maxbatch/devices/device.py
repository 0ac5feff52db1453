"""What a device offers: memory, name, peak counters, synchronisation (CUDA, MPS, CPU).

What a step may use of it is :mod:`maxbatch.devices.capacity`'s policy. Besides this module, only
:func:`maxbatch.step.oom.release_memory` calls the ``torch.cuda`` memory API (to empty the cache);
NVML is read only here.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil
import torch

from maxbatch.devicekinds import CUDA, MPS, kind_of
from maxbatch.errors import ConfigError, DeviceError
from maxbatch.results import DeviceInfo


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def default_device() -> torch.device:
    """The first CUDA device if there is one, else MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or None into a usable ``torch.device``.

    Returns:
        The resolved device.

    Raises:
        DeviceError: ``name`` is not a device name, or the device is not present.
    """
    if name is None:
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"{name!r} is not a device; use cpu, cuda, cuda:N or mps") from e
    if kind_of(dev).indexed:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"{name!r}: no CUDA device is available here; use --device cpu")
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise DeviceError(
                f"{name!r}: there are only {count} CUDA device(s) (cuda:0..{count - 1})"
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise DeviceError(f"{name!r}: MPS is not available on this machine")
        return torch.device("mps")
    if dev.type == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"{name!r}: maxbatch supports cpu, cuda[:N] and mps, not {dev.type!r}")


def device_label(device: torch.device) -> str:
    """Canonical string of a resolved device (``cuda:0``, ``mps``, ``cpu``)."""
    if kind_of(device).indexed:
        return f"{device.type}:{0 if device.index is None else device.index}"
    return device.type


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _nvml_other_processes(index: int) -> int | None:
    """Bytes other processes hold on CUDA device ``index``, from NVML; None when NVML cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            props: Any = torch.cuda.get_device_properties(index)
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            me = os.getpid()
            return sum(int(p.usedGpuMemory or 0) for p in procs if p.pid != me)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML is optional information; any failure means "unknown"
        return None


def describe(device: torch.device) -> DeviceInfo:
    """Read the memory and name of ``device`` now."""
    label = device_label(device)
    kind = kind_of(device)
    if kind is CUDA:
        index = 0 if device.index is None else device.index
        free, total = torch.cuda.mem_get_info(index)
        return DeviceInfo(
            device=label,
            kind=kind.name,
            name=torch.cuda.get_device_name(index),
            total_bytes=int(total),
            free_bytes=int(free),
            process_bytes=int(torch.cuda.memory_reserved(index)),
            other_processes_bytes=_nvml_other_processes(index) if kind.nvml else None,
        )
    if kind is MPS:
        total = int(torch.mps.recommended_max_memory())
        used = int(torch.mps.driver_allocated_memory())
        return DeviceInfo(
            device=label,
            kind=kind.name,
            name="Apple MPS",
            total_bytes=total,
            free_bytes=max(0, total - used),
            process_bytes=used,
        )
    vm = psutil.virtual_memory()
    rss = int(psutil.Process().memory_info().rss)
    return DeviceInfo(
        device=label,
        kind=kind.name,
        name=_cpu_name(),
        total_bytes=int(vm.total),
        free_bytes=int(vm.available),
        process_bytes=rss,
    )


def list_devices() -> list[DeviceInfo]:
    """Every device this process can probe: each CUDA device, MPS if present, and the CPU."""
    found = []
    if torch.cuda.is_available():
        found += [describe(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append(describe(torch.device("mps")))
    found.append(describe(torch.device("cpu")))
    return found


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    kind = kind_of(device)
    if kind is CUDA:
        torch.cuda.synchronize(device)
    elif kind is MPS:
        torch.mps.synchronize()


class CudaPeak:
    """The CUDA caching allocator's own counters for one trial."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        """Reset the peak counters before a trial."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._retries0 = int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))

    def allocated_bytes(self) -> int:
        """Bytes held by live tensors now."""
        return int(torch.cuda.memory_allocated(self.device))

    def read(self) -> tuple[int, int, int]:
        """Return (peak allocated bytes, peak reserved bytes, allocator retries) since ``start``."""
        stats = torch.cuda.memory_stats(self.device)
        retries = int(stats.get("num_alloc_retries", 0)) - self._retries0
        return (
            int(torch.cuda.max_memory_allocated(self.device)),
            int(torch.cuda.max_memory_reserved(self.device)),
            retries,
        )


class CudaTimer:
    """Seconds of one stretch of work on a CUDA device, read from CUDA events.

    The events are recorded on the device's current stream, so the time is the GPU's own,
    without the host's clock-read and launch jitter; :meth:`stop` waits for the end event.
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.current_stream(device)
        self.begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self.end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]

    def start(self) -> None:
        """Mark the start, after the work already queued."""
        self.begin.record(self.stream)

    def stop(self) -> float:
        """Mark the end, wait for it, and return the seconds since :meth:`start`."""
        self.end.record(self.stream)
        self.end.synchronize()
        return float(self.begin.elapsed_time(self.end)) / 1000.0


def require_weights(model: Any) -> None:
    """Refuse a model whose parameters or buffers are on the meta device (shapes, no data).

    Raises:
        ConfigError: a parameter or buffer of ``model`` is on the meta device.
    """
    if not isinstance(model, torch.nn.Module):
        return  # the step's own check says what a model must be
    empty = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        more = f" and {len(empty) - 1} more tensors are" if len(empty) > 1 else " is"
        raise ConfigError(
            f"the model's {empty[0]}{more} on the meta device (shapes, no weights); the probe "
            "runs the real step, only estimate (estimate_batch_size, `maxbatch estimate`) runs "
            "a model without weights. Load or initialise the weights first "
            "(model.to_empty(device=...), then initialise them)"
        )


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a ``DTensor`` this process holds (its storage reports the global size)."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()
