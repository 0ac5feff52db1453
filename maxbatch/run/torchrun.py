"""The command line under ``torchrun``: join the group it describes, pick the rank's device, leave.

Only :mod:`maxbatch.cli` uses this (the library takes a group the user initialised); the
agreement itself is :mod:`maxbatch.run.distributed`.
"""

from __future__ import annotations

import os

import torch

from maxbatch.devicekinds import kind_of
from maxbatch.errors import ConfigError
from maxbatch.run.distributed import is_distributed


def init_from_env() -> int:
    """Join the process group that ``torchrun`` describes in the environment; return the rank.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` but does not
    create the group: the command line does, with gloo on the CPU (and NCCL for CUDA tensors
    when CUDA is present). Without those variables, or when a group exists already, nothing is
    done.

    Returns:
        This process's rank (0 without a group).

    Raises:
        ConfigError: launched by torchrun on a torch build without torch.distributed.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_available():
        raise ConfigError("launched by torchrun, but this torch build has no torch.distributed")
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return int(dist.get_rank())


def rank_device(device: str | None) -> str | None:
    """The device a rank probes: under torchrun, ``cuda`` (or the default) is its local GPU."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or not is_distributed():
        return device
    # A kind with several devices, named without an index (``cuda``): this rank's own one.
    several = device is not None and ":" not in device and kind_of(device).indexed
    if several or (device is None and torch.cuda.is_available()):
        return f"cuda:{int(local)}"
    return device


def leave() -> None:
    """Destroy the default process group if there is one (the end of a torchrun command)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
