"""A two-process Trainer run on the CPU under torchrun with ``tune``: run by a test.

Each rank writes its row (what tune set and what training did) with ``rank_rows.write_row``.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from rank_rows import write_row  # noqa: E402
from sequences import Sequences, lengths, pad_collate  # noqa: E402
from test_integration_transformers import MEMORY, arguments, gpt2, transformers  # noqa: E402

from maxbatch.integrations.transformers import tune  # noqa: E402

GLOBAL_BATCH = 128

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as out:
        args = arguments(Path(out), max_steps=2)
        trainer = transformers.Trainer(
            model=gpt2(), args=args, train_dataset=Sequences(lengths()), data_collator=pad_collate
        )
        result = tune(trainer, global_batch=GLOBAL_BATCH, memory=MEMORY, profile=False)
        trainer.train()
    row = {
        "rank": args.process_index,
        "world_size": result.world_size,
        "ceiling": result.ceiling,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_step": trainer.state.global_step,
    }
    write_row(row)
