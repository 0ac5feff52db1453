"""Estimates without running: peak memory and ceilings for devices you do not have.

The step runs on a fake copy of the model under ``FakeTensorMode``: tensors have shapes, dtypes and
strides but no data, so nothing is computed and no memory is allocated, whatever the batch size.
The virtual device's own counter (:class:`~maxbatch.accounting.MemoryCounter`) counts the fake
tensors' storages (meta storages know their size in bytes, and their weakref finalizers fire when
they are freed), and the probe's own trial (:func:`~maxbatch.trial.run_trial`) and search
(:func:`~maxbatch.probe.search`) run on them. So on the CPU the estimated peak is the virtual
device's measured peak, byte for byte, and the predicted ceiling is the probe's.

Fake tensors say they live on the CPU, so code that branches on the device (the attention kernel,
the optimizer implementation, autocast's op lists) takes the CPU's path. ``target="cuda"`` adds
explicit adjustments (:data:`CUDA_ROUNDING`, :data:`CUDA_CONTEXT_BYTES`, the foreach optimizer)
and notes what stays different. An estimate is never a measurement, and says so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.utils._pytree import tree_flatten

from maxbatch.accounting import CUDA_ROUNDING, MemoryCounter
from maxbatch.batching import _map_tensors, make_batch_fn
from maxbatch.errors import ConfigError, DoesNotFitError, WorkloadError
from maxbatch.probe import search
from maxbatch.results import MemoryModel, Trial
from maxbatch.trial import Meter, run_trial
from maxbatch.units import format_bytes, parse_bytes
from maxbatch.workload import (
    ForwardFn,
    LossFn,
    Mode,
    Precision,
    TrainStepFn,
    Workload,
    make_optimizer,
    parse_enum,
)

log = logging.getLogger(__name__)

#: Memory a CUDA context takes on the device before any tensor: an assumption (it is 300 MiB to
#: over 1 GiB, by GPU, driver, CUDA version and lazy module loading), subtracted for a CUDA target.
CUDA_CONTEXT_BYTES = 500 * 1024**2

_CPU = torch.device("cpu")
_LIFT = torch.ops.aten.lift_fresh.default
_DEVICE = torch.ops.prim.device.default
_BATCH_NORM = torch.ops.aten.native_batch_norm.default
_REDUCED = (torch.bfloat16, torch.float16)
_NOT_FAKEABLE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)


class Target(str, enum.Enum):
    """The platform an estimate is for: the virtual device's counting, or adjusted for CUDA."""

    CPU = "cpu"
    CUDA = "cuda"


class EstimateError(WorkloadError):
    """The step cannot run on fake tensors; ``operation`` names the operator that needed data."""

    def __init__(self, message: str, *, operation: str | None = None):
        super().__init__(message)
        self.operation = operation


def _why(error: Exception) -> str:
    if isinstance(error, DataDependentOutputException):
        return (
            "reads a tensor's value into Python (.item(), .tolist(), bool(t), int(t), `if t:`), "
            "and fake tensors have no values"
        )
    if isinstance(error, DynamicOutputShapeException):
        return (
            "has an output shape that depends on tensor values (nonzero, boolean-mask indexing, "
            "unique, masked_select), which fake tensors cannot know"
        )
    return "has no fake (meta) implementation in this torch version"


class _FakeCounter(MemoryCounter):  # type: ignore[no-untyped-call]
    """The virtual device's counter over fake tensors, whose storages are on the meta device."""

    def __init__(self, round_to: int):
        super().__init__(None, round_to=round_to, label="estimated")

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is _DEVICE:
            return func(*args, **(kwargs or {}))  # a fake tensor's `.device`: no storage, and hot
        if func is _LIFT:
            # torch.tensor(...) builds its data outside dispatch, where the real counter never
            # sees it; lifting it into a fake tensor makes a new storage that must not count.
            return func(*args, **(kwargs or {}))
        run = _cpu_batch_norm(func) if func is _BATCH_NORM else func
        try:
            return super().__torch_dispatch__(run, types, args, kwargs)
        except _NOT_FAKEABLE as e:
            op = str(getattr(e, "func", func))
            raise EstimateError(
                f"the step cannot run on fake tensors: {op} {_why(e)}; estimates need a step "
                "whose shapes do not depend on tensor values. Use `maxbatch probe` (or "
                "find_batch_size) to measure on a real device instead",
                operation=op,
            ) from e


