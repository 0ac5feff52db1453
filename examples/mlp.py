"""A plain MLP classifier on flattened 96x96 RGB images (STL-10 sized): the simplest model file.

It shows the two names every model file needs and nothing else: ``model`` (an ``nn.Module``)
and ``sample`` (one batch, batch dimension first, here a single tensor). With no ``forward`` the
model is called as ``model(batch)``; with no ``loss`` the output is reduced to a scalar; the
optimizer is AdamW.

Run it with::

    maxbatch probe examples/mlp.py --memory 300MiB
"""

import torch
from torch import nn

torch.manual_seed(0)

IN_FEATURES = 3 * 96 * 96
CLASSES = 10

model = nn.Sequential(
    nn.Linear(IN_FEATURES, 32),
    nn.ReLU(),
    nn.Linear(32, 32),
    nn.ReLU(),
    nn.Linear(32, CLASSES),
)

# One batch of 32 flattened images, as a data loader would yield it.
sample = torch.randn(32, IN_FEATURES)
