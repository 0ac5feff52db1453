"""Ctrl-C or SIGTERM while the step is timed: the verified ceiling is kept (issue 21 item 5).

The ceiling search ends with two real trials (the ceiling fits, the next size does not), so by the
time the profiler runs the ceiling is an answer. An interrupt there ends the profiler: the result is
assembled with the ceiling as its batch size and the sizes timed so far, marked unfinished, the
ceiling goes into the result cache, and :class:`ProfileInterrupted` (a ``KeyboardInterrupt``)
carries the result to the caller, which exits as for any interrupt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from maxbatch.results import UNTIMED_REASON, BatchSizeResult, Throughput
from maxbatch.step.interrupt import Terminated

__all__ = ["Interruption", "PointLog", "ProfileInterrupted", "untimed"]


class ProfileInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM came while the step was timed, after the ceiling was verified.

    Attributes:
        result: the answer so far: the verified ceiling as the batch size, the sizes timed so far
            in ``throughput`` (unfinished: not a pick), and why in ``pick_reason`` and ``notes``.
        terminated: True for SIGTERM, False for Ctrl-C (SIGINT).
    """

    def __init__(self, result: BatchSizeResult, *, terminated: bool) -> None:
        super().__init__("interrupted while timing; the ceiling is verified")
        self.result = result
        self.terminated = terminated


@dataclasses.dataclass(frozen=True, kw_only=True)
class Interruption:
    """What an interrupt in the profiler left: the signal and the sizes timed before it."""

    terminated: bool
    points: tuple[Throughput, ...]

    @property
    def signal(self) -> str:
        """The signal, as a user names it."""
        return "SIGTERM" if self.terminated else "Ctrl-C"

    def reason(self, ceiling: int) -> str:
        """The pick reason: the ceiling, and the fastest size timed so far, unfinished."""
        if not self.points:
            return f"the ceiling: {self.signal} came before any size was timed"
        best = max(self.points, key=lambda p: p.samples_per_second)
        return (
            f"the ceiling ({ceiling}): {self.signal} stopped the timing; the fastest size timed "
            f"so far, {best.batch_size} at {best.samples_per_second:,.1f} samples/s, is "
            f"unfinished (not a pick)"
        )

    def note(self) -> str:
        """The note: what was timed, and that the ceiling is kept."""
        timed = ", ".join(str(p.batch_size) for p in sorted(self.points, key=_size)) or "none"
        return (
            f"profiler: interrupted by {self.signal} (sizes timed: {timed}); the ceiling was "
            f"verified before it and is cached (`--no-profile` answers it from the cache)"
        )


def _size(point: Throughput) -> int:
    return point.batch_size


class PointLog:
    """The sizes timed so far, as the profiler reports them (the last timing of a size wins)."""

    def __init__(self, forward: Callable[[Throughput], None] | None) -> None:
        self._forward = forward
        self._points: dict[int, Throughput] = {}

    def __call__(self, point: Throughput) -> None:
        """Keep ``point``, then pass it on to the user's callback."""
        self._points[point.batch_size] = point
        if self._forward is not None:
            self._forward(point)

    def stopped(self, exc: KeyboardInterrupt) -> Interruption:
        """What the interrupt ``exc`` left (only its kind is kept, not the exception)."""
        points = tuple(sorted(self._points.values(), key=_size))
        return Interruption(terminated=isinstance(exc, Terminated), points=points)


def untimed(result: BatchSizeResult, note: str) -> BatchSizeResult:
    """The interrupted result as a ``--no-profile`` run gives it: what the cache keeps."""
    return dataclasses.replace(
        result,
        batch_size=result.ceiling,
        pick_reason=UNTIMED_REASON,
        profile=dataclasses.replace(result.profile, throughput=()),
        notes=tuple(n for n in result.notes if n != note),
    )
