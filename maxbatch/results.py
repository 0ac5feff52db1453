"""Plain, frozen result records: no torch objects, each with ``to_dict()``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from maxbatch.devicekinds import kind_of
from maxbatch.memtrace import MemoryTrace

# The pick reason when nothing was timed, in the words of both entries (the CLI's flag, the
# library's argument): users of either read the same ``pick_reason``.
UNTIMED_REASON = "the ceiling: timing was off (--no-profile, profile=False)"


def _asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
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

    def to_dict(self) -> dict[str, Any]:
        """Return the model as a JSON-ready dict."""
        return _asdict(self)


def predicted_ceiling(model: MemoryModel | None, usable: int, ceiling: int) -> int:
    """The micro-batch ceiling when accumulating, as the memory model's extra term predicts it.

    Returns:
        At most ``ceiling``; ``ceiling`` itself without a model.
    """
    if model is None or model.bytes_per_sample <= 0:
        return ceiling
    free = usable - model.fixed_bytes - model.accumulation_bytes
    return max(1, min(ceiling, int(free // model.bytes_per_sample)))


@dataclasses.dataclass(frozen=True)
class MemoryPoint:
    """The measured peak bytes of a batch size that fit."""

    batch_size: int
    peak_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Return the point as a JSON-ready dict."""
        return _asdict(self)


@dataclasses.dataclass(frozen=True)
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
        return _asdict(self)


@dataclasses.dataclass(frozen=True)
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
        return _asdict(self)


