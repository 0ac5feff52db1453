"""Models that the integration tests judge by the framework's own training loop.

Each takes ``x`` and ``labels`` and returns its loss with what else it computed: an MLP, a CNN
with batch norm, and a model whose forward returns an output object (a dataclass holding the
logits and hidden states, as a Hugging Face model's does). The data sets hold dict items,
collated by the default collate of either framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Factory = Callable[[], nn.Module]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.features(x).mean(dim=(2, 3)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@dataclasses.dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor


class WithOutput(nn.Module):
    """Wide layers (their gradients are a large part of the memory) and an output object."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 512)
        self.mid = nn.Linear(512, 512)
        self.out = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> Output:
        hidden = torch.relu(self.mid(torch.relu(self.inp(x))))
        logits = self.out(hidden)
        return Output(nn.functional.cross_entropy(logits, labels), logits, hidden)


def loss_of(output: Any) -> torch.Tensor:
    loss = output["loss"] if isinstance(output, dict) else output.loss
    assert isinstance(loss, torch.Tensor)
    return loss


class Items(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``n`` random items of ``shape`` with a class label each."""

    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *shape, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``n`` random token sequences of ``length``, their own labels (a language model's data)."""

    def __init__(self, n: int, length: int) -> None:
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@dataclasses.dataclass(frozen=True)
class Case:
    """A judged model: how to build it, its items' shape, and the cap it is probed under."""

    name: str
    build: Factory
    shape: tuple[int, ...]
    cap: int
    global_batch: int
    tokens: bool = False

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build()

    def data(self, n: int) -> torch.utils.data.Dataset[dict[str, torch.Tensor]]:
        return Tokens(n, self.shape[0]) if self.tokens else Items(n, self.shape)


CASES = [
    Case("mlp", MLP, (64,), 2 << 20, 1024),
    Case("cnn-bn", CNN, (3, 16, 16), 12 << 20, 512),
    Case("output-object", WithOutput, (64,), 8 << 20, 1024),
]
