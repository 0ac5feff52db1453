"""The Lightning callback, with the real ``lightning`` package on the CPU and the virtual device."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from models import TinyEncoder  # noqa: E402
from rank_rows import rank_rows  # noqa: E402
from sequences import LONGEST, Sequences, lengths, pad_collate  # noqa: E402

import maxbatch  # noqa: E402
from maxbatch import ConfigError  # noqa: E402
from maxbatch.integrations.lightning import MaxBatch  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "integrations" / "lightning_fit.py"
MEMORY = "4MiB"


def dataset(n: int = 4096) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g))


class Net(pl.LightningModule):
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        self.data = dataset()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)


class Watch(pl.Callback):
    """Runs after MaxBatch: checks the module's state at fit start, records the trained batches."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.initial = {k: v.clone() for k, v in module.state_dict().items()}
        self.untouched: bool | None = None
        self.sizes: list[int] = []

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        same = all(torch.equal(self.initial[k], v) for k, v in module.state_dict().items())
        no_grads = all(p.grad is None for p in module.parameters())
        no_state = not any(opt.state for opt in trainer.optimizers)
        self.untouched = same and no_grads and no_state

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, i: int) -> None:
        self.sizes.append(len(batch[0]))


def trainer(*callbacks: pl.Callback, steps: int = 3, precision: str = "32-true") -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision=precision,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_fit_trains_at_the_ceiling_and_restores_the_module() -> None:
    module = Net()
    tuner, watch = MaxBatch(memory=MEMORY, profile=False), Watch(module)
    t = trainer(tuner, watch)
    t.fit(module)
    assert tuner.result is not None and tuner.plan is not None
    result = tuner.result
    assert result.virtual and result.optimizer == "AdamW"
    fits = {tr.batch_size for tr in result.trials if tr.fits}
    fails = {tr.batch_size for tr in result.trials if not tr.fits}
    assert result.ceiling in fits and result.ceiling + 1 in fails
    assert module.hparams.batch_size == result.ceiling == tuner.plan.batch_size
    assert t.accumulate_grad_batches == 1
    assert watch.untouched is True
    assert watch.sizes == [result.ceiling] * 3
    assert "train_loss" in t.callback_metrics


def test_the_ceiling_is_the_ceiling_of_real_training() -> None:
    tuner = MaxBatch(memory=MEMORY, profile=False)
    trainer(tuner, steps=1).fit(Net())
    assert tuner.result is not None
    ceiling = tuner.result.ceiling
    # Lightning's own loop, at the ceiling and one above, on a device of the probe's capacity
    # (the data set is made outside: on a GPU it would be host memory).
    module = Net(batch_size=ceiling)
    with maxbatch.virtual_device(MEMORY) as device:
        device.track(module)
        trainer(steps=3).fit(module)
    module = Net(batch_size=ceiling + 1)
    with pytest.raises(torch.OutOfMemoryError), maxbatch.virtual_device(MEMORY) as device:
        device.track(module)
        trainer(steps=3).fit(module)


def test_global_batch_sets_accumulation() -> None:
    module = Net()
    tuner, watch = MaxBatch(memory=MEMORY, profile=False, global_batch=4096), Watch(module)
    t = trainer(tuner, watch, steps=2)
    t.fit(module)
    assert tuner.result is not None and tuner.plan is not None
    assert tuner.plan.batch_size * tuner.plan.accumulation_steps == 4096
    assert tuner.plan.accumulation_steps > 1 and tuner.plan.batch_size <= tuner.result.ceiling
    assert t.accumulate_grad_batches == tuner.plan.accumulation_steps
    assert module.hparams.batch_size == tuner.plan.batch_size
    # Two optimizer steps of 4096 samples: 2 x accumulation batches of the micro-batch.
    assert watch.sizes == [tuner.plan.batch_size] * (2 * tuner.plan.accumulation_steps)


