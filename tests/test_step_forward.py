"""The one step and the one retry: StepHooks.forward_backward, lower_after_oom, who uses them."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import maxbatch
from maxbatch.errors import WorkloadError
from maxbatch.results import MemoryModel, predicted_ceiling
from maxbatch.settings import Precision
from maxbatch.step.forward import StepHooks
from maxbatch.step.retry import lower_after_oom


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def test_forward_backward_weights_the_loss_and_leaves_the_gradient_of_the_weighted_loss() -> None:
    model, x = _linear(), torch.randn(8, 4)
    _, weighted = StepHooks().forward_backward(model, x, weight=0.25)
    assert model.weight.grad is not None
    grad = model.weight.grad.clone()
    model.zero_grad()
    model(x).mean().backward()
    assert torch.allclose(grad, 0.25 * model.weight.grad)
    assert torch.allclose(weighted, 0.25 * model(x).mean())


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_forward_backward_runs_under_autocast_at_the_precision(precision: Precision) -> None:
    seen: list[torch.dtype] = []

    def forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out = model(batch)
        seen.append(out.dtype)
        return out

    hooks = StepHooks.build(forward_fn=forward, precision=precision)
    hooks.forward_backward(_linear(), torch.randn(8, 4))
    want = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    assert seen == [want]


def test_the_scalar_loss_check_is_one_for_every_caller() -> None:
    def per_sample(output: torch.Tensor, batch: Any) -> torch.Tensor:
        return output.sum(dim=1)

    model, x = _linear(), torch.randn(8, 4)
    with pytest.raises(WorkloadError, match=r"scalar tensor, got Tensor of shape \(8,\)"):
        StepHooks.build(loss_fn=per_sample).forward_loss(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(WorkloadError, match=r"of shape \(4,\)"):  # its micro-batch
        maxbatch.MicroBatcher(model, opt, micro_batch_size=4, loss_fn=per_sample).step(x)
    with pytest.raises(WorkloadError, match=r"of shape"):
        maxbatch.noise_scale(model, x, loss_fn=per_sample, batches=2, b_small=2)


def test_a_scaler_scales_the_backward() -> None:
    class Times:
        def scale(self, loss: torch.Tensor) -> torch.Tensor:
            return loss * 8

    model, x = _linear(), torch.randn(8, 4)
    StepHooks().forward_backward(model, x, scaler=Times())
    assert model.weight.grad is not None
    grad = model.weight.grad.clone()
    model.zero_grad()
    model(x).mean().backward()
    assert torch.allclose(grad, 8 * model.weight.grad)


MODEL = MemoryModel(fixed_bytes=1000.0, bytes_per_sample=100.0)


@pytest.mark.parametrize(
    ("size", "kwargs", "expected"),
    [
        (64, {}, 32),
        (3, {}, 1),
        (1, {}, None),
        (8, {"smallest": 8}, None),
        (24, {"halve": lambda n: 8 * ((n // 2) // 8)}, 8),
        # the model's largest fitting size (90) is below the failed size: take it
        (128, {"memory_model": MODEL, "usable_bytes": 10_000}, 90),
        # the model's own size failed: refit it with the bytes it did not see
        (90, {"memory_model": MODEL, "usable_bytes": 10_000, "unseen_bytes": 2_000}, 70),
        # nothing unseen explains it: half
        (90, {"memory_model": MODEL, "usable_bytes": 10_000}, 45),
    ],
)
def test_lower_after_oom(size: int, kwargs: dict[str, Any], expected: int | None) -> None:
    assert lower_after_oom(size, **kwargs) == expected


def test_fitting_size_is_the_memory_models_prediction() -> None:
    assert MODEL.fitting_size(10_000) == 90
    assert MODEL.fitting_size(10_000, extra_bytes=1_050) == 79
    assert MODEL.fitting_size(500) < 0


def test_the_accumulation_ceiling_is_the_same_prediction_clamped() -> None:
    """``predicted_ceiling`` asks the model's one prediction, with its extra term, then clamps."""
    model = dataclasses.replace(MODEL, accumulation_bytes=1_050)
    assert model.fitting_size(10_000, accumulating=True) == 79
    assert predicted_ceiling(model, 10_000, 128) == 79
    assert predicted_ceiling(model, 10_000, 64) == 64
    assert predicted_ceiling(model, 500, 64) == 1
    assert predicted_ceiling(None, 10_000, 64) == 64


def test_the_prediction_is_the_floor_of_the_exact_quotient() -> None:
    """1.0 / 0.1 rounds up to 10.0; the floor of the exact quotient is 9 (0.1 is a bit above)."""
    assert MemoryModel(fixed_bytes=0.0, bytes_per_sample=0.1).fitting_size(1.0) == 9


def test_a_redone_micro_batcher_step_puts_every_rng_back() -> None:
    """After an OOM the step is redone from the same RNG states: torch, Python and NumPy."""
    model, x = _linear(), torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    draws: list[tuple[float, float, float]] = []

    def forward(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        draws.append((torch.rand(()).item(), random.random(), float(np.random.rand())))
        if len(draws) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. (a test)")
        return m(batch)

    mb = maxbatch.MicroBatcher(model, opt, micro_batch_size=8, forward_fn=forward)
    mb.step(x)
    assert mb.micro_batch_size == 4
    assert draws[0] == draws[1]  # the retry's first micro-batch saw the same draws
