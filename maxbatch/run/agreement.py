"""The parts of the ranks' agreement that need no process group of their own.

What a rank sends of its trial and the trial the ranks agree on (:mod:`maxbatch.run.distributed`
exchanges them), whether a group is initialised, its timeout, and a DDP step without collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
from collections.abc import Iterator, Sequence

import torch

from maxbatch.devices.device import local_shard
from maxbatch.memtrace import MemoryTrace
from maxbatch.results import Trial

#: Timeout of the agreement's collectives when the default group does not say its own.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class Kind(float, enum.Enum):
    """What an exchange is about: peers must be at the same kind of exchange."""

    PLAN = 1.0
    TRIAL = 2.0
    TIMING = 3.0
    CLOCK = 4.0
    DONE = 5.0


#: Row layout: kind, failed, then the payload.
HEADER = 2
WIDTH = 16


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is initialised."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def group_timeout() -> datetime.timedelta:
    """The default group's own timeout (``init_process_group(timeout=...)``), if it says one."""
    dist = torch.distributed
    try:
        group = dist.distributed_c10d._get_default_group()
        backend = group._get_backend(torch.device("cpu"))
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, datetime.timedelta) else DEFAULT_TIMEOUT


@contextlib.contextmanager
def quiet_ddp(model: torch.nn.Module) -> Iterator[None]:
    """Run a DDP model's trial steps without its collectives; restored afterwards.

    During a trial one rank can run out of memory while the others go on: a gradient
    all-reduce or buffer broadcast inside the step would then wait for it forever. Under
    ``no_sync()`` (and without the buffer broadcast) the step's memory is the same (DDP's
    gradient buckets were allocated when it was built) and no rank waits for another.
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    if not isinstance(model, ddp):
        yield
        return
    buffers = model.forward_sync_buffers
    model.forward_sync_buffers = False
    try:
        with model.no_sync():
            yield
    finally:
        model.forward_sync_buffers = buffers


def sharded_note(model: torch.nn.Module) -> str | None:
    """What to know about a model with ``DTensor`` parameters (FSDP2), or None without them."""
    if not any(local_shard(p) is not p for p in model.parameters()):
        return None
    return (
        "FSDP (DTensor) parameters: each rank's shard is counted, but the probe does not put "
        "them back exactly (a trial that runs out of memory inside FSDP's forward leaves the "
        "modules unsharded); probe before loading weights, or rebuild the model afterwards"
    )


def trial_row(trial: Trial, usable: int) -> tuple[float, ...]:
    """What a rank sends of its trial: its margin to its own usable bytes, not its peak."""

    def maybe(value: int | None) -> float:
        return -1.0 if value is None else float(value)

    return (
        float(trial.batch_size),
        float(trial.fits),
        float(trial.oom),
        float(trial.peak_bytes - usable),
        float(usable),
        trial.seconds,
        maybe(trial.state_bytes),
        maybe(trial.reserved_bytes),
        maybe(trial.alloc_retries),
    )


def agreed_trial(
    b: int, rows: torch.Tensor, traces: Sequence[MemoryTrace | None] = (), *, steps: int = 2
) -> Trial:
    """The trial every rank agrees on: it fits where it fit on all, at the tightest margin.

    The trace is the binding rank's (the largest peak over its usable bytes), its live bytes
    moved by the same margin, so that a trace prediction against the smallest usable bytes is
    the binding rank's own.

    Returns:
        The agreed trial.
    """

    def most(column: int) -> int | None:
        value = int(rows[:, column].max())
        return None if value < 0 else value

    low = int(rows[:, 4].min())
    binding = int(torch.argmax(rows[:, 3]))
    trace = traces[binding] if binding < len(traces) else None
    if trace is not None:
        shift = low - int(rows[binding, 4])
        trace = dataclasses.replace(trace, live=tuple(v + shift for v in trace.live))
    return Trial(
        batch_size=b,
        fits=bool(rows[:, 1].min() > 0),
        peak_bytes=int(rows[:, 3].max()) + low,
        seconds=float(rows[:, 5].max()),
        oom=bool(rows[:, 2].max() > 0),
        reserved_bytes=most(7),
        alloc_retries=most(8),
        state_bytes=most(6),
        trace=trace,
        steps=steps,  # this rank's (the profiler's cost prediction divides its seconds by it)
    )