@dataclasses.dataclass(frozen=True)
class BatchSizeResult:
    """What :func:`maxbatch.find_batch_size` returns.

    Attributes:
        batch_size: the recommended batch size (the pick).
        ceiling: the largest batch size that fits.
        device: the device probed, e.g. ``"cuda:0"`` or ``"cpu"``.
        device_name: a readable device name.
        mode: ``"train"`` or ``"inference"``.
        precision: autocast precision or None.
        optimizer: the optimizer class used in the step, or None.
        trials: every probe trial.
        capacity_bytes: device capacity used by the probe.
        headroom_bytes: margin subtracted from it.
        usable_bytes: capacity minus headroom.
        virtual: True when capacity was a ``memory=`` cap enforced by counting live bytes.
        memory_model: the fitted memory model, or None.
        complete: False when the probe stopped early.
        stop_reason: why the probe search ended.
        pick_reason: why ``batch_size`` was picked.
        notes: things the user should know (defaults taken, budget hit).
        seconds: total wall time.
        throughput: the timed sizes (empty when the profiler did not run).
        memory: peak bytes of each size that fit in the probe, by batch size.
        advice: what follows from the pick (accumulation plan, learning rates, epoch length),
            as plain data, or None when no input for it was given.
        noise_scale: the gradient noise scale (``NoiseScale.to_dict()``: ``b_simple``,
            ``std_error``, ``critical_batch``, ...) when it was asked for, else None.
        profile_stop_reason: why the profiler stopped timing (None when it did not run).
        profile_skipped: the candidate sizes the profiler did not time, and why.
        pick_confidence: how sure the pick is: ``"high"``, ``"medium"`` or ``"low"`` (None
            without the profiler).
        pick_confidence_reason: why, in words.
        profile_seconds: wall time of the profiler, interleaved rounds included (None without
            it).
        profile_budget_seconds: the profiler's budget, which every timing and round stays
            within (None without the profiler, or when it never needed one).
        world_size: the ranks that probed together under ``torch.distributed`` (1: alone).
        accumulation_steps: micro-batches per optimizer step (the advice's plan, else 1).
        from_cache: True when the answer came from the result cache (:mod:`maxbatch.store.cache`):
            the notes say how it was checked.
        global_batch_size: samples per optimizer step over all ranks:
            ``micro-batch × world_size × accumulation_steps`` (the micro-batch is the advice's
            plan's when there is one, else ``batch_size``).
        data: the scan of the data set the batches came from (:class:`maxbatch.step.data.DataScan`,
            with the worst-case batch at the ceiling), or None for a sample or ``make_batch``.
        ceiling_source: ``"measured"`` (trials ran and verified it), or ``"estimated"`` (a
            virtual capacity larger than this machine can hold: the fake-tensor estimate's).
        steady_state: the loop state the trials measured (:func:`maxbatch.step.loop.steady_state`):
            ``steps_per_trial``, ``zero_grad``, ``micro_batches``, ``alive_at_start`` (what was
            alive at the start of the measured step), ``leak_check_steps``.
        accumulation_ceiling: the largest micro-batch that fits when accumulating (measured by
            accumulating trials, when a ``global_batch`` needs more than one micro-batch), or
            None when none was measured.
        accumulation_trials: the accumulating trials (two micro-batches per optimizer step).
        cached_search: for an answer from the result cache, the search that found it, apart
            from this run's: ``key`` (the entry's), ``trials`` (the stored search's trials, with
            their timings of then) and ``seconds`` (its wall time then); else None. On a cache
            hit ``trials`` are the ones this run ran (the check: the ceiling and the size
            above; none with ``trust_cache``), ``seconds`` this run's time.
    """

    batch_size: int
    ceiling: int
    device: str
    device_name: str
    mode: str
    precision: str | None
    optimizer: str | None
    trials: tuple[Trial, ...]
    capacity_bytes: int
    headroom_bytes: int
    usable_bytes: int
    virtual: bool
    memory_model: MemoryModel | None
    complete: bool
    stop_reason: str
    pick_reason: str
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    throughput: tuple[Throughput, ...] = ()
    memory: tuple[MemoryPoint, ...] = ()
    advice: dict[str, Any] | None = None
    noise_scale: dict[str, Any] | None = None
    profile_stop_reason: str | None = None
    profile_skipped: tuple[Skipped, ...] = ()
    pick_confidence: str | None = None
    pick_confidence_reason: str | None = None
    world_size: int = 1
    accumulation_steps: int = 1
    global_batch_size: int | None = None
    from_cache: bool = False
    data: dict[str, Any] | None = None
    ceiling_source: str = "measured"
    steady_state: dict[str, Any] | None = None
    accumulation_ceiling: int | None = None
    accumulation_trials: tuple[Trial, ...] = ()
    profile_seconds: float | None = None
    profile_budget_seconds: float | None = None
    cached_search: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return _asdict(self)

    def micro_ceiling(self) -> int:
        """The largest micro-batch for a plan that accumulates.

        Returns:
            Measured where accumulating trials ran, else predicted by the memory model's extra
            term (at most the ceiling).
        """
        if self.accumulation_ceiling is not None:
            return self.accumulation_ceiling
        return predicted_ceiling(self.memory_model, self.usable_bytes, self.ceiling)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchSizeResult:
        """The result back from its :meth:`to_dict` (a saved report, a cache entry).

        Returns:
            The result.

        Raises:
            KeyError, TypeError: ``data`` is not a result's dict.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in data.items() if k in names}
        d["trials"] = tuple(Trial(**t) for t in d["trials"])
        d["accumulation_trials"] = tuple(Trial(**t) for t in d.get("accumulation_trials", ()))
        mm = d.get("memory_model")
        d["memory_model"] = None if mm is None else MemoryModel(**mm)
        d["throughput"] = tuple(Throughput(**p) for p in d.get("throughput", ()))
        d["memory"] = tuple(MemoryPoint(**p) for p in d.get("memory", ()))
        d["profile_skipped"] = tuple(Skipped(**x) for x in d.get("profile_skipped", ()))
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class CapacityEstimate:
    """The predicted ceiling for one device capacity.

    Attributes:
        capacity_bytes: the device's memory.
        reserved_bytes: taken before any tensor (the CUDA context for a CUDA target, else 0).
        headroom_bytes: kept free below the capacity.
        usable_bytes: ``capacity_bytes - reserved_bytes - headroom_bytes``.
        ceiling: the largest batch size whose estimated peak fits, or None when none does.
        peak_bytes: the estimated peak at ``ceiling`` (None without a ceiling).
        reason: why the search ended, in words.
    """

    capacity_bytes: int
    reserved_bytes: int
    headroom_bytes: int
    usable_bytes: int
    ceiling: int | None
    peak_bytes: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return the row as a JSON-ready dict."""
        return _asdict(self)


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """Where the memory goes: what a user can act on.

    The peak of a training step usually comes at the end of the forward pass, when the gradients
    of the previous step are freed (``zero_grad(set_to_none=True)``) and the activations are all
    live: so the memory model's fixed part need not hold the gradients.

    Attributes:
        parameters_bytes: the model's parameters.
        buffers_bytes: its buffers (batch-norm statistics, ...).
        gradients_bytes: the gradients after backward.
        optimizer_bytes: the optimizer's state (moments, momentum).
        inputs_bytes_per_sample: the batch's own tensors.
        activations_bytes_per_sample: the rest of the memory model's per-sample part: activations
            saved for backward and temporaries live at the peak.
    """

    parameters_bytes: int
    buffers_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    inputs_bytes_per_sample: float
    activations_bytes_per_sample: float

    def to_dict(self) -> dict[str, Any]:
        """Return the breakdown as a JSON-ready dict."""
        return _asdict(self)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What :func:`~maxbatch.estimate_batch_size` returns: a prediction, never a measurement.

    Attributes:
        target: ``"cpu"`` (counted as the virtual device counts) or ``"cuda"`` (adjusted).
        mode: ``"train"`` or ``"inference"``.
        precision: autocast precision or None.
        optimizer: the optimizer class in the step, or None.
        capacities: the predicted ceiling for each capacity asked for, in order.
        memory_model: ``peak(b) ≈ fixed + per_sample * b``, fitted through exact fake peaks near
            the largest ceiling.
        breakdown: parameters, gradients, optimizer state, inputs and activations.
        peaks: ``(batch size, estimated peak bytes)`` for each size asked for (``batch_sizes``).
        fake_steps: fake trials run (each runs the step twice, as a real trial does).
        notes: how the estimate was made: platform adjustments, assumptions, what it cannot see.
        seconds: wall time.
        estimate: always True: the numbers were predicted from fake tensors, not measured.
    """

    target: str
    mode: str
    precision: str | None
    optimizer: str | None
    capacities: tuple[CapacityEstimate, ...]
    memory_model: MemoryModel
    breakdown: Breakdown
    peaks: tuple[tuple[int, int], ...]
    fake_steps: int
    notes: tuple[str, ...]
    seconds: float
    estimate: bool = True

    @property
    def ceiling(self) -> int | None:
        """The ceiling when exactly one capacity was asked for."""
        if len(self.capacities) != 1:
            raise ValueError(
                f"the estimate has {len(self.capacities)} capacities; read capacities[i].ceiling"
            )
        return self.capacities[0].ceiling

    def peak_bytes(self, batch_size: int) -> int | None:
        """The estimated peak at ``batch_size`` if it was asked for, else None."""
        return dict(self.peaks).get(batch_size)

    def to_dict(self) -> dict[str, Any]:
        """Return the estimate as a JSON-ready dict (with ``ceiling`` for a single capacity)."""
        data = _asdict(self)
        data["peaks"] = [{"batch_size": b, "peak_bytes": p} for b, p in self.peaks]
        if len(self.capacities) == 1:
            data["ceiling"] = self.capacities[0].ceiling
        return data


@dataclasses.dataclass(frozen=True)
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

        Where the kind's allocator cache counts as free (CUDA) the process's held bytes are added;
        on the CPU its resident memory is not added back: it is not free for tensors.
        """
        if kind_of(self.kind).cache_is_free:
            return self.free_bytes + self.process_bytes
        return self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        """Return the info as a JSON-ready dict."""
        d = _asdict(self)
        d["capacity_bytes"] = self.capacity_bytes
        return d