class Tokens(pl.LightningModule):
    """Variable-length sequences (mostly short, three of the longest length), padded per batch."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = TinyEncoder()
        self.data = Sequences(lengths())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.net(**batch)["loss"]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters())

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(
            self.data, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=pad_collate
        )


def test_the_worst_case_of_the_train_data_survives_an_epoch() -> None:
    capacity = 2_000_000
    module = Tokens()
    tuner = MaxBatch(memory=capacity, profile=False)
    trainer(tuner, steps=1).fit(module)
    assert tuner.result is not None and tuner.result.data is not None
    # The probe's batches were the longest sequences, padded as the loader pads them.
    longest = [i for i, n in enumerate(module.data.sizes) if n == LONGEST]
    assert sorted(tuner.result.data.indices[:3]) == longest
    # A whole shuffled epoch at the ceiling, on a device of the probe's capacity.
    module = Tokens(batch_size=tuner.result.ceiling)
    with maxbatch.virtual_device(capacity) as device:
        device.track(module)
        pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module)
    assert module.trainer.fit_loop.epoch_progress.current.completed == 1


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 2

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(dataset(512), batch_size=self.batch_size)


class NoBatchSize(Net):
    def __init__(self) -> None:
        super().__init__()
        del self.hparams["batch_size"]

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(dataset(512), batch_size=8)


def test_the_batch_size_of_a_datamodule_is_set() -> None:
    module, data = NoBatchSize(), Data()
    tuner = MaxBatch(memory=MEMORY, profile=False, max_batch_size=64)
    trainer(tuner, steps=1).fit(module, datamodule=data)
    assert tuner.result is not None
    assert data.batch_size == tuner.result.ceiling == 64


class Manual(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        opt.step()


def test_manual_optimization_probes_the_modules_own_step() -> None:
    module = Manual()
    tuner, watch = MaxBatch(memory=MEMORY, profile=False), Watch(module)
    trainer(tuner, watch, steps=2).fit(module)
    assert tuner.result is not None and watch.untouched is True
    assert watch.sizes == [tuner.result.ceiling] * 2


class TwoOptimizers(Manual):
    """Manual optimization with an optimizer per layer (as a GAN has one per network)."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        first, last = self.net[0], self.net[2]
        return [torch.optim.AdamW(first.parameters()), torch.optim.Adam(last.parameters())]


def test_every_optimizer_is_restored() -> None:
    module = TwoOptimizers()
    tuner, watch = MaxBatch(memory=MEMORY, profile=False), Watch(module)
    trainer(tuner, watch, steps=4).fit(module)  # Lightning counts the steps of both optimizers
    assert tuner.result is not None and watch.untouched is True
    assert watch.sizes == [tuner.result.ceiling] * 2


def test_mistakes_are_named() -> None:
    with pytest.raises(ConfigError, match="loss_fn=.*valid options: .*memory"):
        MaxBatch(loss_fn=None)
    with pytest.raises(ConfigError, match="global_batch=0"):
        MaxBatch(global_batch=0)
    with pytest.raises(ConfigError, match="no 'batch_size'"):
        trainer(MaxBatch(memory=MEMORY)).fit(NoBatchSize())
    with pytest.raises(ConfigError, match="one train DataLoader; .* returned a list"):
        two = Net()
        loader = two.train_dataloader()
        two.train_dataloader = lambda: [loader, loader]  # type: ignore[method-assign]
        trainer(MaxBatch(memory=MEMORY)).fit(two)
    with pytest.raises(ConfigError, match="passed to fit"):
        trainer(MaxBatch(memory=MEMORY)).fit(Net(), train_dataloaders=DataLoader(dataset(64)))


def test_the_example_trains_at_the_size_it_finds() -> None:
    spec = importlib.util.spec_from_file_location("lightning_fit_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    info = example.main(["--memory", MEMORY, "--global-batch", "2048", "--max-steps", "1"])
    assert info["batch_size"] * info["accumulate_grad_batches"] == 2048
    assert info["batch_size"] <= info["ceiling"]
    assert info["trained_batches"] == [info["batch_size"]] * info["accumulate_grad_batches"]


def test_mixed_precision_is_the_trainers() -> None:
    ceilings = {}
    for precision in ("32-true", "bf16-mixed"):
        tuner = MaxBatch(memory=MEMORY, profile=False)
        trainer(tuner, steps=1, precision=precision).fit(Net())
        assert tuner.result is not None
        ceilings[precision] = tuner.result.ceiling
    # Under autocast the activations the backward keeps are bf16: more samples fit.
    assert ceilings["bf16-mixed"] > ceilings["32-true"]


def test_the_standalone_pytorch_lightning_package() -> None:
    ptl = pytest.importorskip("pytorch_lightning")

    class Module(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 4
            self.net = nn.Linear(64, 10)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(dataset(), batch_size=self.batch_size)

    module, tuner = Module(), MaxBatch(memory="2MiB", profile=False)
    ptl.Trainer(
        max_steps=1,
        accelerator="cpu",
        callbacks=[tuner],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    ).fit(module)
    assert tuner.result is not None and module.batch_size == tuner.result.ceiling


@pytest.mark.slow
def test_ddp_ranks_agree_and_keep_the_global_batch() -> None:
    rows = rank_rows("tests/lightning_ddp.py")
    assert [row["rank"] for row in rows] == [0, 1]
    first, second = rows
    assert first["world_size"] == 2 and first["ceiling"] == second["ceiling"]
    for row in rows:
        assert row["untouched"] is True
        assert row["batch_size"] == first["batch_size"] <= row["ceiling"]
        # 4096 samples per optimizer step = micro-batch x 2 ranks x accumulation.
        assert row["batch_size"] * 2 * row["accumulate_grad_batches"] == 4096
        assert row["sizes"] == [row["batch_size"]] * (2 * row["accumulate_grad_batches"])
