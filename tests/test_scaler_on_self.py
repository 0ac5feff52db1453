"""A ``GradScaler`` held on ``self``: by a bound-method ``train_step``, or a callable object."""

from __future__ import annotations

import pytest
import torch
from models import mlp

from maxbatch import find_batch_size
from maxbatch.extrastate import referenced_scalers

CAP = 200_000


class Trainer:
    """A trainer object whose ``train_step`` uses ``self.scaler`` (growing it every step)."""

    def __init__(self) -> None:
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**17, growth_interval=1)

    def train_step(self, model: torch.nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer):
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(model(batch).square().mean()).backward()
        self.scaler.step(opt)
        self.scaler.update()


class CallableStep(Trainer):
    """The same step as a callable object."""

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer):
        self.train_step(model, batch, opt)


@pytest.mark.parametrize("kind", ["bound method", "callable object"])
def test_the_scaler_on_self_is_found_and_its_scale_restored(kind: str) -> None:
    model, sample = mlp()
    owner = Trainer() if kind == "bound method" else CallableStep()
    step = owner.train_step if kind == "bound method" else owner
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step(model, sample, opt)  # the scaler is in use: its scale tensor exists
    scale = owner.scaler._scale
    assert scale is not None
    value = scale.item()
    assert value == 2.0**18  # grew once
    assert referenced_scalers(step) == [owner.scaler]
    trials: list[object] = []
    find_batch_size(
        model,
        sample,
        optimizer=opt,
        train_step=step,
        memory=CAP,
        profile=False,
        on_trial=trials.append,
    )
    assert len(trials) >= 3  # every trial stepped the scaler, and it grew each time
    assert owner.scaler._scale is scale and scale.item() == value
    assert owner.scaler._growth_tracker is not None and owner.scaler._growth_tracker.item() == 0
