"""Fit a LightningModule at the batch size maxbatch finds: the ``MaxBatch`` callback.

The module keeps its batch size in ``hparams.batch_size`` and builds its train dataloader from it,
as for Lightning's own ``BatchSizeFinder``. At fit start ``MaxBatch`` probes the module's own
``training_step`` and optimizer, sets ``hparams.batch_size`` and, for ``--global-batch``, the
trainer's ``accumulate_grad_batches``; then training runs at the new size.

Run it with (``--memory`` caps the virtual device, so the answer is the same on any machine)::

    python examples/integrations/lightning_fit.py --memory 4MiB --global-batch 4096
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maxbatch.integrations.lightning import MaxBatch


class Classifier(pl.LightningModule):
    """A small MLP classifier on random features; the batch size lives in ``hparams``."""

    def __init__(self, batch_size: int = 8, features: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(features, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, classes),
        )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[Any]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, self.hparams.features, generator=g)
        y = torch.randint(0, self.hparams.classes, (4096,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size, shuffle=True)


class BatchSizes(pl.Callback):
    """Records the size of every batch training runs on (the probe's steps are not training)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        self.sizes.append(len(batch[0]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="4MiB", help="virtual device capacity")
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--max-steps", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = Classifier()
    maxbatch = MaxBatch(memory=args.memory, global_batch=args.global_batch)
    seen = BatchSizes()
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        callbacks=[maxbatch, seen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(module)
    assert maxbatch.result is not None and maxbatch.plan is not None
    info = {
        "ceiling": maxbatch.result.ceiling,
        "batch_size": module.hparams.batch_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "probe_seconds": round(maxbatch.result.seconds, 2),
        "fit_seconds": round(time.perf_counter() - started, 2),
        "trained_batches": seen.sizes,
    }
    print(
        f"ceiling {info['ceiling']}, batch size {info['batch_size']} x "
        f"{info['accumulate_grad_batches']} accumulation steps; probe {info['probe_seconds']} s, "
        f"fit {info['fit_seconds']} s; trained on batches of {sorted(set(seen.sizes))}"
    )
    return info


if __name__ == "__main__":
    main()
