"""``maxbatch.virtual_device``: train inside a memory-capped virtual device, as the probe does.

Inside the block every storage allocated on the device is counted by a
:class:`~maxbatch.devices.accounting.MemoryCounter`, exactly as the probe counts a trial, and an
allocation that would pass the capacity is released and raises a real ``torch.OutOfMemoryError``.
The computation is real; only the bytes are capped. A probe run inside the block
(:func:`maxbatch.find_batch_size`) sees the device through :class:`EnclosingDevices`: its capacity
is the room the enclosing device leaves, and the smaller cap wins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from maxbatch.devicekinds import kind_of
from maxbatch.devices.accounting import MemoryCounter, enclosing_counters
from maxbatch.devices.device import resolve_device
from maxbatch.errors import ConfigError
from maxbatch.grid import positive_int
from maxbatch.units import format_bytes, parse_bytes

__all__ = ["EnclosingDevices", "VirtualDevice", "virtual_device"]


def _tensors(objects: Iterable[Any]) -> Iterator[torch.Tensor]:
    """The tensors a module, an optimizer, a tensor or an iterable of them hold."""
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
            yield from _tensors(obj)
        else:
            raise ConfigError(
                f"cannot track a {type(obj).__name__}; pass modules, optimizers or tensors"
            )


class VirtualDevice:
    """The handle ``virtual_device`` yields: the capacity and the bytes counted on the device.

    After the block ends the figures stay readable, frozen as they were at its end.

    Attributes:
        device: the device whose storages are counted.
        capacity_bytes: the cap; an allocation that would pass it raises ``OutOfMemoryError``.
    """

    def __init__(self, capacity_bytes: int, device: torch.device, round_to: int):
        self.device = device
        self.capacity_bytes = capacity_bytes
        self._counter: MemoryCounter | None = MemoryCounter(
            capacity_bytes, round_to=round_to, label="virtual", device=device
        )
        self._live = self._peak = 0

    @property
    def live_bytes(self) -> int:
        """Bytes of the counted storages alive now (at the end of the block, once it ended)."""
        return self._live if self._counter is None else self._counter.live_bytes

    @property
    def peak_bytes(self) -> int:
        """The most bytes live at once since the block began or :meth:`reset_peak`."""
        return self._peak if self._counter is None else self._counter.peak_bytes

    def reset_peak(self) -> None:
        """Restart the peak from the bytes live now."""
        if self._counter is not None:
            self._counter.reset_peak()

    def track(self, *objects: Any) -> None:
        """Count what was allocated before the block: modules, optimizers, tensors.

        Storages made inside the block count by themselves; a model built before it does not, so
        pass it (and its optimizer) here to have its bytes on the device too. Tracking does not
        check the cap: the next allocation does.

        Raises:
            ConfigError: an object is none of these.
        """
        if self._counter is not None:
            self._counter.track(_tensors(objects))

    def _enter(self) -> MemoryCounter:
        assert self._counter is not None
        return self._counter.__enter__()

    def _close(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            self._live, self._peak = counter.live_bytes, counter.peak_bytes
            counter.close()

    def __repr__(self) -> str:
        return (
            f"VirtualDevice({self.device}, capacity {format_bytes(self.capacity_bytes)}, "
            f"live {format_bytes(self.live_bytes)}, peak {format_bytes(self.peak_bytes)})"
        )


@contextlib.contextmanager
def virtual_device(
    capacity: str | int,
    device: str | torch.device = "cpu",
    *,
    round_to: int | None = None,
) -> Iterator[VirtualDevice]:
    """Run a block on a virtual device of ``capacity`` bytes: real computation, counted bytes.

    Args:
        capacity: the memory of the device to play, e.g. ``"24GiB"`` or a number of bytes.
        device: the real device whose storages are counted (default ``"cpu"``).
        round_to: count each storage rounded up to this many bytes; default 512 on CUDA (the
            caching allocator's block) and 1 elsewhere, as the probe counts.

    Yields:
        A :class:`VirtualDevice` with ``peak_bytes``, ``live_bytes``, ``capacity_bytes``,
        ``reset_peak()`` and ``track(...)``.

    Raises:
        ConfigError: the capacity is not a positive size or ``round_to`` not a positive integer.
        DeviceError: the device is not available.

    Inside the block an allocation that would pass the capacity is released and raises
    ``torch.OutOfMemoryError`` (its message starts like the CPU allocator's). Only storages made by
    operators inside the block count (and those passed to ``track``); tensors built straight from
    host data (``torch.tensor(list)``, ``torch.from_numpy``) count once an operator copies them,
    such as a collate's ``torch.stack``. Counting is per thread: the DataLoader's worker processes
    and its pin-memory thread are not counted.
    """
    cap = parse_bytes(capacity, name="capacity")
    if cap < 1:
        raise ConfigError(f"capacity={capacity!r} leaves no room; give a size such as 24GiB")
    if round_to is not None:
        positive_int(round_to, "round_to")
    dev = resolve_device(device)
    handle = VirtualDevice(cap, dev, kind_of(dev).rounding if round_to is None else round_to)
    counter = handle._enter()
    try:
        yield handle
    finally:
        counter.__exit__(None, None, None)
        handle._close()


class EnclosingDevices:
    """The capped counters a probe runs inside (the user's virtual devices), lent to it.

    While lent, their caps are lifted (:meth:`~maxbatch.devices.accounting.MemoryCounter.lift_cap`)
    and the probe's own counter enforces the smallest room they leave, so an out-of-memory error is
    the probe's, with its own bookkeeping; they still count. :meth:`restore` puts the caps back.

    Attributes:
        capacity_bytes: the bytes the probe may use counting its state (None: no enclosing cap).
    """

    def __init__(self, device: torch.device, state: Iterable[torch.Tensor]):
        self._counters = enclosing_counters(device)
        tensors = list(state)
        rooms = []
        for counter in self._counters:
            assert counter.cap_bytes is not None
            counter.track(tensors)  # the state now counts in both, so it is not "other" bytes
            other = counter.live_bytes - counter.counted_bytes(tensors)
            rooms.append(counter.cap_bytes - other)
            counter.lift_cap()
        self.capacity_bytes: int | None = min(rooms) if rooms else None

    @staticmethod
    def present(device: torch.device) -> bool:
        """Whether a capped counter on ``device`` is entered in this thread."""
        return bool(enclosing_counters(device))

    def restore(self) -> None:
        """Put the enclosing counters' caps back."""
        for counter in self._counters:
            counter.restore_cap()
