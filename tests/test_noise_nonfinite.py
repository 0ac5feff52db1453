"""``noise_scale`` with NaN or infinite losses or gradients: an error that says so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import maxbatch
from maxbatch import WorkloadError


def data(bad: float | None = None) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    if bad is not None:
        x[5, 1] = bad  # one poisoned sample: every draw that holds it has a non-finite loss
    return x


def mse(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return ((out - batch[:, :1]) ** 2).mean()


def nan_gradient(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return (out.abs() * 0).sqrt().mean()  # the loss is 0; d sqrt at 0 is inf, times 0: NaN


@pytest.mark.parametrize(
    ("x", "loss", "match"),
    [
        (data(float("nan")), mse, "the loss was NaN or infinite"),
        (data(float("inf")), mse, "the loss was NaN or infinite"),
        (data(), lambda out, batch: mse(out, batch) * float("inf"), "the loss was NaN or inf"),
        (data(), nan_gradient, r"the gradient was NaN or infinite \(the loss was finite\)"),
    ],
    ids=["nan-input", "inf-input", "inf-loss", "nan-gradient"],
)
def test_a_non_finite_loss_or_gradient_is_an_error_not_an_infinite_noise_scale(
    x: torch.Tensor, loss, match: str
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(WorkloadError, match=match) as info:
        maxbatch.noise_scale(model, x, loss_fn=loss, batches=4, b_small=8, b_big=64, seed=0)
    assert "cannot measure the noise scale" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_finite_losses_still_give_a_finite_noise_scale() -> None:
    torch.manual_seed(0)
    ns = maxbatch.noise_scale(nn.Linear(3, 1), data(), loss_fn=mse, batches=4, b_small=8, seed=0)
    assert ns.b_simple > 0
