"""Timing the real step at one batch size, like ``torch.utils.benchmark`` times code.

Warm-up steps first, the device synchronised before every clock read (CUDA events time the step
on CUDA), several replicates, their median and interquartile range, and a flag on noisy sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from maxbatch.devicekinds import kind_of
from maxbatch.devices.device import CudaTimer, synchronize
from maxbatch.errors import MaxbatchError, WorkloadError
from maxbatch.results import Throughput
from maxbatch.step.forward import to_device
from maxbatch.step.oom import STEP_FAILURES, failure_text, is_oom, release_memory
from maxbatch.step.workload import Workload

WARMUP = 2  #: untimed steps per size: the first creates optimizer state, workspaces, caches
REPLICATES = 5  #: timed steps per size
NOISY = 0.1  #: IQR / median above this flags a size as noisy (torch.utils.benchmark's threshold)


def measurement(batch_size: int, seconds: Sequence[float], noisy: float = NOISY) -> Throughput:
    """Summarise the replicate ``seconds`` of one size; flag it when IQR / median > ``noisy``."""
    q1, median, q3 = (float(q) for q in np.percentile(np.asarray(seconds), [25, 50, 75]))
    median = max(median, 1e-12)  # a clock too coarse for the step must not divide by zero
    iqr = q3 - q1
    return Throughput(
        batch_size=batch_size,
        samples_per_second=batch_size / median,
        median_seconds=median,
        iqr_seconds=iqr,
        replicates=len(seconds),
        noisy=iqr / median > noisy,
    )


def _timed_steps(
    workload: Workload, b: int, warmup: int, replicates: int, clock: Callable[[], float] | None
) -> list[float]:
    batch = to_device(workload.make_batch(b), workload.device)
    for _ in range(warmup):
        workload.step(batch)
    # Without a clock of the caller's, a kind with device events times the step on the device.
    own_timer = clock is None and kind_of(workload.device).events
    events = CudaTimer(workload.device) if own_timer else None
    clock = clock or time.perf_counter
    seconds = []
    for _ in range(replicates):
        synchronize(workload.device)
        if events is not None:
            events.start()
            workload.step(batch)
            seconds.append(events.stop())
            continue
        started = clock()
        workload.step(batch)
        synchronize(workload.device)
        seconds.append(clock() - started)
    return seconds


def time_workload(
    workload: Workload,
    batch_size: int,
    *,
    warmup: int = WARMUP,
    replicates: int = REPLICATES,
    clock: Callable[[], float] | None = None,
) -> list[float]:
    """Time ``replicates`` real steps at ``batch_size``, one by one, after ``warmup`` steps.

    One batch is built on the device and the device is synchronised before every clock read.
    Without a ``clock``, the device kind chooses the timer: device events where the kind has
    them (:attr:`~maxbatch.devicekinds.DeviceKind.events`: CUDA), else ``time.perf_counter``.
    The workload is reset afterwards (it is used inside ``with workload:``), so every size
    starts from the same state.

    Returns:
        The seconds of each timed step, or an empty list when the size ran out of memory.

    Raises:
        WorkloadError: the step failed for a reason other than memory.
        MaxbatchError: raised by maxbatch inside the step (a virtual device's own error), unchanged.
    """
    oom, seconds = False, []
    try:
        seconds = _timed_steps(workload, batch_size, warmup, replicates, clock)
    except MaxbatchError:
        raise
    except STEP_FAILURES as exc:  # classified right here, never swallowed
        if not is_oom(exc):
            message = f"the step failed while timing batch size {batch_size}"
            raise WorkloadError(f"{message}: {failure_text(exc)}", batch_size=batch_size) from exc
        oom = True
    finally:
        workload.reset()
    if oom:  # here, outside the except block, the traceback that held the batch is gone
        release_memory(workload.device)
    return seconds
