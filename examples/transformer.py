"""A small transformer encoder language model over int64 token ids, with a dict sample.

It shows ``build_model()`` instead of ``model``; a dict sample
``{"input_ids": ..., "labels": ...}`` as a tokenizer and collator would produce it;
``forward(model, batch)`` to pick the model's input out of the dict (the default would call
``model(**batch)``); ``loss(output, batch)`` with the labels; and ``optimizer(parameters)`` for the
optimizer the training script really uses.

Run it with::

    maxbatch probe examples/transformer.py --memory 300MiB
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 1000
SEQ_LEN = 32
D_MODEL = 128


class TinyEncoder(nn.Module):
    def __init__(self, vocab: int = VOCAB, d_model: int = D_MODEL, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.zeros(SEQ_LEN, d_model))
        # No dropout, as in many current language models; it would add a mask per activation.
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        return self.head(self.encoder(hidden))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyEncoder()


# One batch of 8 sequences: the labels are the inputs shifted by one token.
_tokens = torch.randint(0, VOCAB, (8, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
sample = {"input_ids": _tokens[:, :-1].contiguous(), "labels": _tokens[:, 1:].contiguous()}


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"])


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, VOCAB), batch["labels"].reshape(-1))


def optimizer(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=3e-4, weight_decay=0.1)
