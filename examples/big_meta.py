"""A 13-billion-parameter decoder in bfloat16 (26 GB of parameters), built without memory.

``build_model()`` builds the model under ``torch.device("meta")``: its parameters have shapes and
dtypes but no storage, so loading this file takes no memory and a second, whatever the machine.
``maxbatch estimate`` runs the step on fake tensors, so it can answer for a model larger than this
machine's memory; ``maxbatch probe`` cannot run a model with no weights (load real weights for it).

Run it with::

    maxbatch estimate examples/big_meta.py --inference --memory 40GiB,80GiB --target cuda
    maxbatch estimate examples/big_meta.py --memory 80GiB --target cuda   # training: see why not
"""

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 32000
SEQ_LEN = 2048
D_MODEL = 8192
HEADS = 64
LAYERS = 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL, bias=False)
        self.out = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.up = nn.Linear(D_MODEL, 4 * D_MODEL, bias=False)
        self.down = nn.Linear(4 * D_MODEL, D_MODEL, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, HEADS, -1).transpose(1, 3).unbind(2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, D_MODEL))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model() -> nn.Module:
    # Under the meta device no parameter gets memory: 26 GB of weights cost nothing here.
    with torch.device("meta"):
        return Decoder().to(torch.bfloat16)


# One batch of 2 sequences of token ids (small and real: only its shapes and dtypes matter).
_tokens = torch.randint(0, VOCAB, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
sample = {"input_ids": _tokens[:, :-1].contiguous(), "labels": _tokens[:, 1:].contiguous()}


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"])


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, VOCAB), batch["labels"].reshape(-1))
