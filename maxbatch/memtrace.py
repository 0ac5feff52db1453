"""The live bytes of a counted trial, operator by operator, and the ceilings they predict.

A counting meter (the virtual device, the CPU, fake tensors) records the live bytes after every
operator that allocates. A step runs the same operators at every batch size, and each tensor's
size is either fixed or proportional to the batch, so at every operator the live bytes are affine
in the batch size, and the trial's peak is the largest of those lines: a sum of straight pieces
that bends where another operator takes over the peak (the optimizer step at small batches, the
activations at large ones). A fit of the *peak* through two sizes on either side of a bend misses
by far; a fit of *each operator's* line is exact.

- With one trace, the bytes of tensors that have a dimension of the batch size are taken as the
  part that grows with the batch (:func:`ceiling_from_shapes`): a guess, wrong where a model
  dimension equals the batch size or a batched tensor is flattened.
- With two traces of the same operators, each operator's line is known (:func:`ceiling_from_lines`);
  a trial that ran out of memory contributes the operators up to the one that was refused.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryTrace:
    """What the counter saw during one trial, after its batch was built.

    Attributes:
        batch_size: the trial's batch size.
        live: live bytes after each allocating operator.
        batched: of those, the bytes of storages made during the trial by a tensor with a
            dimension equal to ``batch_size``.
        complete: False when the trial ran out of memory: the last entry is the refused one.
    """

    batch_size: int
    live: tuple[int, ...]
    batched: tuple[int, ...]
    complete: bool


class TraceRecorder:
    """Builds a trial's :class:`MemoryTrace` from what a counter reports.

    The counter reports each storage it starts counting (:meth:`allocated`), each it stops
    counting (:meth:`freed`) and the live bytes after each allocating operator
    (:meth:`after_op`). New storages also count as *batched*, a guess at what grows with the
    batch: while the batch is built (until :meth:`steps_start`), those of tensors whose
    dimension 0 is the batch size; in the steps, those of tensors with a dimension of the batch
    size or a dimension 0 that is a multiple of it (a batch flattened with heads or tokens),
    unless their shape is one of ``fixed_shapes`` (the parameters' and their state's).

    Args:
        batch_size: the trial's batch size.
        fixed_shapes: shapes of tensors that never grow with the batch.
    """

    def __init__(self, batch_size: int, fixed_shapes: Iterable[tuple[int, ...]] = ()):
        self.batch_size = batch_size
        self.fixed_shapes = set(fixed_shapes)
        self.stepping = False
        self.batched: dict[int, int] = {}  # storage key -> bytes
        self.batched_bytes = 0
        self.entries: list[tuple[int, int]] = []
        self._lock = threading.Lock()  # frees come from weakref finalizers

    def _grows(self, shape: Sequence[int]) -> bool:
        b = self.batch_size
        if not shape:
            return False
        if not self.stepping:
            return shape[0] == b  # the batch itself
        return (b in shape or shape[0] % b == 0) and tuple(shape) not in self.fixed_shapes

    def allocated(self, key: int, size: int, shape: Sequence[int]) -> None:
        """A storage of ``size`` bytes, made by a tensor of ``shape``, is counted from now on."""
        if self._grows(shape):
            with self._lock:
                self.batched[key] = size
                self.batched_bytes += size

    def freed(self, key: int, size: int) -> None:
        """A counted storage was freed."""
        with self._lock:
            if self.batched.pop(key, None) is not None:
                self.batched_bytes -= size

    def after_op(self, live_bytes: int) -> None:
        """An operator that allocates has run: ``live_bytes`` are live now."""
        self.entries.append((live_bytes, self.batched_bytes))

    def steps_start(self) -> None:
        """The batch is built: the trace starts here, with the same operators at every size."""
        self.entries = []
        self.stepping = True

    def trace(self, *, complete: bool) -> MemoryTrace:
        """The trace recorded (``complete``: the trial ran to its end)."""
        return MemoryTrace(
            batch_size=self.batch_size,
            live=tuple(live for live, _ in self.entries),
            batched=tuple(grows for _, grows in self.entries),
            complete=complete,
        )


def _shape_bound(trace: MemoryTrace, usable: int, start: int = 0) -> int | None:
    """The largest size whose operators from ``start`` on stay within ``usable`` (shape split)."""
    b = trace.batch_size
    best: int | None = None
    for live, grows in zip(trace.live[start:], trace.batched[start:], strict=True):
        if grows > 0:
            # (live - grows) + grows * c / b <= usable
            c = b + (usable - live) * b // grows
            best = c if best is None else min(best, c)
    return best


def ceiling_from_shapes(trace: MemoryTrace, usable: int) -> int | None:
    """The ceiling if the batched tensors of a trial that fit grow with the batch and nothing else.

    Returns:
        The predicted ceiling, or None when the trial did not fit or nothing grew.
    """
    if not trace.complete or max(trace.live, default=usable + 1) > usable:
        return None
    return _shape_bound(trace, usable)


def ceiling_from_lines(low: MemoryTrace, high: MemoryTrace, usable: int) -> int | None:
    """The ceiling from each operator's line through two traces of the same step.

    Args:
        low: a trial that fit.
        high: a trial at another size that fit, or ran out of memory (its operators up to the
            refused one give lines; the rest are taken from ``low``'s shape split).
        usable: the bytes a trial may peak at.

    Returns:
        The predicted ceiling, or None when the two did not run the same operators or no
        operator's bytes grow with the batch.
    """
    n = len(high.live)
    if low.batch_size == high.batch_size or not low.complete:
        return None
    if n > len(low.live) or (high.complete and n != len(low.live)):
        return None  # other operators ran: a size-dependent kernel choice, a changing batch
    b0, b1 = low.batch_size, high.batch_size
    best: int | None = None
    for y0, y1 in zip(low.live[:n], high.live, strict=True):
        dy = y1 - y0
        if dy * (b1 - b0) > 0:  # grows with the batch
            c = b0 + (usable - y0) * (b1 - b0) // dy
            best = c if best is None else min(best, c)
    if not high.complete:
        rest = _shape_bound(low, usable, n)
        if rest is not None:
            best = rest if best is None else min(best, rest)
    return best


def predict_ceiling(
    fits: Sequence[MemoryTrace], failed: Sequence[MemoryTrace], usable: int
) -> tuple[int | None, bool]:
    """The best prediction the traces of a search allow.

    Two trials that fit give each operator's line (exact where sizes are affine); the largest
    that fit and the nearest failure above it give the lines up to the refused operator; the
    largest that fit alone gives the shape split.

    Returns:
        The predicted ceiling (None without a trial that fit), and whether it comes from lines
        (False: from the shape split alone).
    """
    if not fits:
        return None, False
    ordered = sorted(fits, key=lambda t: t.batch_size)
    top = ordered[-1]
    if len(ordered) >= 2:
        guess = ceiling_from_lines(ordered[-2], top, usable)
        if guess is not None:
            return guess, True
    above = [t for t in failed if t.batch_size > top.batch_size]
    if above:
        guess = ceiling_from_lines(top, min(above, key=lambda t: t.batch_size), usable)
        if guess is not None:
            return guess, True
    return ceiling_from_shapes(top, usable), False
