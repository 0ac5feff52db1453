"""Estimates without running: peak memory and ceilings for devices you do not have.

(The probe's own uses of the fake step, its first guess and the ceiling beyond this machine's
memory, are :mod:`maxbatch.estimate.guess`'s.)

The step runs on a fake copy of the model (:mod:`maxbatch.estimate.fakecopy`): tensors have shapes,
dtypes and strides but no data, so nothing is computed and no memory is allocated, whatever the
batch size. Its trials are counted and searched as the virtual device's are
(:mod:`maxbatch.estimate.fakestep`), so on the CPU the estimated peak is the virtual device's
measured peak, byte for byte, and the predicted ceiling is the probe's.

Fake tensors say they live on the CPU, so code that branches on the device (the attention kernel,
the optimizer implementation, autocast's op lists) takes the CPU's path. ``target="cuda"`` adds
explicit adjustments (:data:`~maxbatch.devices.accounting.CUDA_ROUNDING`,
:data:`CUDA_CONTEXT_BYTES`,
the foreach optimizer) and notes what stays different. An estimate is never a measurement, and
says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from maxbatch.devicekinds import CUDA_ROUNDING
from maxbatch.devices.capacity import CUDA_CONTEXT_BYTES, Capacity, estimate_capacity
from maxbatch.errors import EstimateError
from maxbatch.estimate.fakestep import FakeStep, fake_step
from maxbatch.grid import Grid, positive_int
from maxbatch.results import Breakdown, CapacityEstimate, Estimate, MemoryModel
from maxbatch.settings import MemorySettings, Mode, Precision, Target, parse_enum
from maxbatch.step.data import DataSource
from maxbatch.step.spec import ForwardFn, LossFn, OptimizerArg, StepSpec, TrainStepFn
from maxbatch.units import format_bytes

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "Breakdown",
    "CapacityEstimate",
    "Estimate",
    "EstimateError",
    "Target",
    "estimate_batch_size",
]

log = logging.getLogger(__name__)


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
    optimizer: OptimizerArg = None,
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
        sample: one batch (batch dimension first), ``make_batch(batch_size)``, or a data set,
            ``DataLoader`` or :class:`~maxbatch.step.data.DataSource` (its largest items).
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
    tgt: Target = parse_enum(Target, target, "target")
    limits = MemorySettings.build(memory=memory, headroom=headroom, several=True)
    grid = Grid.build(
        min_batch_size=min_batch_size, max_batch_size=max_batch_size, multiple_of=multiple_of
    )
    sizes = [positive_int(b, "batch_sizes") for b in batch_sizes]
    # Last: a data set or loader is scanned here, for its worst case.
    step = StepSpec.build(
        model,
        sample,
        optimizer=optimizer,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        train_step=train_step,
        mode=mode,
        precision=precision,
    )
    with fake_step(step, tgt) as fake:
        start = grid.start(fake.sample_size)
        rows = [
            _row(fake, estimate_capacity(cap, limits.headroom_bytes, tgt), start, grid)
            for cap in limits.capacities_bytes
        ]
        for b in sizes:
            fake.peak(b)
        model_fit, affine = _memory_model(fake, [r.ceiling for r in rows], sizes, start)
        state = fake.state(start)
        inputs = (fake.input_bytes(2 * start) - fake.input_bytes(start)) / start
        breakdown = Breakdown(
            inputs_bytes_per_sample=inputs,
            activations_bytes_per_sample=model_fit.bytes_per_sample - inputs,
            **state,
        )
        optimizer_name = _optimizer_name(fake)
        notes = _notes(tgt, tgt is Target.CUDA and _foreach(fake))
        value_note = fake.value_note()
    if value_note is not None:
        notes.append(value_note)
    if not affine:
        notes.append(
            "the peak is not affine in the batch size near the ceiling: the memory model is "
            "approximate there (the ceilings come from exact fake steps)"
        )
    if isinstance(step.sample, DataSource):
        largest = max((r.ceiling for r in rows if r.ceiling is not None), default=start)
        notes.append(step.sample.report(largest).note)
    return Estimate(
        target=tgt.value,
        mode=step.mode.value,
        precision=step.precision_name,
        optimizer=optimizer_name,
        capacities=tuple(rows),
        memory_model=model_fit,
        breakdown=breakdown,
        peaks=tuple((b, fake.exact[b].peak_bytes) for b in dict.fromkeys(sizes)),
        fake_steps=fake.steps,
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
    )


def _row(fake: FakeStep, plan: Capacity, start: int, grid: Grid) -> CapacityEstimate:
    """The predicted ceiling for one capacity."""
    usable = plan.usable_bytes
    ceiling, reason = (
        fake.ceiling(usable, start=start, grid=grid)
        if usable > 0
        else (None, "nothing is usable after the reserve and the headroom")
    )
    peak = None if ceiling is None else fake.peak(ceiling)
    return CapacityEstimate(
        capacity_bytes=plan.capacity_bytes,
        reserved_bytes=plan.reserved_bytes,
        headroom_bytes=plan.headroom_bytes,
        usable_bytes=usable,
        ceiling=ceiling,
        peak_bytes=peak,
        reason=reason,
    )


def _optimizer_name(fake: FakeStep) -> str | None:
    opt = fake.workload.optimizer
    return None if opt is None else type(opt).__name__


def _foreach(fake: FakeStep) -> bool:
    return any(g.get("foreach") for g in getattr(fake.workload.optimizer, "param_groups", []))


def _memory_model(
    fake: FakeStep, ceilings: list[int | None], sizes: list[int], start: int
) -> tuple[MemoryModel, bool]:
    """Fit ``fixed + per_sample * b`` through exact peaks at the largest ceiling and its half.

    Memory is affine in ``b`` above a small crossover, so the points nearest the ceiling describe
    it best; a third point between them checks the fit.

    Returns:
        The fitted model, and whether a third point between them lies on it (within 1 %).
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
