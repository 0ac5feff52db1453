"""Counting live tensor-storage bytes: the virtual device.

A :class:`MemoryCounter` is a ``TorchDispatchMode``. Every storage that an operator creates
inside it is counted until the storage is freed (a weakref finalizer on the storage), so
``live_bytes`` is the exact sum of live storages, views and aliases counted once. Past
``cap_bytes`` it raises a real ``torch.OutOfMemoryError`` whose message starts like the CPU
allocator's own, so that any code that recognises a CPU out-of-memory error (maxbatch's and its
peers') recognises it too.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from maxbatch.memtrace import TraceRecorder
from maxbatch.units import format_bytes

OOM_PREFIX = "DefaultCPUAllocator: can't allocate memory"

# The counters entered in this thread, innermost last (dispatch modes are per thread too).
_entered = threading.local()


def _entered_counters() -> list[MemoryCounter]:
    stack: list[MemoryCounter] | None = getattr(_entered, "stack", None)
    if stack is None:
        stack = _entered.stack = []
    return stack


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Make storages no counter entered in this thread counts (host copies kept aside)."""
    counters = list(_entered_counters())
    for c in counters:
        c.paused += 1
    try:
        yield
    finally:
        for c in counters:
            c.paused -= 1


def enclosing_counters(device: torch.device) -> list[MemoryCounter]:
    """The capped counters entered in this thread that count ``device``, outermost first."""
    return [
        c
        for c in _entered_counters()
        if c.cap_bytes is not None and (c.device is None or _same_device(c.device, device))
    ]


_aten = torch.ops.aten


