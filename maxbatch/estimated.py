"""What :func:`~maxbatch.estimate_batch_size` returns, as plain frozen records: a prediction."""

from __future__ import annotations

import dataclasses
from typing import Any

from maxbatch.measured import MemoryModel


@dataclasses.dataclass(frozen=True, kw_only=True)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
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
        data = dataclasses.asdict(self)
        data["peaks"] = [{"batch_size": b, "peak_bytes": p} for b, p in self.peaks]
        if len(self.capacities) == 1:
            data["ceiling"] = self.capacities[0].ceiling
        return data
