"""BucketBatchSampler under the Hugging Face Trainer: the documented subclass trains on its batches.

A tiny GPT-2 from a config (nothing downloaded). Under several processes Accelerate deals the
batches of a batch sampler to the processes itself: checked here with Accelerate's own
``BatchSamplerShard``, in one process, for two.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from sequences import Sequences, lengths, pad_collate
from torch.utils.data import DataLoader

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
accelerate_data = pytest.importorskip("accelerate.data_loader")

import maxbatch  # noqa: E402

pytestmark = pytest.mark.slow

PROFILE = maxbatch.BucketProfile(
    buckets=(
        maxbatch.Bucket(max_length=16, ceiling=24),
        maxbatch.Bucket(max_length=32, ceiling=10),
        maxbatch.Bucket(max_length=64, ceiling=3),
    )
)


class BucketTrainer(transformers.Trainer):
    """The README's recipe: the train DataLoader takes a bucket sampler over the data set."""

    def __init__(self, *args: Any, lengths: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lengths = lengths
        self.sampler: maxbatch.BucketBatchSampler | None = None
        self.sizes: list[tuple[int, int]] = []

    def get_train_dataloader(self) -> DataLoader[Any]:
        # Accelerate deals the batches to the processes itself: each process gets the whole epoch.
        self.sampler = maxbatch.BucketBatchSampler(
            self.lengths, PROFILE, seed=self.args.seed, num_replicas=1, rank=0
        )
        loader = DataLoader(
            self.train_dataset, batch_sampler=self.sampler, collate_fn=self.data_collator
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.sizes.append(tuple(inputs["input_ids"].shape))
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_the_trainer_trains_every_epoch_on_the_samplers_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    sizes = lengths(120)
    args = transformers.TrainingArguments(
        str(tmp_path),
        num_train_epochs=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = BucketTrainer(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=Sequences(sizes),
        data_collator=pad_collate,
        lengths=sizes,
    )
    trainer.train()
    assert trainer.sampler is not None
    steps = len(trainer.sampler)
    assert trainer.state.global_step == 2 * steps == len(trainer.sizes)
    assert sum(n for n, _ in trainer.sizes) == 2 * len(sizes)
    assert all(n <= PROFILE.batch_size_for(longest) for n, longest in trainer.sizes)
    assert trainer.sampler.epoch == 1  # the Trainer set the epoch through Accelerate
    epochs = [trainer.sizes[:steps], trainer.sizes[steps:]]
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("drop_last", [False, True])
def test_accelerate_deals_the_batches_evenly_to_two_processes(drop_last: bool) -> None:
    sizes = lengths(120)
    sampler = maxbatch.BucketBatchSampler(
        sizes, PROFILE, num_replicas=1, rank=0, drop_last=drop_last
    )
    shards = [
        accelerate_data.BatchSamplerShard(sampler, num_processes=2, process_index=p)
        for p in range(2)
    ]
    dealt = [list(s) for s in shards]
    assert len(dealt[0]) == len(dealt[1]) == len(shards[0])
    assert all(len(b) <= PROFILE.batch_size_for(max(sizes[i] for i in b)) for b in dealt[0])
    seen = Counter(i for batches in dealt for b in batches for i in b)
    if drop_last:
        assert max(seen.values()) == 1
    else:
        assert set(seen) == set(range(len(sizes)))
