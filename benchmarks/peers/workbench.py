"""The benchmarks' shared bench: one model's step, run on a virtual device as maxbatch runs it.

Used by ``probe_trials.py`` and by the peer comparison's reference answers (:mod:`.truth`), so
both scan with maxbatch's own trial. Part of the ``peers`` package so that the package imports
nothing from the top-level scripts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from collections.abc import Callable, Iterator
from typing import Any

import torch

import maxbatch
from maxbatch.devices.device import describe
from maxbatch.results import Trial
from maxbatch.search.meter import CountingMeter
from maxbatch.search.trial import run_trial
from maxbatch.step.oom import release_memory
from maxbatch.step.spec import StepSpec
from maxbatch.step.workload import build_workload

from .workloads import adamw

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclasses.dataclass(frozen=True)
class Workbench:
    """One model with everything needed to build its step (what a model file defines)."""

    name: str
    model: torch.nn.Module
    sample: Any  # a sample batch, or make_batch(batch_size)
    optimizer: OptimizerFactory = adamw
    forward_fn: Callable[[torch.nn.Module, Any], Any] | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    train_step: Callable[..., Any] | None = None


@contextlib.contextmanager
def virtual_device(bench: Workbench, cap_bytes: int) -> Iterator[Callable[[int], Trial]]:
    """Yield ``run(b) -> Trial`` on a virtual device of ``cap_bytes``, set up as maxbatch does.

    A fresh optimizer is built; the model and optimizer state, training flags and RNG states are
    restored on leaving, as ``find_batch_size`` restores them.
    """
    model = bench.model
    device = next(model.parameters()).device
    step = StepSpec.build(
        model,
        bench.sample,
        optimizer=bench.optimizer,
        forward_fn=bench.forward_fn,
        loss_fn=bench.loss_fn,
        train_step=bench.train_step,
    )
    try:
        with CountingMeter(device) as meter, build_workload(step, device) as workload:
            meter.set_usable(cap_bytes)
            yield lambda b: run_trial(workload, meter, b)
    finally:
        release_memory(device, full=True)  # as find_batch_size does at the end


def machine() -> dict[str, Any]:
    """The machine and software the figures were taken on."""
    return {
        "cpu": describe(torch.device("cpu")).name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "maxbatch": maxbatch.__version__,
    }
