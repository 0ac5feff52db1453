"""Train a tiny GPT-2 with the Hugging Face Trainer at the batch size maxbatch finds: ``tune``.

The model is built from a config (random weights, nothing downloaded) and trained on random
token sequences. ``tune(trainer, global_batch=...)`` probes the Trainer's own training step (its
optimizer and scheduler, its data collator, its mixed precision) and sets
``args.per_device_train_batch_size`` and ``args.gradient_accumulation_steps``; ``trainer.train()``
then runs at that size.

Run it with (``--memory`` caps the virtual device, so the answer is the same on any machine)::

    HF_HUB_OFFLINE=1 python examples/integrations/hf_trainer.py --memory 64MiB --global-batch 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from maxbatch.integrations.transformers import tune


class RandomText(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences; the labels are the inputs (the model shifts them itself)."""

    def __init__(self, size: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (size, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(output_dir: str, max_steps: int) -> Trainer:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    args = TrainingArguments(
        output_dir,
        per_device_train_batch_size=8,
        max_steps=max_steps,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=RandomText(1024, 64, 256)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="64MiB", help="virtual device capacity")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=2)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer = build(out, opts.max_steps)
        result = tune(trainer, global_batch=opts.global_batch, memory=opts.memory)
        started = time.perf_counter()
        trainer.train()
        info = {
            "ceiling": result.ceiling,
            "pick": result.batch_size,
            "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
            "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
            "probe_seconds": round(result.seconds, 2),
            "train_seconds": round(time.perf_counter() - started, 2),
            "global_step": trainer.state.global_step,
        }
    print(
        f"ceiling {info['ceiling']}, pick {info['pick']}: per_device_train_batch_size "
        f"{info['per_device_train_batch_size']} x gradient_accumulation_steps "
        f"{info['gradient_accumulation_steps']}; probe {info['probe_seconds']} s, "
        f"{info['global_step']} steps in {info['train_seconds']} s"
    )
    return info


if __name__ == "__main__":
    main()
