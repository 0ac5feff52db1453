"""A small convolutional classifier with batch norm on 3x32x32 images.

It shows a tuple sample ``(images, labels)`` with int64 class labels, and a ``loss(output, batch)``
that uses those labels: the model is called as ``model(images, labels)`` unless ``forward`` says
otherwise, so ``forward`` passes only the images. Batch norm in training mode rejects a batch of one
sample, which is why maxbatch starts its search at the sample's own batch size.

Run it with::

    maxbatch probe examples/cnn.py --memory 300MiB
"""

import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)

CLASSES = 10


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


model = nn.Sequential(
    _block(3, 16),
    _block(16, 32),
    nn.MaxPool2d(2),  # 16x16
    _block(32, 64),
    nn.MaxPool2d(2),  # 8x8
    _block(64, 128),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(128, CLASSES),
)

# One batch of 16 images with their class labels.
sample = (torch.randn(16, 3, 32, 32), torch.randint(0, CLASSES, (16,)))


def forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, _labels = batch
    return model(images)


def loss(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _images, labels = batch
    return F.cross_entropy(output, labels)
