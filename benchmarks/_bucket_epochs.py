"""Epochs over a long-tailed length distribution: bucket sampler, worst-case batch, token budget.

Three ways to batch the same data set of token sequences (lengths 8 to 512, most of them short)
for the same small language model, each trained for whole epochs inside
``maxbatch.virtual_device(cap)`` (real computation on the CPU, a real out-of-memory error past the
cap):

- ``sampler``: ``maxbatch.BucketBatchSampler`` over a bucket profile (each bucket's verified
  ceiling at its longest length);
- ``worst case``: one batch size for every batch, the ceiling at the longest length (what a
  single-number tuner answers for this data set), shuffled;
- ``token budget``: the hand-set ``max_tokens`` of fairseq-style batching, taken from the longest
  bucket (its batch size times its length): items sorted by length, each batch as many as keep
  ``items x longest length`` within the budget, the batches shuffled.

Columns: steps per epoch, the padding share of the padded tokens, samples per second over the
epoch (wall time of the training steps, one torch thread), out-of-memory errors (a batch that runs
out is skipped and counted), the peak against the cap, and the mean and range of the batch size
and of the tokens per step. ``benchmarks/buckets.py`` calls :func:`compare` with its own profile;
run alone it builds the profile by one ceiling search per bucket::

    python benchmarks/_bucket_epochs.py                # 2000 items, 1 epoch per strategy
    python benchmarks/_bucket_epochs.py --items 500 --epochs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

import maxbatch
from maxbatch.batchstats import batch_stats

VOCAB = 256
CAP = "24MiB"
UPPERS = (16, 32, 64, 128, 256, 512)
STRATEGIES = ("sampler", "worst case", "token budget")
Batches = list[list[int]]


class LM(nn.Module):
    """A one-layer transformer language model.

    With the math attention kernel (``attention="math"``) its memory grows with the length
    squared (the scores of every pair of tokens); with the fused kernel torch picks on the CPU
    (``"fused"``), linearly.
    """

    def __init__(self, d: int = 32, attention: str = "math") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, VOCAB)
        self.attention = attention

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        kernel = SDPBackend.MATH if self.attention == "math" else list(SDPBackend)
        with sdpa_kernel(kernel):
            logits = self.head(self.layer(self.embed(input_ids)))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss}


ATTENTION = "math"


def build_model() -> LM:
    torch.manual_seed(0)
    return LM(attention=ATTENTION)


def long_tailed(n: int, seed: int = 0) -> list[int]:
    """``n`` lengths from 8 to 512, most of them short (a Pareto tail, about 1 % at 512)."""
    rng = random.Random(seed)
    return [min(512, int(8 * rng.paretovariate(1.1))) for _ in range(n)]


class Tokens(Dataset[dict[str, torch.Tensor]]):
    """Item ``i``: ``lengths[i]`` random tokens (seeded by ``i``) and the next-token labels."""

    def __init__(self, lengths: Sequence[int]):
        self.lengths = list(lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, VOCAB, (self.lengths[i] + 1,), generator=g)
        return {"input_ids": ids[:-1].clone(), "labels": ids[1:].clone()}


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest item: ids with 0, labels with -100 (ignored by the loss)."""
    return {
        "input_ids": pad_sequence([it["input_ids"] for it in items], batch_first=True),
        "labels": pad_sequence(
            [it["labels"] for it in items], batch_first=True, padding_value=-100
        ),
    }


def at_length(length: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """``make_batch(batch_size)`` of items of ``length`` tokens."""

    def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, VOCAB, (batch_size, length))
        return {"input_ids": ids, "labels": ids.roll(-1, dims=1)}

    return make_batch


def search_profile(
    lengths: Sequence[int], cap: str, uppers: Sequence[int] = UPPERS
) -> maxbatch.BucketProfile:
    """A profile by one exact ceiling search per bucket, at the bucket's upper length."""
    buckets, low = [], 0
    for upper in uppers:
        result = maxbatch.find_batch_size(
            build_model(), at_length(upper), optimizer="adamw", memory=cap, profile=False
        )
        items = sum(low < n <= upper for n in lengths)
        buckets.append(
            maxbatch.Bucket(
                max_length=upper,
                min_length=low + 1,
                ceiling=result.ceiling,
                items=items,
                share=items / len(lengths),
            )
        )
        low = upper
    return maxbatch.BucketProfile(buckets=tuple(buckets))


def worst_case_batches(n: int, batch_size: int, epoch: int, seed: int = 0) -> Batches:
    """A shuffled epoch of ``n`` items in batches of ``batch_size``, as ``DataLoader`` makes it."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def token_budget_batches(lengths: Sequence[int], budget: int, epoch: int, seed: int = 0) -> Batches:
    """fairseq-style ``max_tokens`` batches: sorted by length, ``items x longest <= budget``."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    order.sort(key=lambda i: lengths[i])
    batches: Batches = []
    current: list[int] = []
    for i in order:  # ascending: the item added is the batch's longest
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One strategy's epochs: figures per epoch (the mean over epochs where they vary)."""

    strategy: str
    epochs: int
    steps: int
    padding_share: float
    samples_per_second: float
    oom_errors: int
    peak_share: float
    stats: dict[str, Any]


