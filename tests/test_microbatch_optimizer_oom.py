"""An out-of-memory error inside ``MicroBatcher``'s optimizer step, on the virtual device.

The step's state (Adam's moments, SGD's momentum buffer) does not fit beside the model and its
gradients: the step raises ``DoesNotFitError``, and the optimizer is left so that its next step
works, the same as a fresh optimizer's first step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import maxbatch
from maxbatch import DoesNotFitError

WIDTH = 256
PARAM_BYTES = (WIDTH * WIDTH + WIDTH) * 4  # 263,168: the model, and its gradients once more

OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
    "SGD momentum": lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9),
}


def mse(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def setup(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(WIDTH, WIDTH)
    return model, OPTIMIZERS[kind](model), torch.randn(16, WIDTH)


def one_fresh_step(model: nn.Module, kind: str, batch: torch.Tensor) -> list[torch.Tensor]:
    twin = copy.deepcopy(model)
    mb = maxbatch.MicroBatcher(twin, OPTIMIZERS[kind](twin), micro_batch_size=16, loss_fn=mse)
    mb.step(batch)
    return [p.detach() for p in twin.parameters()]


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_an_oom_making_the_optimizer_state_leaves_an_optimizer_the_next_step_accepts(
    kind: str,
) -> None:
    model, opt, batch = setup(kind)
    before = [p.detach().clone() for p in model.parameters()]
    expected = one_fresh_step(model, kind, batch)
    mb = maxbatch.MicroBatcher(model, opt, micro_batch_size=16, loss_fn=mse)
    # Room for the model, its gradients and the activations, not for the state.
    with maxbatch.virtual_device(2 * PARAM_BYTES + 150_000) as dev:
        dev.track(model, opt)
        with pytest.raises(DoesNotFitError, match=r"the optimizer step \(\w+\) ran out of memory"):
            mb.step(batch)
    assert dict(opt.state) == {}  # no half-made state is left
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())  # their memory is free again
    assert mb.steps == 0
    mb.step(batch)  # with the memory there: no KeyError, the same update as a fresh optimizer
    assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters(), strict=True))
    assert mb.steps == 1


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_an_oom_in_a_later_step_keeps_the_state_and_its_step_count(kind: str) -> None:
    model, opt, batch = setup(kind)
    mb = maxbatch.MicroBatcher(model, opt, micro_batch_size=16, loss_fn=mse)
    mb.step(batch)
    keys = {id(p): sorted(s) for p, s in opt.state.items()}
    # The state fits; the update's temporaries (a square root of the second moment) do not.
    with maxbatch.virtual_device(4 * PARAM_BYTES + 200_000) as dev:
        dev.track(model, opt)
        with pytest.raises(DoesNotFitError, match="optimizer step"):
            mb.step(batch)
    assert {id(p): sorted(s) for p, s in opt.state.items()} == keys
    assert all(float(s["step"]) == 1 for s in opt.state.values())
    mb.step(batch)  # accepted
    assert all(float(s["step"]) == 2 for s in opt.state.values()) and mb.steps == 2
