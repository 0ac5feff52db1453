"""Lightning's own loop as the judge: ``trainer.fit`` at a batch size inside ``virtual_device``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from judged import Case, loss_of
from torch.utils.data import DataLoader

import maxbatch

STEPS = 5  #: optimizer steps the judge trains for


class Judged(pl.LightningModule):
    def __init__(self, case: Case, batch_size: int, samples: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.net = case.model()
        self.data = case.data(samples)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return loss_of(self.net(**batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class Manual(Judged):
    """Manual optimization, clearing gradients after the step as many hand-written loops do."""

    def __init__(self, case: Case, batch_size: int, samples: int) -> None:
        super().__init__(case, batch_size, samples)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        self.manual_backward(loss_of(self.net(**batch)))
        opt.step()
        opt.zero_grad()


def trainer(
    *callbacks: pl.Callback, steps: int = STEPS, accumulate: int = 1, **kwargs: Any
) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def module(case: Case, batch_size: int, accumulate: int = 1, kind: type[Judged] = Judged) -> Judged:
    """The module with data for ``STEPS`` optimizer steps of ``accumulate`` full batches."""
    return kind(case, batch_size, batch_size * accumulate * STEPS)


def trains(
    case: Case, batch_size: int, accumulate: int = 1, kind: type[Judged] = Judged, **kwargs: Any
) -> bool:
    """Whether Lightning's own loop trains ``STEPS`` optimizer steps at ``batch_size``.

    The module (and its data set, host memory on an accelerator) is made outside the device;
    ``kwargs`` go to the ``Trainer`` (precision, gradient clipping).
    """
    m = module(case, batch_size, accumulate, kind)
    try:
        with maxbatch.virtual_device(case.cap) as device:
            device.track(m)
            t = trainer(accumulate=accumulate, **kwargs)
            t.fit(m)
    except torch.OutOfMemoryError:
        return False
    assert t.global_step == STEPS
    return True