def _cpu_batch_norm(func: Any) -> Any:
    """Batch norm whose saved statistics have the CPU kernel's dtype.

    The meta kernel saves them in the input's dtype; the CPU kernel saves them in float32 when a
    bfloat16 or float16 input meets float32 parameters (autocast), as the probe counts them.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        out = func(*args, **kwargs)
        params = [t for t in args[1:5] if isinstance(t, torch.Tensor)]
        if args[0].dtype in _REDUCED and any(t.dtype == torch.float32 for t in params):
            return (out[0], out[1].float(), out[2].float())
        return out

    return run


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor with the shape, strides, dtype and grad flag of ``t`` (under the mode)."""
    fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=_CPU)
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(fake, requires_grad=t.requires_grad)
    return fake.requires_grad_(t.requires_grad) if t.is_leaf else fake


def _fake_model(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[int, Any]]:
    """A copy of ``model`` whose tensors are fake; the real ones are neither copied nor touched."""
    memo: dict[int, Any] = {}
    tensors = itertools.chain(
        model.parameters(),
        model.buffers(),
        (v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)),
    )
    for t in tensors:
        if id(t) not in memo:
            memo[id(t)] = _fake_like(t)
    try:
        # deepcopy takes every tensor in the memo as already copied: no real tensor is cloned.
        return copy.deepcopy(model, memo), memo
    except Exception as e:
        raise EstimateError(
            f"the model cannot be copied onto fake tensors ({type(e).__name__}: {e}); use "
            "`maxbatch probe` to measure it on a real device"
        ) from e


def _fake_optimizer(
    optimizer: Any, model: torch.nn.Module, memo: dict[int, Any]
) -> torch.optim.Optimizer | None:
    """The step's optimizer over the fake parameters: the same class and hyperparameters."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return make_optimizer(optimizer, model)
    try:
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [memo[id(p)] for p in g["params"]],
            }
            for g in optimizer.param_groups
        ]
    except KeyError:
        raise ConfigError(
            "the optimizer holds tensors that are not the model's parameters; pass a factory "
            "such as optimizer=lambda params: torch.optim.AdamW(params)"
        ) from None
    cls: Any = type(optimizer)
    # Group values override the defaults; some classes need their defaults passed again.
    for kwargs in ({}, optimizer.defaults):
        with contextlib.suppress(TypeError):
            rebuilt: torch.optim.Optimizer = cls(groups, **kwargs)
            return rebuilt
    raise ConfigError(
        f"{cls.__name__} cannot be rebuilt over fake parameters from its param groups; pass a "
        "factory such as optimizer=lambda params: MyOptimizer(params, lr=...)"
    )


def _like_cuda(optimizer: torch.optim.Optimizer) -> None:
    """Use the foreach implementation where torch's default on CUDA parameters would."""
    for g in optimizer.param_groups:
        tensor_lr = isinstance(g.get("lr"), torch.Tensor) and not g.get("capturable")
        chosen = g.get("fused") or g.get("differentiable") or tensor_lr
        if "foreach" in g and g["foreach"] is None and not chosen:
            g["foreach"] = True


