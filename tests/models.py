"""Small models built in code for the tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 8))
    return model, torch.randn(4, 32)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


def cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SmallCNN(), torch.randn(4, 3, 16, 16)


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 50)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.out(self.layer(self.emb(input_ids)))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def encoder() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 12))
    return TinyEncoder(), {"input_ids": ids, "labels": ids.roll(1, dims=1)}


class TinyGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.rnn = nn.GRU(16, 24, batch_first=True)
        self.out = nn.Linear(24, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(tokens))
        return self.out(h[:, -1])


def gru() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyGRU(), torch.randint(0, 40, (4, 10))


MODELS = {"mlp": mlp, "cnn": cnn, "encoder": encoder, "gru": gru}
