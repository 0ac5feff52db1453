"""Models whose memory grows with the input length, for the length-axis tests (no downloads).

``recurrent()``: a gated linear recurrence ``h[t] = h[t-1] + g[t] * x[t]``, run as a scan
(``cumsum``, as linear recurrent layers run in parallel), linear in the length; ``gru()``: a GRU
(on the CPU it runs step by step: thousands of operators per trial, slow under a counter).
``attention()``: one self-attention block written out
(softmax of ``q @ k.T``, the math kernel), quadratic in the length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 64


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.rnn = nn.GRU(16, 32, batch_first=True)
        self.out = nn.Linear(32, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(tokens))
        return nn.functional.cross_entropy(self.out(h).flatten(0, 1), tokens.flatten())


class Scan(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.gate = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, g = self.gate(self.emb(tokens)).chunk(2, dim=-1)
        h = torch.cumsum(torch.sigmoid(g) * x, dim=1)
        return nn.functional.cross_entropy(self.out(h).flatten(0, 1), tokens.flatten())


class Attention(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = x + scores @ v
        return nn.functional.cross_entropy(self.out(h).flatten(0, 1), tokens.flatten())


def recurrent() -> nn.Module:
    torch.manual_seed(0)
    return Scan()


def gru() -> nn.Module:
    torch.manual_seed(0)
    return Recurrent()


def attention() -> nn.Module:
    torch.manual_seed(0)
    return Attention()


def make_batch(batch_size: int, length: int) -> torch.Tensor:
    """Token ids of ``batch_size`` sequences of ``length``."""
    return torch.randint(0, VOCAB, (batch_size, length), generator=torch.Generator().manual_seed(0))


def loss_fn(output: Any, batch: Any) -> torch.Tensor:
    """The model returns its loss."""
    assert isinstance(output, torch.Tensor)
    return output
