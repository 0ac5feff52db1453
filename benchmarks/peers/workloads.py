"""The benchmark's workloads: five small models, each with a sample batch and virtual-device caps.

Every workload builds a fresh, seeded model on each call, so each tool starts from the same
weights, and defines the one training step all tools run: ``forward(model, batch)``,
``loss(output, batch)``, backward, an AdamW step (:func:`train_step`). The models are small so
that a step takes milliseconds on one CPU thread; the caps put the ceilings between about 50 and
1,500 samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = Any


@dataclasses.dataclass(frozen=True)
class Spec:
    """One workload: how to build it, its step, and the caps it is measured at.

    Attributes:
        name: short name used in tables and on the command line.
        description: one line for the report.
        build: returns a fresh model (seeded) and a sample batch (batch dimension first).
        forward: ``forward(model, batch)``.
        loss: ``loss(output, batch)``, a scalar.
        caps: virtual-device caps of the full run.
        quick_caps: the caps of ``--quick`` (a subset of ``caps``).
    """

    name: str
    description: str
    build: Callable[[], tuple[nn.Module, Batch]]
    forward: Callable[[nn.Module, Batch], Any]
    loss: Callable[[Any, Batch], torch.Tensor]
    caps: tuple[str, ...]
    quick_caps: tuple[str, ...]


def train_step(
    spec: Spec, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch
) -> None:
    """One step as maxbatch's ``Workload.step`` runs it: zero grads, forward, loss, backward, step.

    Output and loss are dropped when the function returns, as at the end of maxbatch's step.
    """
    optimizer.zero_grad(set_to_none=True)
    output = spec.forward(model, batch)
    loss = spec.loss(output, batch)
    loss.backward()
    optimizer.step()


def adamw(parameters: Any) -> torch.optim.Optimizer:
    """The optimizer of every tool's step (maxbatch's default too)."""
    return torch.optim.AdamW(parameters)


# -- MLP: a float tensor and class labels ------------------------------------------------------


def _mlp() -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    return model, (torch.randn(16, 256), torch.randint(0, 10, (16,)))


def _first_input(model: nn.Module, batch: Batch) -> Any:
    return model(batch[0])


def _classify(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(output, batch[1])


# -- CNN with batch norm -----------------------------------------------------------------------


def _cnn() -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    model = nn.Sequential(
        block(3, 16),
        nn.MaxPool2d(2),
        block(16, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return model, (torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))


# -- Transformer encoder on float features -----------------------------------------------------


class Encoder(nn.Module):
    """Two pre-norm encoder layers over a sequence of float feature vectors, mean-pooled."""

    def __init__(self, features: int = 16, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.proj = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(
            width, 2, 64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)).mean(dim=1))


def _transformer() -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    return Encoder(), (torch.randn(8, 16, 16), torch.randint(0, 10, (8,)))


# -- Recurrent model on integer tokens ---------------------------------------------------------


class TokenGRU(nn.Module):
    """Embedding, one GRU layer, a classifier on the last hidden state."""

    def __init__(self, vocab: int = 500, width: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = nn.GRU(32, width, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(hidden[:, -1])


def _gru() -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    return TokenGRU(), (torch.randint(0, 500, (8, 48)), torch.randint(0, 4, (8,)))


# -- A model called with a dict: dense features, categorical ids, labels -> {"loss": ...} ------


class Tabular(nn.Module):
    """Dense features and embedded categorical columns; returns a dict with the loss."""

    def __init__(self, dense: int = 64, columns: int = 8, vocab: int = 1000) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, 32, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(dense + 32, 256), nn.ReLU(), nn.Linear(256, 1))
        self.columns = columns

    def forward(
        self, dense: torch.Tensor, categories: torch.Tensor, label: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        logit = self.mlp(torch.cat([dense, self.embed(categories)], dim=1)).squeeze(1)
        return {"loss": F.binary_cross_entropy_with_logits(logit, label), "logit": logit}


def _tabular() -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    sample = {
        "dense": torch.randn(16, 64),
        "categories": torch.randint(0, 1000, (16, 8)),
        "label": torch.randint(0, 2, (16,)).float(),
    }
    return Tabular(), sample


def _keywords(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
    return model(**batch)


def _output_loss(output: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    return output["loss"]


WORKLOADS: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        Spec(
            "mlp",
            "MLP 256-512-512-10, float input (16x256), cross-entropy",
            _mlp,
            _first_input,
            _classify,
            caps=("10MiB", "12MiB", "16MiB"),
            quick_caps=("10MiB", "12MiB"),
        ),
        Spec(
            "cnn",
            "CNN with batch norm, 3x16x16 images (batch of 8), cross-entropy",
            _cnn,
            _first_input,
            _classify,
            caps=("8MiB", "16MiB", "32MiB"),
            quick_caps=("8MiB", "16MiB"),
        ),
        Spec(
            "transformer",
            "2-layer pre-norm transformer encoder, width 32, 16x16 float sequences",
            _transformer,
            _first_input,
            _classify,
            caps=("4MiB", "8MiB", "16MiB"),
            quick_caps=("4MiB", "8MiB"),
        ),
        Spec(
            "gru",
            "embedding + GRU(64) on int64 tokens (8x48), classifier on the last state",
            _gru,
            _first_input,
            _classify,
            caps=("8MiB", "16MiB", "32MiB"),
            quick_caps=("8MiB", "16MiB"),
        ),
        Spec(
            "tabular-dict",
            "dict batch {dense, categories, label} -> model(**batch) returns {'loss', ...}",
            _tabular,
            _keywords,
            _output_loss,
            caps=("2MiB", "4MiB", "8MiB"),
            quick_caps=("2MiB", "4MiB"),
        ),
    )
}
