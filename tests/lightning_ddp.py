"""A two-process Lightning DDP fit on the CPU with MaxBatch: run as a script by a test.

Lightning's ``ddp`` strategy starts the second rank by running this script again; each rank writes
its row (what it was set to) with ``rank_rows.write_row``.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402
from rank_rows import write_row  # noqa: E402
from test_integration_lightning import MEMORY, Net, Watch  # noqa: E402

from maxbatch.integrations.lightning import MaxBatch  # noqa: E402

GLOBAL_BATCH = 4096

if __name__ == "__main__":
    module = Net()
    tuner, watch = MaxBatch(memory=MEMORY, profile=False, global_batch=GLOBAL_BATCH), Watch(module)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[tuner, watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    assert tuner.result is not None and tuner.plan is not None
    row = {
        "rank": trainer.global_rank,
        "world_size": tuner.result.world_size,
        "ceiling": tuner.result.ceiling,
        "batch_size": module.hparams.batch_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "untouched": watch.untouched,
        "sizes": watch.sizes,
    }
    write_row(row)
