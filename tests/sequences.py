"""A variable-length token data set with a padding collate, built in code (no downloads)."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

VOCAB = 50  # tests.models.TinyEncoder's vocabulary
LONGEST = 64


def lengths(n: int = 200, long: int = 3, seed: int = 0) -> list[int]:
    """Mostly short sequences (4 to 24 tokens) and ``long`` of the longest length, spread out."""
    rng = random.Random(seed)
    out = [rng.randint(4, 24) for _ in range(n)]
    for i in rng.sample(range(n), long):
        out[i] = LONGEST
    return out


class Sequences(Dataset[dict[str, torch.Tensor]]):
    """Item ``i``: ``lengths[i]`` random tokens (seeded by ``i``) and the next-token labels."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, VOCAB, (self.sizes[i] + 1,), generator=g)
        return {"input_ids": ids[:-1].clone(), "labels": ids[1:].clone()}


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Pad to the longest sequence of the batch: ids with 0, labels with -100 (ignored)."""
    return {
        "input_ids": pad_sequence([it["input_ids"] for it in items], batch_first=True),
        "labels": pad_sequence(
            [it["labels"] for it in items], batch_first=True, padding_value=-100
        ),
    }


def longest_batch(batch_size: int) -> dict[str, torch.Tensor]:
    """``make_batch`` at the longest length: what a user who knows the worst case would write."""
    return {
        "input_ids": torch.randint(1, VOCAB, (batch_size, LONGEST)),
        "labels": torch.randint(1, VOCAB, (batch_size, LONGEST)),
    }
