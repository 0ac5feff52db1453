"""Measuring a trial's peak bytes: one meter per kind of measurement.

:class:`CountingMeter` counts live tensor storages (the virtual device, the CPU, MPS, the fake
step); :class:`AllocatorMeter` reads the allocator's own peak counters (CUDA). :func:`meter_for`
chooses by the device kind (:attr:`~maxbatch.devicekinds.DeviceKind.counted`).
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

import torch

from maxbatch.devicekinds import kind_of
from maxbatch.devices.accounting import MemoryCounter
from maxbatch.devices.device import CudaPeak
from maxbatch.memtrace import TraceRecorder
from maxbatch.step.workload import Workload


class Meter:
    """Measures the peak bytes of a trial and decides whether it fits in ``usable_bytes``.

    One kind of measurement each: :class:`CountingMeter` counts live bytes and enforces the cap
    itself; :class:`AllocatorMeter` reads the allocator's own peak counters, and the device raises
    its own out-of-memory errors. :func:`meter_for` chooses by the device kind.

    ``with meter:`` closes it at the end.

    Args:
        device: where the trials run.
        virtual: the cap is a virtual device's, not this machine's (a real OOM below it is the
            host's).
    """

    def __init__(self, device: torch.device, *, virtual: bool = False):
        self.device = device
        #: the cap is a virtual device's, not this machine's: a real OOM below it is the host's
        self.virtual = virtual
        self.usable_bytes: int | None = None

    def set_usable(self, usable_bytes: int | None) -> None:
        """Set the bytes a trial may peak at (None: no cap)."""
        self.usable_bytes = usable_bytes

    def close(self) -> None:
        """Release what the meter holds."""

    def __enter__(self) -> Meter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, workload: Workload, batch_size: int) -> TraceRecorder | None:
        """Begin a trial at ``batch_size``; return the recorder of its trace, if it keeps one."""
        raise NotImplementedError

    def watching(self) -> contextlib.AbstractContextManager[Any]:
        """The context the trial's steps run in."""
        return contextlib.nullcontext()

    def stop(self) -> None:
        """End the trial (whether it failed or not)."""

    def read(self) -> tuple[int, int | None, int | None]:
        """Return (peak bytes, peak reserved bytes or None, allocator retries or None)."""
        raise NotImplementedError

    def host_ran_out(self, oom: bool) -> bool:
        """Whether an out-of-memory error of the trial was this machine's, below a virtual cap."""
        return False

    def live_now(self) -> int:
        """Bytes live on the device now, as counted or allocated (inside a trial)."""
        raise NotImplementedError

    def live_bytes(self, workload: Workload) -> int:
        """Bytes live on the device now (counting: the model's state plus anything counted)."""
        return self.live_now()


class CountingMeter(Meter):
    """The virtual device's meter: a :class:`~maxbatch.devices.accounting.MemoryCounter`.

    Args:
        device: where the trials run.
        round_to: round each counted storage up to this (default: the device kind's rounding).
        label: the name the counter's out-of-memory errors give the device.
        every_device: count storages on every device, not only ``device``'s (fake tensors'
            storages are on the meta device).
        virtual: the cap is a virtual device's, not this machine's.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        round_to: int | None = None,
        label: str = "virtual",
        every_device: bool = False,
        virtual: bool = False,
    ):
        super().__init__(device, virtual=virtual)
        rounding = round_to if round_to is not None else kind_of(device).rounding
        self.counter = MemoryCounter(
            None, round_to=rounding, label=label, device=None if every_device else device
        )

    def set_usable(self, usable_bytes: int | None) -> None:
        """Set the bytes a trial may peak at (None: no cap): the counter raises an OOM past them."""
        super().set_usable(usable_bytes)
        self.counter.cap_bytes = usable_bytes

    def close(self) -> None:
        """Release the counter's hold on the model's storages."""
        self.counter.close()

    def start(self, workload: Workload, batch_size: int) -> TraceRecorder | None:
        """Count the model's state, reset the peak and record the trial's trace."""
        counter = self.counter
        counter.track(workload.state_tensors())
        counter.refused_bytes = 0
        counter.reset_peak()
        fixed = {tuple(t.shape) for t in workload.state_tensors(grads=False)}
        counter.recorder = TraceRecorder(batch_size, fixed)
        return counter.recorder

    def watching(self) -> contextlib.AbstractContextManager[Any]:
        """The counter itself: storages made inside are counted."""
        return self.counter

    def stop(self) -> None:
        """Stop recording the trace."""
        self.counter.recorder = None

    def read(self) -> tuple[int, int | None, int | None]:
        """Return the counted peak (or the refused size, when larger), no allocator figures."""
        return max(self.counter.peak_bytes, self.counter.refused_bytes), None, None

    def host_ran_out(self, oom: bool) -> bool:
        """An OOM under a virtual cap that the counter did not raise is the host's."""
        return oom and self.virtual and not self.counter.refused_bytes

    def live_now(self) -> int:
        """Bytes counted live now."""
        return self.counter.live_bytes

    def live_bytes(self, workload: Workload) -> int:
        """Bytes counted live now, the model's state counted first."""
        self.counter.track(workload.state_tensors())
        return self.counter.live_bytes


class AllocatorMeter(Meter):
    """The meter of a device whose allocator keeps its own peak counters (CUDA)."""

    def __init__(self, device: torch.device, *, virtual: bool = False):
        super().__init__(device, virtual=virtual)
        self.peak = CudaPeak(device)

    def start(self, workload: Workload, batch_size: int) -> TraceRecorder | None:
        """Reset the allocator's peak counters; no trace is kept."""
        self.peak.start()
        return None

    def read(self) -> tuple[int, int | None, int | None]:
        """Return the allocator's peak allocated and reserved bytes and its retries."""
        return self.peak.read()

    def live_now(self) -> int:
        """Bytes the allocator holds for live tensors now."""
        return self.peak.allocated_bytes()


def meter_for(device: torch.device, *, virtual: bool) -> Meter:
    """The probe's meter on ``device``: counting under a cap or where the kind is counted.

    Returns:
        A :class:`CountingMeter` or an :class:`AllocatorMeter`.
    """
    if virtual or kind_of(device).counted:
        return CountingMeter(device, virtual=virtual)
    return AllocatorMeter(device, virtual=virtual)
