"""The Hugging Face Trainer's own loop as the judge: ``Trainer.train`` inside ``virtual_device``."""

from __future__ import annotations

import os
import tempfile
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
import transformers
from judged import CASES, Case

import maxbatch

STEPS = 5  #: optimizer steps the judge trains for


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


#: The MLP and the CNN with batch norm, and GPT-2, whose forward returns an output object.
HF_CASES = [*CASES[:2], Case("gpt2-output-object", gpt2, (32,), 16 << 20, 128, tokens=True)]


def arguments(batch_size: int = 2, accumulate: int = 1, steps: int = STEPS) -> Any:
    return transformers.TrainingArguments(
        tempfile.mkdtemp(prefix="maxbatch-judge-"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )


def trainer(case: Case, batch_size: int = 2, accumulate: int = 1, **kwargs: Any) -> Any:
    """A Trainer over a fresh model, with data for ``STEPS`` optimizer steps."""
    return transformers.Trainer(
        model=case.model(),
        args=arguments(batch_size, accumulate),
        train_dataset=case.data(batch_size * accumulate * STEPS),
        **kwargs,
    )


def trains(case: Case, batch_size: int, accumulate: int = 1) -> bool:
    """Whether the Trainer's own loop trains ``STEPS`` optimizer steps at ``batch_size``."""
    t = trainer(case, batch_size, accumulate)
    try:
        with maxbatch.virtual_device(case.cap) as device:
            device.track(t.model)
            t.train()
    except torch.OutOfMemoryError:
        return False
    assert t.state.global_step == STEPS
    return True
