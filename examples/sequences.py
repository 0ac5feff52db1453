"""A language model over variable-length sequences: the worst case comes from the data set.

It shows ``dataset`` (a map-style ``torch.utils.data.Dataset``; a ``DataLoader`` works too) and
``collate_fn`` instead of ``sample``: maxbatch reads every item's size, builds each trial's batch
from the largest items, and pads them as training will. Most sequences here are short, a few are
long: a probe from the first batch would pick a size that runs out of memory when a long one comes.

Run it with::

    maxbatch probe examples/sequences.py --memory 64MiB
"""

import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

VOCAB = 1000
D_MODEL = 64


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = nn.TransformerEncoderLayer(
            D_MODEL, nhead=4, dim_feedforward=2 * D_MODEL, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)))


class Sequences(Dataset):
    """2000 token sequences: 95 % of 16 to 64 tokens, 5 % of up to 256 (seeded, no download)."""

    def __init__(self, n: int = 2000) -> None:
        rng = random.Random(0)
        self.lengths = [
            rng.randint(129, 256) if rng.random() < 0.05 else rng.randint(16, 64) for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(1, VOCAB, (self.lengths[i] + 1,), generator=g)
        return {"input_ids": tokens[:-1].clone(), "labels": tokens[1:].clone()}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyLM()


dataset = Sequences()


def collate_fn(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest sequence; padded labels are -100, which the loss ignores."""
    ids = [it["input_ids"] for it in items]
    labels = [it["labels"] for it in items]
    return {
        "input_ids": pad_sequence(ids, batch_first=True),
        "labels": pad_sequence(labels, batch_first=True, padding_value=-100),
    }


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"])


def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
