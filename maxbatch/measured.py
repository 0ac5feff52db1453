"""What a probe measured, as plain frozen records: trials, the memory model, timed sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

from maxbatch.devicekinds import kind_of
from maxbatch.memtrace import MemoryTrace


@dataclasses.dataclass(frozen=True, kw_only=True)
class Trial:
    """One run of the step at one batch size.

    Attributes:
        batch_size: the batch size run.
        fits: True when every step ran and the peak stayed within the usable memory.
        peak_bytes: peak bytes during the trial (for an OOM: the bytes live when it was raised).
        seconds: wall time of the trial.
        oom: True when the trial ended with an out-of-memory error.
        reserved_bytes: CUDA only: peak bytes reserved by the caching allocator.
        alloc_retries: CUDA only: allocator retries (cache flushes) during the trial.
        state_bytes: bytes of parameters, buffers and optimizer state on the device after the
            steps (live through every step, so a lower bound on the fixed part of the peak).
        trace: counting meters only: the live bytes operator by operator, for the search
            (left out of ``to_dict``; results keep none).
        steps: optimizer steps the trial ran (one more than usual where it checked for leaks).
    """

    batch_size: int
    fits: bool
    peak_bytes: int
    seconds: float
    oom: bool = False
    reserved_bytes: int | None = None
    alloc_retries: int | None = None
    state_bytes: int | None = None
    trace: MemoryTrace | None = dataclasses.field(default=None, repr=False, compare=False)
    steps: int = 2

    def to_dict(self) -> dict[str, Any]:
        """Return the trial as a JSON-ready dict."""
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if f.name != "trace"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryModel:
    """The fitted memory model ``peak(b) = fixed_bytes + bytes_per_sample * b``."""

    fixed_bytes: float
    bytes_per_sample: float
    #: what accumulating adds to the peak (about one more gradient per parameter: the running
    #: one is alive while the next micro-batch's backward makes its own); measured by an
    #: accumulating trial where one ran, else the gradients' bytes
    accumulation_bytes: float = 0.0

    def peak(self, batch_size: int, *, accumulating: bool = False) -> float:
        """Predicted peak bytes at ``batch_size`` (with accumulation: plus its extra term)."""
        extra = self.accumulation_bytes if accumulating else 0.0
        return self.fixed_bytes + extra + self.bytes_per_sample * batch_size

    def fitting_size(
        self, usable_bytes: float, *, accumulating: bool = False, extra_bytes: float = 0.0
    ) -> int:
        """The largest batch size whose predicted peak plus ``extra_bytes`` fits ``usable_bytes``.

        The inverse of :meth:`peak`, and the memory model's one prediction of a size:
        ``(usable - fixed - extra) / per_sample`` rounded down with ``//``, the floor of the exact
        quotient (``math.floor`` of the rounded quotient may round up onto a size that does not
        fit). It may be 0 or negative: nothing fits. Needs a positive ``bytes_per_sample``.

        Args:
            usable_bytes: the bytes a step may peak at.
            accumulating: count the accumulation's extra term too.
            extra_bytes: bytes the model does not count (what a caller holds besides the step).

        Returns:
            The size.
        """
        extra = extra_bytes + (self.accumulation_bytes if accumulating else 0.0)
        return int((usable_bytes - self.fixed_bytes - extra) // self.bytes_per_sample)

    def to_dict(self) -> dict[str, Any]:
        """Return the model as a JSON-ready dict."""
        return dataclasses.asdict(self)


def predicted_ceiling(model: MemoryModel | None, usable: int, ceiling: int) -> int:
    """The micro-batch ceiling when accumulating, as the memory model's extra term predicts it.

    Returns:
        At most ``ceiling``; ``ceiling`` itself without a model.
    """
    if model is None or model.bytes_per_sample <= 0:
        return ceiling
    return max(1, min(ceiling, model.fitting_size(usable, accumulating=True)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPoint:
    """The measured peak bytes of a batch size that fit."""

    batch_size: int
    peak_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Return the point as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Throughput:
    """The measured speed of the step at one batch size.

    Attributes:
        batch_size: the batch size timed.
        samples_per_second: ``batch_size / median_seconds``.
        median_seconds: median seconds of one step over the replicates.
        iqr_seconds: interquartile range of those seconds.
        replicates: how many steps were timed.
        noisy: True when ``iqr_seconds / median_seconds`` is above the noise threshold.
    """

    batch_size: int
    samples_per_second: float
    median_seconds: float
    iqr_seconds: float
    replicates: int
    noisy: bool

    def to_dict(self) -> dict[str, Any]:
        """Return the point as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Skipped:
    """A candidate batch size the profiler did not time, and why.

    Attributes:
        batch_size: the size not timed.
        reason: why, in words.
    """

    batch_size: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return the row as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """Memory and identity of one device, read when asked.

    Attributes:
        device: canonical name, e.g. ``"cuda:0"``, ``"mps"``, ``"cpu"``.
        kind: ``"cuda"``, ``"mps"`` or ``"cpu"``.
        name: a readable name (GPU model, CPU model).
        total_bytes: physical memory of the device.
        free_bytes: memory not in use by anyone (CUDA: ``mem_get_info``; CPU: psutil ``available``).
        process_bytes: memory this process holds on it (CUDA: reserved by the caching allocator).
        other_processes_bytes: memory other processes hold (CUDA with NVML only), else None.
    """

    device: str
    kind: str
    name: str
    total_bytes: int
    free_bytes: int
    process_bytes: int
    other_processes_bytes: int | None = None

    @property
    def capacity_bytes(self) -> int:
        """Bytes a step of this process may use: what is free plus what the process already holds.

        On the CPU the process's own resident memory is not added back: it is not free for tensors.
        """
        if kind_of(self.kind).cache_is_free:
            return self.free_bytes + self.process_bytes
        return self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        """Return the info as a JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["capacity_bytes"] = self.capacity_bytes
        return d
