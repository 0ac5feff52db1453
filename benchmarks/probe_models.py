"""Models built in code for the trial benchmark, whose peak is not affine at small batches.

- ``resnet18``: ResNet-18's layout (a 7x7 stem, 2-2-2-2 basic blocks with batch norm, global
  pooling) at a quarter of its width on 32 px images, trained with AdamW: at small batches the
  optimizer step holds the peak, at large ones the activations do.
- ``bn-mlp``: an MLP with BatchNorm1d, trained with AdamW: the same bend, and batch norm rejects a
  batch of 1.

No torchvision: every layer is torch's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a 1x1 convolution when it resizes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(h + self.short(x))


def resnet18(width: int = 16, pixels: int = 32, classes: int = 10) -> tuple[nn.Module, Batch]:
    """A seeded ResNet-18 of base ``width`` and a sample of 8 images of ``pixels`` square."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    model = nn.Sequential(
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, classes),
    )
    sample = (torch.randn(8, 3, pixels, pixels), torch.randint(0, classes, (8,)))
    return model, sample


def bn_mlp(classes: int = 10) -> tuple[nn.Module, Batch]:
    """A seeded MLP 128-256-256-10 with BatchNorm1d after each hidden layer; a sample of 16."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(128, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, classes),
    )
    return model, (torch.randn(16, 128), torch.randint(0, classes, (16,)))


def forward(model: nn.Module, batch: Batch) -> Any:
    """The images (or features) go in; the labels wait for the loss."""
    return model(batch[0])


def loss(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy against the labels."""
    return F.cross_entropy(output, batch[1])


MODELS: dict[str, Callable[[], tuple[nn.Module, Batch]]] = {
    "resnet18": resnet18,
    "bn-mlp": bn_mlp,
}
