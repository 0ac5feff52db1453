"""Train a LightningModule on variable-length sequences with ``maxbatch.BucketBatchSampler``.

The ``LightningDataModule`` builds its train ``DataLoader`` with ``batch_sampler=`` a bucket
sampler over a profile of the model (``maxbatch.find_bucket_sizes``: one verified ceiling per
length bucket, at the bucket's longest sequence of the data set): short sequences come
in large batches, long ones in small batches, and each batch is as large as fits its longest
sequence. Lightning calls the sampler's ``set_epoch`` at each epoch, so every epoch is shuffled
anew. ``use_distributed_sampler=False`` tells Lightning to keep the batch sampler as it is (under
DDP the sampler deals the batches to the ranks itself, the same number to each).

Run it with (``--memory`` caps the virtual device the training runs in, so the answer is the same
on any machine)::

    python examples/integrations/lightning_buckets.py --memory 24MiB --epochs 2
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

import maxbatch

VOCAB = 256
BUCKETS = (32, 128, 512)


class Sequences(Dataset[dict[str, torch.Tensor]]):
    """Token sequences of 8 to 512 tokens, most of them short (seeded, no download)."""

    def __init__(self, n: int = 1000) -> None:
        rng = random.Random(0)
        self.lengths = [min(512, int(8 * rng.paretovariate(1.1))) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, VOCAB, (self.lengths[i] + 1,), generator=g)
        return {"input_ids": ids[:-1].clone(), "labels": ids[1:].clone()}


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest sequence; padded labels are -100, which the loss ignores."""
    return {
        "input_ids": pad_sequence([it["input_ids"] for it in items], batch_first=True),
        "labels": pad_sequence(
            [it["labels"] for it in items], batch_first=True, padding_value=-100
        ),
    }


class LanguageModel(pl.LightningModule):
    """A one-layer transformer; the loss is a mean over the real (not padded) tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, VOCAB)
        self.batch_sizes: list[int] = []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.layer(self.embed(input_ids)))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batch_sizes.append(len(batch["input_ids"]))
        return self(**batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class BucketedData(pl.LightningDataModule):
    """The train ``DataLoader`` batches by length bucket, at the profile's batch sizes."""

    def __init__(self, data: Sequences, profile: maxbatch.BucketProfile) -> None:
        super().__init__()
        self.data = data
        self.profile = profile
        self.sampler: maxbatch.BucketBatchSampler | None = None

    def train_dataloader(self) -> DataLoader[Any]:
        # Built here, not in __init__: under DDP the process group exists by now, and the
        # sampler reads the ranks from it.
        self.sampler = maxbatch.BucketBatchSampler(self.data.lengths, self.profile, seed=0)
        return DataLoader(self.data, batch_sampler=self.sampler, collate_fn=pad_collate)


def profile_buckets(data: Sequences, memory: str) -> maxbatch.BucketProfile:
    """The profile over the data set's lengths: one verified ceiling per bucket."""
    return maxbatch.find_bucket_sizes(
        LanguageModel(),
        data,
        buckets=BUCKETS,
        size_fn=lambda item: len(item["input_ids"]),
        collate_fn=pad_collate,
        forward_fn=lambda model, batch: model(**batch),
        loss_fn=lambda loss, batch: loss,
        optimizer="adamw",
        memory=memory,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="24MiB", help="virtual device capacity")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--items", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = Sequences(args.items)
    profile = profile_buckets(data, args.memory)
    module, datamodule = LanguageModel(), BucketedData(data, profile)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    with maxbatch.virtual_device(args.memory) as device:  # an OOM here would end the fit
        device.track(module)
        trainer.fit(module, datamodule=datamodule)
    assert datamodule.sampler is not None
    stats = datamodule.sampler.stats()
    info = {
        "ceilings": {b.max_length: b.ceiling for b in profile.buckets},
        "steps_per_epoch": len(datamodule.sampler),
        "worst_case_steps": -(-len(data) // profile.batch_size_for(max(data.lengths))),
        "epoch": datamodule.sampler.epoch,
        "batch_sizes": module.batch_sizes,
        "peak_share": device.peak_bytes / device.capacity_bytes,
        "fit_seconds": round(time.perf_counter() - started, 2),
        "stats": stats.to_dict(),
    }
    print(
        f"ceilings by bucket {info['ceilings']}: {info['steps_per_epoch']} steps an epoch "
        f"(worst-case batch: {info['worst_case_steps']}), batch size {stats.mean_batch_size:.1f} "
        f"[{stats.min_batch_size}-{stats.max_batch_size}], tokens per step {stats.mean_tokens:.0f} "
        f"[{stats.min_tokens}-{stats.max_tokens}]; peak {info['peak_share']:.0%} of the cap, "
        f"fit {info['fit_seconds']} s"
    )
    return info


if __name__ == "__main__":
    main()
