"""A model file for torchrun: under a process group the model is wrapped in DDP, as in training.

Each rank probes its own device (``cuda:LOCAL_RANK`` on GPUs, else the CPU with gloo), the ranks
agree on every trial, and rank 0 prints one answer with the world size and the global batch::

    torchrun --nproc-per-node 2 -m maxbatch probe examples/ddp.py --memory 64MiB

Alone (``maxbatch probe examples/ddp.py``) the same file gives the plain model.
"""

import os

import torch
import torch.distributed as dist
from torch import nn


def build_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))
    if not (dist.is_available() and dist.is_initialized()):
        return net
    if torch.cuda.is_available():  # DDP wants the module on its device before wrapping
        net.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    return nn.parallel.DistributedDataParallel(net)


# One batch of 16 feature vectors, as a data loader would yield it.
sample = torch.randn(16, 512)
