"""Counting live tensor-storage bytes: the virtual device.

A :class:`MemoryCounter` is a ``TorchDispatchMode``. Every storage that an operator creates
inside it is counted until the storage is freed (a weakref finalizer on the storage), so
``live_bytes`` is the exact sum of live storages, views and aliases counted once. Past
``cap_bytes`` it raises a real ``torch.OutOfMemoryError`` whose message starts like the CPU
allocator's own, so that any code that recognises a CPU out-of-memory error (maxbatch's and its
peers') recognises it too.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from maxbatch.memtrace import MemoryTrace
from maxbatch.units import format_bytes

#: The CUDA caching allocator rounds every block up to a multiple of 512 bytes.
CUDA_ROUNDING = 512

OOM_PREFIX = "DefaultCPUAllocator: can't allocate memory"

_aten = torch.ops.aten


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class MemoryCounter(TorchDispatchMode):  # type: ignore[no-untyped-call,misc]
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
        # The trace being recorded (see start_trace): the batch size whose tensors count as
        # batched, the keys and bytes of those storages, and the entries after each operator.
        self._trace_batch: int | None = None
        self._fixed_shapes: set[tuple[int, ...]] = set()
        self._stepping = False
        self._batched: set[int] = set()
        self.batched_bytes = 0
        self._trace: list[tuple[int, int]] = []

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to

    def _forget(self, key: int) -> None:
        with self._lock:
            size = self._sizes.pop(key, None)
            self._finalizers.pop(key, None)
            if size is not None:
                self.live_bytes -= size
                if key in self._batched:
                    self._batched.discard(key)
                    self.batched_bytes -= size

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

    def _track_outputs(self, out: Any, inputs: Any) -> int:
        """Count the new storages among an operator's outputs; return the bytes added.

        An output that shares its storage with an input (a view, an in-place result) allocated
        nothing, also when the input was made before counting began (the user's sample).
        """
        given = {
            t.untyped_storage()._cdata
            for t in tree_flatten(inputs)[0]
            if isinstance(t, torch.Tensor)
        }
        added = 0
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                if storage._cdata not in given:
                    size = self._track_storage(storage)
                    added += size
                    if size and self._trace_batch is not None and self._grows(leaf.shape):
                        with self._lock:
                            self._batched.add(storage._cdata)
                            self.batched_bytes += size
        return added

    def _grows(self, shape: torch.Size) -> bool:
        """Whether a new tensor of ``shape`` looks batched (see :meth:`start_trace`)."""
        b = self._trace_batch
        if not shape or b is None:
            return False
        if not self._stepping:
            return shape[0] == b  # the batch itself
        return (b in shape or shape[0] % b == 0) and tuple(shape) not in self._fixed_shapes

    def start_trace(self, batch_size: int, fixed_shapes: Iterable[tuple[int, ...]] = ()) -> None:
        """Record the live bytes after every allocating operator until :meth:`stop_trace`.

        New storages also count as *batched* (a guess at what grows with the batch): while the
        batch is built (until :meth:`mark`), those of tensors whose dimension 0 is
        ``batch_size``; in the steps, those of tensors with a dimension of ``batch_size`` or a
        dimension 0 that is a multiple of it (a batch flattened with heads or tokens), unless
        their shape is one of ``fixed_shapes`` (the parameters' and their state's).
        """
        with self._lock:
            self._trace_batch = batch_size
            self._fixed_shapes = set(fixed_shapes)
            self._stepping = False
            self._batched.clear()
            self.batched_bytes = 0
            self._trace = []

    def mark(self) -> None:
        """Drop what was recorded so far: the trace starts here (the batch is built)."""
        self._trace = []
        self._stepping = True

    def stop_trace(self, *, complete: bool) -> MemoryTrace | None:
        """Stop recording; return the trace (None when none was started)."""
        if self._trace_batch is None:
            return None
        with self._lock:
            batch_size, self._trace_batch = self._trace_batch, None
            entries, self._trace = self._trace, []
            self._batched.clear()
            self.batched_bytes = 0
        return MemoryTrace(
            batch_size=batch_size,
            live=tuple(live for live, _ in entries),
            batched=tuple(grows for _, grows in entries),
            complete=complete,
        )

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
        if func in self.NO_ALLOCATION:
            return out
        added = self._track_outputs(out, (args, kwargs))
        if self._trace_batch is not None:
            self._trace.append((self.live_bytes, self.batched_bytes))
        if self.cap_bytes is not None and self.live_bytes > self.cap_bytes:
            attempted = self.refused_bytes = self.live_bytes
            # Drop the new storages now: a traceback kept by the caller keeps this frame alive.
            del out
            raise torch.OutOfMemoryError(
                f"{OOM_PREFIX}: you tried to allocate {added} bytes. maxbatch {self.label} device: "
                f"{format_bytes(attempted)} would be live, capacity {format_bytes(self.cap_bytes)} "
                f"({self.cap_bytes} bytes)."
            )
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        return out
