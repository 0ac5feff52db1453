"""A plain user training loop, to judge the probe's numbers inside ``virtual_device(cap)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import maxbatch
from maxbatch.step.batching import make_batch_fn
from maxbatch.step.forward import default_forward, default_loss


@dataclasses.dataclass
class Output:
    """What a Hugging Face style forward returns: an object with ``loss`` and ``logits``."""

    loss: torch.Tensor
    logits: torch.Tensor


class ObjectNet(nn.Module):
    """A model whose forward returns an :class:`Output` object."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 12))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Output:
        logits = self.body(x)
        return Output(nn.functional.cross_entropy(logits, y), logits)


def object_net() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return ObjectNet(), (torch.randn(4, 24), torch.randint(0, 12, (4,)))


def train(
    model: nn.Module,
    sample: Any,
    batch_size: int,
    cap: int,
    *,
    zero_grad: str = "before_forward",
    accumulate: int = 1,
    steps: int = 5,
    optimizer: Callable[[Any], torch.optim.Optimizer] = torch.optim.AdamW,
) -> None:
    """Train ``steps`` optimizer steps of the plain loop inside ``virtual_device(cap)``.

    The loop makes a new batch for every micro-batch, clears gradients where ``zero_grad`` says
    and accumulates ``accumulate`` micro-batches per optimizer step; it raises
    ``torch.OutOfMemoryError`` when the device runs out.
    """
    make_batch, _ = make_batch_fn(sample)
    opt = optimizer(model.parameters())
    model.train()
    with maxbatch.virtual_device(cap) as device:
        device.track(model)
        for _ in range(steps):
            if zero_grad == "before_forward":
                opt.zero_grad(set_to_none=True)
            for i in range(accumulate):
                batch = make_batch(batch_size)
                output = default_forward(model, batch)
                loss = default_loss(output, batch) / accumulate
                if i == 0 and zero_grad == "before_backward":
                    opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if zero_grad == "after_step":
                opt.zero_grad(set_to_none=True)
            del batch, output, loss