def train_epoch(batches: Batches, data: Tokens, cap: str) -> tuple[float, int, float]:
    """Train one epoch inside ``virtual_device(cap)``; a batch that runs out is skipped.

    Returns:
        Seconds of the steps, out-of-memory errors, and the peak over the capacity.
    """
    ooms = 0
    with maxbatch.virtual_device(cap) as dev:
        model = build_model()
        opt = torch.optim.AdamW(model.parameters())
        started = time.perf_counter()
        for indices in batches:
            failed = False
            try:
                opt.zero_grad(set_to_none=True)
                model(**pad_collate([data[i] for i in indices]))["loss"].backward()
                opt.step()
            except torch.OutOfMemoryError:
                failed = True  # counted outside the except block: no traceback kept alive
            ooms += failed
        seconds = time.perf_counter() - started
    return seconds, ooms, dev.peak_bytes / dev.capacity_bytes


def plans(
    profile: maxbatch.BucketProfile, lengths: Sequence[int], seed: int = 0
) -> dict[str, Callable[[int], Batches]]:
    """Each strategy's batches of an epoch."""
    sampler = maxbatch.BucketBatchSampler(lengths, profile, seed=seed)
    worst = profile.batch_size_for(max(lengths))
    budget = profile.buckets[-1].tokens_per_batch
    return {
        "sampler": lambda epoch: sampler.batches(epoch),
        "worst case": lambda epoch: worst_case_batches(len(lengths), worst, epoch, seed),
        "token budget": lambda epoch: token_budget_batches(lengths, budget, epoch, seed),
    }


def compare(
    profile: maxbatch.BucketProfile,
    lengths: Sequence[int],
    cap: str,
    *,
    epochs: int = 1,
    strategies: Sequence[str] = STRATEGIES,
) -> list[Row]:
    """Train ``epochs`` shuffled epochs of each strategy; the strategies alternate per epoch.

    Returns:
        One row per strategy.
    """
    data = Tokens(lengths)
    made = plans(profile, lengths)
    runs: dict[str, list[tuple[Batches, float, int, float]]] = {s: [] for s in strategies}
    for epoch in range(epochs):
        for name in strategies:
            batches = made[name](epoch)
            runs[name].append((batches, *train_epoch(batches, data, cap)))
    rows = []
    for name, done in runs.items():
        stats = batch_stats(done[0][0], lengths)
        samples = sum(len(batch) for batches, *_ in done for batch in batches)
        rows.append(
            Row(
                strategy=name,
                epochs=epochs,
                steps=round(statistics.mean(len(b) for b, *_ in done)),
                padding_share=statistics.mean(
                    batch_stats(b, lengths).padding_share for b, *_ in done
                ),
                samples_per_second=samples / sum(s for _, s, _, _ in done),
                oom_errors=sum(o for *_, o, _ in done),
                peak_share=max(p for *_, p in done),
                stats=stats.to_dict(),
            )
        )
    return rows


def render(rows: Sequence[Row]) -> list[str]:
    """The comparison as text lines, a header first."""
    lines = [
        f"{'strategy':<13} {'steps':>6} {'padding':>8} {'samples/s':>10} {'OOM':>4} "
        f"{'peak/cap':>8}  {'batch size mean [min-max]':<26} tokens/step mean [min-max]"
    ]
    for r in rows:
        s = r.stats
        lines.append(
            f"{r.strategy:<13} {r.steps:>6} {r.padding_share:>7.1%} {r.samples_per_second:>10.0f} "
            f"{r.oom_errors:>4} {r.peak_share:>8.1%}  "
            f"{s['mean_batch_size']:>7.1f} [{s['min_batch_size']}-{s['max_batch_size']}]"
            f"{'':<{16 - len(str(s['min_batch_size'])) - len(str(s['max_batch_size']))}}"
            f"{s['mean_tokens']:>7.0f} [{s['min_tokens']}-{s['max_tokens']}]"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="sequences (default 2000)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per strategy (default 1)")
    parser.add_argument("--cap", default=CAP, help=f"virtual device capacity (default {CAP})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = long_tailed(args.items)
    started = time.perf_counter()
    profile = search_profile(lengths, args.cap)
    print(
        f"{len(lengths)} sequences, lengths {min(lengths)} to {max(lengths)} (median "
        f"{statistics.median(lengths):.0f}), cap {args.cap}; profile by one ceiling search per "
        f"bucket in {time.perf_counter() - started:.1f} s:"
    )
    print("  " + ", ".join(f"<={b.max_length}: {b.ceiling}" for b in profile.buckets))
    for line in render(compare(profile, lengths, args.cap, epochs=args.epochs)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