def _storage_bytes(tensors: Iterable[Any], round_to: int) -> int:
    """Bytes of the distinct storages of ``tensors``, each rounded up to ``round_to``."""
    sizes = {
        t.untyped_storage()._cdata: t.untyped_storage().nbytes()
        for t in tensors
        if isinstance(t, torch.Tensor)
    }
    return sum(-(-n // round_to) * round_to for n in sizes.values())


class _FakeStep:
    """The workload on fake tensors, its trials run and counted as the virtual device runs them."""

    def __init__(self, workload: Workload, target: Target, sample_size: int | None):
        self.workload = workload
        self.target = target
        self.sample_size = sample_size
        self.round_to = CUDA_ROUNDING if target is Target.CUDA else 1
        self.meter = Meter(_CPU, counting=True, label="estimated")
        self.meter.counter = _FakeCounter(self.round_to)
        self.base = 0
        self.exact: dict[int, Trial] = {}  # trials that ran to the end: their peak is exact
        self.refused: dict[tuple[int, int], Trial] = {}  # out of memory at that usable size
        self.steps = 0

    def trial(self, batch_size: int, usable: int | None) -> Trial:
        """The virtual device's trial at ``batch_size`` with ``usable`` bytes (None: no cap)."""
        known = self.exact.get(batch_size)
        if known is not None and (usable is None or known.peak_bytes <= usable):
            return known
        if usable is not None and (batch_size, usable) in self.refused:
            return self.refused[batch_size, usable]
        self.meter.usable_bytes = usable
        assert self.meter.counter is not None
        self.meter.counter.cap_bytes = usable
        trial = run_trial(self.workload, self.meter, batch_size)
        self.steps += 1
        if trial.oom:
            assert usable is not None
            self.refused[batch_size, usable] = trial
        else:
            self.exact[batch_size] = dataclasses.replace(trial, fits=True)
        return trial

    def peak(self, batch_size: int) -> int:
        """The exact peak bytes of a trial at ``batch_size``."""
        return self.trial(batch_size, None).peak_bytes

    def ceiling(
        self, usable: int, *, start: int, lower: int, upper: int | None, multiple_of: int
    ) -> tuple[int | None, str]:
        """The probe's search over fake trials: the ceiling for ``usable`` bytes and why."""
        if usable <= self.base:
            return None, (
                f"the model and its state alone hold {format_bytes(self.base)}, more than the "
                f"usable {format_bytes(usable)}"
            )
        try:
            outcome = search(
                lambda b: self.trial(b, usable),
                start=start,
                usable_bytes=usable,
                base_bytes=self.base,
                min_batch_size=lower,
                max_batch_size=upper,
                multiple_of=multiple_of,
            )
        except DoesNotFitError as e:
            # A fake step costs nothing: say what the smallest size needs, not where it stopped.
            return None, (
                f"batch size {e.batch_size} does not fit: it needs "
                f"{format_bytes(self.peak(e.batch_size))}, {format_bytes(usable)} are usable"
            )
        return outcome.ceiling, outcome.stop_reason

    def input_bytes(self, batch_size: int) -> int:
        """Bytes of a batch of ``batch_size`` as the step receives it."""
        batch = self.workload.make_batch(batch_size)
        return _storage_bytes(tree_flatten(batch)[0], self.round_to)

    def state(self, batch_size: int) -> dict[str, int]:
        """Bytes of parameters, buffers, gradients and optimizer state after one fake step."""
        w, r = self.workload, self.round_to
        w.run(batch_size, 1)
        grads = [p.grad for p in w.model.parameters() if p.grad is not None]
        opt = (
            []
            if w.optimizer is None
            else [v for s in w.optimizer.state.values() for v in s.values()]
        )
        state = {
            "parameters_bytes": _storage_bytes(w.model.parameters(), r),
            "buffers_bytes": _storage_bytes(w.model.buffers(), r),
            "gradients_bytes": _storage_bytes(grads, r),
            "optimizer_bytes": _storage_bytes(opt, r),
        }
        w.reset()
        return state


@contextlib.contextmanager
def _fake_step(
    model: torch.nn.Module,
    sample: Any,
    *,
    optimizer: Any,
    forward_fn: ForwardFn | None,
    loss_fn: LossFn | None,
    train_step: TrainStepFn | None,
    mode: Mode,
    precision: Precision,
    target: Target,
) -> Iterator[_FakeStep]:
    """Build the fake workload; inside, every tensor operation runs on fake tensors."""
    _, sample_size = make_batch_fn(sample)  # validates the sample; its batches are never built
    # Fallback kernels would run ops without a meta kernel on real zeros: real memory.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, allow_fallback_kernels=False)
    with fake_mode:
        fake_model, memo = _fake_model(model)
        if sample_size is None:
            make_batch = sample  # make_batch(b) runs under the fake mode: its tensors are fake
        else:
            make_batch, _ = make_batch_fn(_map_tensors(sample, _fake_like))
        opt = None if mode is Mode.INFERENCE else _fake_optimizer(optimizer, fake_model, memo)
        if opt is not None and target is Target.CUDA:
            _like_cuda(opt)
        workload = Workload(
            fake_model,
            make_batch,
            _CPU,
            mode=mode,
            precision=precision,
            optimizer=opt,
            forward_fn=forward_fn,
            loss_fn=loss_fn,
            train_step=train_step,
        )
        step = _FakeStep(workload, target, sample_size)
        workload.save()
        try:
            workload.prepare()
            step.base = step.meter.live_bytes(workload)
            yield step
        finally:
            workload.reset(final=True)
            step.meter.close()


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
        return dataclasses.asdict(self)


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
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What :func:`estimate_batch_size` returns: a prediction, never a measurement.

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
        data = dataclasses.asdict(self)
        data["peaks"] = [{"batch_size": b, "peak_bytes": p} for b, p in self.peaks]
        if len(self.capacities) == 1:
            data["ceiling"] = self.capacities[0].ceiling
        return data


def _capacities(memory: Any) -> list[int]:
    if memory is None:
        return []
    items = memory.split(",") if isinstance(memory, str) else memory
    if isinstance(items, (int, float)):
        items = [items]
    sizes = [parse_bytes(item, name="memory") for item in items]
    if any(s == 0 for s in sizes):
        raise ConfigError("memory=0 leaves no room for anything; give a size such as 24GiB")
    return sizes


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def _headroom(capacity: int, headroom: int | None, target: Target) -> int:
    if headroom is not None:
        return headroom
    if target is Target.CPU:
        return 0
    # Imported here: the finder imports this module for its first guess.
    from maxbatch.finder import default_headroom

    return default_headroom(capacity, virtual=False)


def _notes(target: Target, foreach: bool) -> list[str]:
    notes = [
        "estimate: the step ran on fake tensors (no data, no computation); nothing was measured"
    ]
    if target is Target.CPU:
        notes.append(
            "counted as the virtual device counts (live tensor storages): `maxbatch probe "
            "--memory SIZE` on the CPU measures the same peaks"
        )
        return notes
    notes += [
        f"allocations rounded up to {CUDA_ROUNDING} B, as the CUDA caching allocator rounds them",
        f"{format_bytes(CUDA_CONTEXT_BYTES)} reserved for the CUDA context: an assumption (it "
        "takes 300 MiB to over 1 GiB by GPU, driver and CUDA version)",
        "attention kernels differ between CPU and CUDA: the fake step ran the CPU's choice; CUDA "
        "picks flash, memory-efficient or cuDNN attention by GPU and dtype, which save "
        "different tensors for backward",
        "autocast used the CPU's op lists; CUDA's differ for some ops",
        "not counted: cuBLAS/cuDNN workspaces, allocator fragmentation, other processes (the "
        "headroom covers them); verify with `maxbatch probe` on the device",
    ]
    if foreach:
        notes.append(
            "optimizer: the foreach implementation (torch's default on CUDA), whose temporaries "
            "hold a copy of a whole state at once"
        )
    return notes


def estimate_batch_size(
    model: torch.nn.Module,
    sample: Any,
    *,
    memory: str | int | Sequence[str | int] | None = None,
    headroom: str | int | None = None,
    target: str | Target = "cpu",
    optimizer: Any = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    train_step: TrainStepFn | None = None,
    mode: str | Mode = "train",
    precision: str | Precision | None = None,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    batch_sizes: Sequence[int] = (),
) -> Estimate:
    """Predict the step's peak memory and the ceiling for each capacity, without running it.

    The model is copied onto fake tensors (its own tensors are not touched; a model built under
    ``torch.device("meta")`` works too, so models larger than this machine's memory can be
    estimated), and the step's trials run on them as the virtual device runs real ones.

    Args:
        model: the model (on any device, or the meta device).
        sample: one batch (batch dimension first) or ``make_batch(batch_size)``.
        memory: capacities such as ``"24GiB"``, a list of them, or ``"16GiB,24GiB"``.
        headroom: bytes kept free below each capacity; default 0 for the CPU target (as the
            virtual device), 5 % (at least 256 MiB) for CUDA (as a probe on a real GPU).
        target: ``"cpu"``: count as the virtual device counts (``maxbatch probe --memory``);
            ``"cuda"``: round allocations to 512 B, reserve :data:`CUDA_CONTEXT_BYTES`, use the
            foreach optimizer as torch does on CUDA.
        optimizer: as for :func:`~maxbatch.find_batch_size`: an optimizer (rebuilt over the fake
            parameters), a factory, ``"adamw"``, ``"adam"``, ``"sgd"`` or ``"none"``.
        loss_fn: ``loss_fn(output, batch)``, as for the probe.
        forward_fn: ``forward_fn(model, batch)``, as for the probe.
        train_step: ``train_step(model, batch, optimizer)``, as for the probe.
        mode: ``"train"`` or ``"inference"``.
        precision: ``"bf16"`` or ``"fp16"`` for autocast (CPU autocast).
        min_batch_size: the smallest size the search tries.
        max_batch_size: the largest size the search tries.
        multiple_of: only sizes that are multiples of this.
        batch_sizes: sizes whose peak to estimate too (see :attr:`Estimate.peaks`).

    Returns:
        An :class:`Estimate`.

    Raises:
        ConfigError: an option is invalid.
        EstimateError: the step cannot run on fake tensors (``.item()``, data-dependent shapes).
        WorkloadError: the step fails for another reason, as it would in a probe.
    """
    started = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    run_mode: Mode = parse_enum(Mode, mode, "mode")
    prec: Precision = parse_enum(Precision, precision or "fp32", "precision")
    tgt: Target = parse_enum(Target, target, "target")
    caps = _capacities(memory)
    room = None if headroom is None else parse_bytes(headroom, name="headroom")
    step = _positive(multiple_of, "multiple_of")
    lower = 1 if min_batch_size is None else _positive(min_batch_size, "min_batch_size")
    upper = None if max_batch_size is None else _positive(max_batch_size, "max_batch_size")
    if upper is not None and lower > upper:
        raise ConfigError(f"min_batch_size={lower} is larger than max_batch_size={upper}")
    sizes = [_positive(b, "batch_sizes") for b in batch_sizes]

    rows: list[CapacityEstimate] = []
    with _fake_step(
        model,
        sample,
        optimizer=optimizer,
        forward_fn=forward_fn,
        loss_fn=loss_fn,
        train_step=train_step,
        mode=run_mode,
        precision=prec,
        target=tgt,
    ) as fake:
        start = max(lower, fake.sample_size if fake.sample_size is not None else 2)
        for cap in caps:
            reserved = CUDA_CONTEXT_BYTES if tgt is Target.CUDA else 0
            kept = _headroom(cap, room, tgt)
            usable = cap - reserved - kept
            ceiling, reason = (
                fake.ceiling(usable, start=start, lower=lower, upper=upper, multiple_of=step)
                if usable > 0
                else (None, "nothing is usable after the reserve and the headroom")
            )
            peak = None if ceiling is None else fake.peak(ceiling)
            rows.append(CapacityEstimate(cap, reserved, kept, usable, ceiling, peak, reason))
        for b in sizes:
            fake.peak(b)
        model_fit, affine = _memory_model(fake, [r.ceiling for r in rows], sizes, start)
        state = fake.state(start)
        inputs = (fake.input_bytes(2 * start) - fake.input_bytes(start)) / start
        optimizer_name = (
            None if fake.workload.optimizer is None else type(fake.workload.optimizer).__name__
        )
        foreach = any(
            g.get("foreach") for g in getattr(fake.workload.optimizer, "param_groups", [])
        )
    notes = _notes(tgt, tgt is Target.CUDA and foreach)
    if not affine:
        notes.append(
            "the peak is not affine in the batch size near the ceiling: the memory model is "
            "approximate there (the ceilings come from exact fake steps)"
        )
    breakdown = Breakdown(
        inputs_bytes_per_sample=inputs,
        activations_bytes_per_sample=model_fit.bytes_per_sample - inputs,
        **state,
    )
    return Estimate(
        target=tgt.value,
        mode=run_mode.value,
        precision=None if prec is Precision.FP32 else prec.value,
        optimizer=optimizer_name,
        capacities=tuple(rows),
        memory_model=model_fit,
        breakdown=breakdown,
        peaks=tuple((b, fake.exact[b].peak_bytes) for b in dict.fromkeys(sizes)),
        fake_steps=fake.steps,
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
    )


def _memory_model(
    fake: _FakeStep, ceilings: list[int | None], sizes: list[int], start: int
) -> tuple[MemoryModel, bool]:
    """Fit ``fixed + per_sample * b`` through exact peaks at the largest ceiling and its half.

    Memory is affine in ``b`` above a small crossover, so the points nearest the ceiling describe
    it best; a third point between them checks the fit.
    """
    known = [c for c in ceilings if c is not None] + sizes
    high = max(known) if known else 8 * start
    low = max(start, high // 2)
    if low >= high:
        high = 2 * low
    p_low, p_high = fake.peak(low), fake.peak(high)
    slope = (p_high - p_low) / (high - low)
    fit = MemoryModel(fixed_bytes=p_high - slope * high, bytes_per_sample=slope)
    middle = (low + high) // 2
    if middle in (low, high):
        return fit, True
    return fit, abs(fake.peak(middle) - fit.peak(middle)) <= 0.01 * fit.peak(middle)


def first_guess(
    workload: Workload,
    sample: Any,
    usable_bytes: int,
    *,
    start: int,
    min_batch_size: int = 1,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
) -> int | None:
    """The ceiling the fake step predicts for ``usable_bytes``: the probe's first guess.

    Counted as on ``workload.device``'s kind (CUDA: 512-byte rounding and the foreach optimizer).
    Never raises: returns None when the step cannot run on fake tensors or nothing fits.

    Args:
        workload: the probe's workload (model, optimizer, step functions, mode, precision).
        sample: what the user passed as the sample (a batch or ``make_batch``).
        usable_bytes: the bytes a trial may peak at.
        start: the size the probe starts at.
        min_batch_size: the smallest size to try.
        max_batch_size: the largest size to try, or None.
        multiple_of: only multiples of this.
    """
    target = Target.CUDA if workload.device.type == "cuda" else Target.CPU
    started = time.perf_counter()
    try:
        with _fake_step(
            workload.model,
            sample,
            optimizer=workload.optimizer,
            forward_fn=workload.forward_fn,
            loss_fn=workload.loss_fn,
            train_step=workload.train_step,
            mode=workload.mode,
            precision=workload.precision,
            target=target,
        ) as fake:
            guess, reason = fake.ceiling(
                usable_bytes,
                start=start,
                lower=min_batch_size,
                upper=max_batch_size,
                multiple_of=multiple_of,
            )
    except Exception as e:  # noqa: BLE001 - a guess must never stop the probe
        log.info("no first guess from fake tensors: %s: %s", type(e).__name__, e)
        return None
    log.info(
        "first guess from fake tensors: %s (%s; %.2fs)",
        guess,
        reason,
        time.perf_counter() - started,
    )
    return guess
