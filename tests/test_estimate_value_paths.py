"""A path the real step takes by tensor values, which the fake step cannot see, is named (issue 21).

transformers skips an all-ones attention mask by checking its values; on fake tensors it cannot,
so the fake step builds the mask and passes it to attention: the estimate says so, naming the
attention operation, and stays silent for a step that passes no mask.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maxbatch.estimate.estimate import estimate_batch_size

SDPA = "torch.nn.functional.scaled_dot_product_attention(attn_mask=...)"


class Attention(nn.Module):
    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.masked = masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x).view(x.shape[0], 2, -1, 8)
        mask = torch.ones(x.shape[0], 1, q.shape[2], q.shape[2], dtype=torch.bool)
        attn_mask = mask if self.masked else None
        return nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=attn_mask)


@pytest.mark.parametrize("masked", [True, False])
def test_an_attention_mask_on_fake_tensors_is_named(masked: bool) -> None:
    est = estimate_batch_size(Attention(masked), torch.randn(4, 8, 16), memory="4MiB")
    named = [n for n in est.notes if "attention mask" in n]
    if masked:
        assert len(named) == 1 and SDPA in named[0] and "all-ones mask" in named[0]
    else:
        assert named == []


@pytest.mark.slow
def test_bert_with_an_all_ones_mask_names_the_path_it_cannot_see() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 128, (4, 64))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}
    est = estimate_batch_size(model, batch, memory="16MiB")
    assert any("attention mask" in n and "scaled_dot_product" in n for n in est.notes)
