"""The Hugging Face Trainer integration, with real tiny GPT-2 and BERT models built from configs.

Nothing is downloaded (HF_HUB_OFFLINE=1); the virtual device makes the ceilings deterministic.
Importing transformers takes seconds, hence the slow marker.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from rank_rows import rank_rows  # noqa: E402
from sequences import LONGEST, Sequences, lengths, pad_collate  # noqa: E402

import maxbatch  # noqa: E402
from maxbatch import ConfigError  # noqa: E402
from maxbatch.integrations.transformers import MaxBatchCallback, tune  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "integrations" / "hf_trainer.py"
MEMORY = "16MiB"


class Tokens(torch.utils.data.Dataset[dict[str, Any]]):
    """Random sequences with a label per sequence and a column no model accepts."""

    def __init__(self, size: int = 256, length: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (size, length), generator=g)
        self.labels = torch.randint(0, 2, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "label": self.labels[i]}


class LMTokens(Tokens):
    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "note": "not a model input"}


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertForSequenceClassification(config)


def arguments(tmp_path: Path, max_steps: int = 1, bf16: bool = False) -> Any:
    return transformers.TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=max_steps,  # -1: num_train_epochs (1)
        num_train_epochs=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        bf16=bf16,
    )


def record_batches(model: torch.nn.Module) -> list[int]:
    sizes: list[int] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        sizes.append(kwargs["input_ids"].shape[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return sizes


def test_tune_sets_the_arguments_and_training_runs_at_them(tmp_path: Path) -> None:
    model = gpt2()
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path), train_dataset=LMTokens())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    result = tune(trainer, global_batch=256, memory=MEMORY, profile=False)
    args = trainer.args
    fits = {t.batch_size for t in result.trials if t.fits}
    assert result.ceiling in fits and result.ceiling + 1 not in fits
    assert result.optimizer == "AdamW"
    assert args.per_device_train_batch_size <= result.ceiling < 256
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 256
    # The model is as it was; the optimizer and scheduler of the probe are gone, so train()
    # creates them for its own number of steps.
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert trainer.optimizer is None and trainer.lr_scheduler is None
    sizes = record_batches(model)
    trainer.train()
    assert trainer.state.global_step == 1
    assert sizes == [args.per_device_train_batch_size] * args.gradient_accumulation_steps


def test_the_ceiling_is_the_ceiling_of_the_trainers_loop(tmp_path: Path) -> None:
    trainer = transformers.Trainer(model=gpt2(), args=arguments(tmp_path), train_dataset=LMTokens())
    ceiling = tune(trainer, memory=MEMORY, profile=False).ceiling

    def train_at(batch_size: int) -> None:
        model, args = gpt2(), arguments(tmp_path, max_steps=2)
        args.per_device_train_batch_size = batch_size
        fresh = transformers.Trainer(model=model, args=args, train_dataset=LMTokens())
        with maxbatch.virtual_device(MEMORY) as device:
            device.track(model)
            fresh.train()

    # A fresh Trainer's own loop, on a device of the probe's capacity. On the CPU the loop also
    # holds the next input batch (accelerate's loader fetches one ahead; on CUDA it stays in host
    # memory), which the probe leaves out: here it fits in what the ceiling leaves free.
    train_at(ceiling)
    with pytest.raises(torch.OutOfMemoryError):
        train_at(ceiling + 1)


def test_the_worst_case_of_the_train_data_survives_an_epoch(tmp_path: Path) -> None:
    model, data = gpt2(), Sequences(lengths())  # mostly short, three of 64 tokens
    args = arguments(tmp_path, max_steps=-1)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, data_collator=pad_collate
    )
    result = tune(trainer, memory=MEMORY, profile=False)
    assert result.data is not None
    longest = [i for i, n in enumerate(data.sizes) if n == LONGEST]
    assert sorted(result.data.indices[:3]) == longest
    assert args.per_device_train_batch_size == result.ceiling
    # One whole shuffled epoch at the ceiling, on a device of the probe's capacity.
    with maxbatch.virtual_device(MEMORY) as device:
        device.track(model)
        trainer.train()
    assert trainer.state.epoch == 1


def test_the_callback_tunes_when_the_trainer_is_built(tmp_path: Path) -> None:
    model = bert()
    callback = MaxBatchCallback(memory=MEMORY, profile=False)
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=2),
        train_dataset=Tokens(),
        callbacks=[callback],
    )
    assert callback.result is not None
    assert trainer.args.per_device_train_batch_size == callback.result.ceiling
    assert trainer.args.gradient_accumulation_steps == 1
    sizes = record_batches(model)
    # The Trainer's own loop at the ceiling fits on a device of the probe's capacity.
    with maxbatch.virtual_device(MEMORY) as device:
        device.track(model)
        trainer.train()
    assert sizes == [callback.result.ceiling] * 2


def test_a_given_optimizer_and_scheduler_are_left_as_they_were(tmp_path: Path) -> None:
    model = gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=LMTokens(),
        optimizers=(optimizer, scheduler),
    )
    result = tune(trainer, memory=MEMORY, profile=False)
    assert result.optimizer == "SGD"
    assert trainer.optimizer is optimizer and trainer.lr_scheduler is scheduler
    assert not optimizer.state and optimizer.param_groups[0]["lr"] == 0.1
    assert scheduler.last_epoch == 0 and scheduler.get_last_lr() == [0.1]


def test_mixed_precision_is_the_trainers(tmp_path: Path) -> None:
    ceilings = {}
    for bf16 in (False, True):
        trainer = transformers.Trainer(
            model=gpt2(), args=arguments(tmp_path, bf16=bf16), train_dataset=LMTokens()
        )
        ceilings[bf16] = tune(trainer, memory=MEMORY, profile=False).ceiling
    # Under the Trainer's bf16 autocast the activations kept for the backward are bf16.
    assert ceilings[True] > ceilings[False]


def test_mistakes_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_step="):
        MaxBatchCallback(train_step=None)
    trainer = transformers.Trainer(model=gpt2(), args=arguments(tmp_path), train_dataset=LMTokens())
    with pytest.raises(ConfigError, match="global_batch=0 must be a positive integer"):
        tune(trainer, global_batch=0)
    with pytest.raises(ConfigError, match="headroom="):
        tune(trainer, memory=MEMORY, headroom="a lot")
    assert trainer.optimizer is None and trainer.args.per_device_train_batch_size == 2


def test_a_callback_added_after_construction_warns(tmp_path: Path) -> None:
    trainer = transformers.Trainer(model=gpt2(), args=arguments(tmp_path), train_dataset=LMTokens())
    trainer.add_callback(MaxBatchCallback(memory=MEMORY))
    with pytest.warns(UserWarning, match="did not tune this Trainer"):
        trainer.train()


def test_the_example_trains_at_the_size_it_finds() -> None:
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    info = example.main(["--memory", "64MiB", "--global-batch", "64", "--max-steps", "1"])
    assert info["per_device_train_batch_size"] * info["gradient_accumulation_steps"] == 64
    assert info["per_device_train_batch_size"] <= info["ceiling"]
    assert info["global_step"] == 1


@pytest.mark.slow
def test_torchrun_ranks_agree_and_keep_the_global_batch() -> None:
    rows = rank_rows("-m", "torch.distributed.run", "--nproc-per-node", "2", "tests/hf_ddp.py")
    assert [row["rank"] for row in rows] == [0, 1]
    first, second = rows
    assert first["world_size"] == 2 and first["ceiling"] == second["ceiling"]
    for row in rows:
        micro, steps = row["per_device_train_batch_size"], row["gradient_accumulation_steps"]
        assert micro == first["per_device_train_batch_size"] and micro <= row["ceiling"]
        assert micro * 2 * steps == 128  # per device x ranks x accumulation
        assert row["global_step"] == 2