def _tensors(obj: Any, found: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in an operator's arguments or results (tuples, lists, dicts of them).

    Faster than a general pytree flatten, which costs more than counting itself on small ops.

    Returns:
        ``found``, with the tensors appended.
    """
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _tensors(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, found)
    return found


_FRESH: dict[Any, bool] = {}


def _fresh_outputs(func: Any) -> bool:
    """Whether the operator's schema says that none of its outputs aliases an input."""
    fresh = _FRESH.get(func)
    if fresh is None:
        schema = getattr(func, "_schema", None)
        fresh = schema is not None and all(r.alias_info is None for r in schema.returns)
        _FRESH[func] = fresh
    return fresh


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class MemoryCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts live storage bytes created under it and enforces an optional cap.

    Args:
        cap_bytes: raise ``torch.OutOfMemoryError`` when live bytes would pass this; None: no cap.
        round_to: count each storage rounded up to a multiple of this many bytes.
        label: names the device in the out-of-memory message.
        device: count only storages on this device (None: every storage).
    """

    #: Operators that never allocate, run without the counting bookkeeping (they are among the
    #: most frequent). ``prim.device`` (a fake tensor's ``.device``) returns no tensor; every other
    #: one returns a view of its input. ``lift_fresh`` lifts the data ``torch.tensor(...)`` built
    #: outside dispatch, which is never counted: on real tensors it returns its input, and under
    #: fake tensors the new meta storage it makes must not count either.
    NO_ALLOCATION: ClassVar[frozenset[Any]] = frozenset(
        {
            torch.ops.prim.device.default,
            _aten.lift_fresh.default,
            _aten.detach.default,
            _aten.alias.default,
            _aten.view.default,
            _aten.t.default,
            _aten.transpose.int,
            _aten.permute.default,
            _aten.expand.default,
            _aten.unsqueeze.default,
            _aten.squeeze.dim,
            _aten.select.int,
            _aten.slice.Tensor,
            _aten.as_strided.default,
        }
    )

    def __init__(
        self,
        cap_bytes: int | None = None,
        *,
        round_to: int = 1,
        label: str = "virtual",
        device: torch.device | None = None,
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        self.device = device
        self.cap_bytes = cap_bytes
        self.round_to = max(1, round_to)
        self.label = label
        self._sizes: dict[int, int] = {}
        self._finalizers: dict[int, weakref.finalize[Any, Any]] = {}
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0
        #: live bytes that the last refused allocation would have made (0: none refused yet)
        self.refused_bytes = 0
        #: > 0 while :func:`uncounted` runs: new storages are not counted
        self.paused = 0
        #: the cap while lifted (:meth:`lift_cap`): the peak never records more than it
        self.lifted_cap: int | None = None
        #: records the live bytes operator by operator while set (a trial's trace)
        self.recorder: TraceRecorder | None = None

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to

    def _forget(self, key: int) -> None:
        with self._lock:
            size = self._sizes.pop(key, None)
            self._finalizers.pop(key, None)
            if size is not None:
                self.live_bytes -= size
                if self.recorder is not None:
                    self.recorder.freed(key, size)

    def _track_storage(self, storage: torch.UntypedStorage) -> int:
        """Start counting ``storage``; return the bytes added (0 if already counted)."""
        if self.device is not None and not _same_device(storage.device, self.device):
            return 0
        key = storage._cdata
        with self._lock:
            if key in self._sizes:
                return 0
            size = self._rounded(storage.nbytes())
            self._sizes[key] = size
            self.live_bytes += size
        self._finalizers[key] = weakref.finalize(storage, self._forget, key)
        return size

    def track(self, tensors: Iterable[Any]) -> None:
        """Count tensors that already exist (parameters, optimizer state) as live bytes."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track_storage(t.untyped_storage())
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _track_outputs(self, func: Any, out: Any, inputs: Any) -> int:
        """Count the new storages among an operator's outputs; return the bytes added.

        An output that shares its storage with an input (a view, an in-place result) allocated
        nothing, also when the input was made before counting began (the user's sample). Only
        operators whose schema says an output may alias an input need the inputs looked at.

        Returns:
            The bytes the new storages added (rounded).
        """
        outputs = _tensors(out, [])
        if not outputs:
            return 0
        given: set[int] = set()
        if not _fresh_outputs(func):
            given = {t.untyped_storage()._cdata for t in _tensors(inputs, [])}
        added = 0
        for leaf in outputs:
            storage = leaf.untyped_storage()
            if storage._cdata not in given:
                size = self._track_storage(storage)
                if size and self.recorder is not None:
                    self.recorder.allocated(storage._cdata, size, leaf.shape)
                added += size
        return added

    def counted_bytes(self, tensors: Iterable[Any]) -> int:
        """Bytes this counter counts for the storages of ``tensors`` (each storage once)."""
        keys = {t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor)}
        with self._lock:
            return sum(self._sizes.get(key, 0) for key in keys)

    def __enter__(self) -> MemoryCounter:
        super().__enter__()  # type: ignore[no-untyped-call]
        _entered_counters().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _entered_counters()
        if self in stack:
            # The last entry is this one unless modes were exited out of order.
            del stack[len(stack) - 1 - stack[::-1].index(self)]
        super().__exit__(*exc)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Stop counting and detach every finalizer.

        Storages that outlive the probe (the model's parameters) then no longer keep this
        counter alive.
        """
        with self._lock:
            finalizers = list(self._finalizers.values())
            self._finalizers.clear()
            self._sizes.clear()
            self.live_bytes = 0
        for fin in finalizers:
            fin.detach()

    def lift_cap(self) -> None:
        """Stop enforcing the cap while an inner counter enforces the same room (the probe's).

        The inner counter refuses an allocation after this one counted it: the peak then keeps
        to the lifted cap, as if this counter had refused it.
        """
        if self.cap_bytes is not None:
            self.lifted_cap, self.cap_bytes = self.cap_bytes, None

    def restore_cap(self) -> None:
        """Enforce the cap lifted by :meth:`lift_cap` again."""
        if self.lifted_cap is not None:
            self.cap_bytes, self.lifted_cap = self.lifted_cap, None

    def reset_peak(self) -> None:
        """Set the peak to the bytes live now."""
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self.NO_ALLOCATION or self.paused:
            return out
        added = self._track_outputs(func, out, (args, kwargs))
        if self.recorder is not None:
            self.recorder.after_op(self.live_bytes)
        if self.cap_bytes is not None and self.live_bytes > self.cap_bytes:
            attempted = self.refused_bytes = self.live_bytes
            # Drop the new storages now: a traceback kept by the caller keeps this frame alive.
            del out
            raise torch.OutOfMemoryError(
                f"{OOM_PREFIX}: you tried to allocate {added} bytes. maxbatch {self.label} device: "
                f"{format_bytes(attempted)} would be live, capacity {format_bytes(self.cap_bytes)} "
                f"({self.cap_bytes} bytes)."
            )
        if self.live_bytes > self.peak_bytes and (
            self.lifted_cap is None or self.live_bytes <= self.lifted_cap
        ):
            self.peak_bytes = self.live_bytes
        return out
