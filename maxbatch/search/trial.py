"""Running one trial: the step at batch size ``b``, measured, with full recovery after an OOM."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from maxbatch.devices.device import synchronize
from maxbatch.errors import HostMemoryError, MaxbatchError, WorkloadError
from maxbatch.results import Trial
from maxbatch.search.leaks import Growth
from maxbatch.search.meter import Meter
from maxbatch.step.batching import check_rows
from maxbatch.step.loop import LEAK_STEPS, STEPS
from maxbatch.step.oom import STEP_FAILURES, failure_text, is_oom, release_memory
from maxbatch.step.workload import Workload
from maxbatch.units import format_bytes

#: Steps per trial (:data:`maxbatch.step.loop.STEPS`): the first creates lazily allocated state
#: (optimizer moments, workspaces, gradients a late ``zero_grad`` keeps), the second starts from
#: the loop's steady state, whose peak counts.
REPEATS = STEPS


def run_trial(
    workload: Workload,
    meter: Meter,
    batch_size: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    check_leak: bool = False,
) -> Trial:
    """Run ``REPEATS`` steps at ``batch_size`` and return what happened.

    With ``check_leak`` it runs one step more and reads the live bytes after every step: live
    bytes that keep growing at one size (by more than the loop's ``allow_growth_bytes``) are a
    leak (:class:`~maxbatch.errors.LeakError`), never folded into a ceiling.

    An out-of-memory error ends the trial as not fitting; the model and optimizer are reset and the
    memory of the failed trial is released before returning. Any other error is raised as a
    :class:`WorkloadError` chained to the original (a ``KeyboardInterrupt`` passes through).

    Returns:
        The :class:`~maxbatch.results.Trial`.

    Raises:
        WorkloadError: the step failed for a reason other than memory.
        MaxbatchError: raised by maxbatch inside the step, unchanged.
        HostMemoryError: this machine ran out of memory below a virtual device's cap.
        LeakError: with ``check_leak``: the steps kept growing the live bytes.
    """
    oom = False
    start = clock()
    recorder = meter.start(workload, batch_size)

    def built(batch: Any) -> None:
        check_rows(batch, batch_size)
        if recorder is not None:
            recorder.steps_start()  # the same operators run from here on at every size

    steps = LEAK_STEPS if check_leak else STEPS
    growth = Growth(lambda: meter.live_now())
    try:
        with meter.watching():
            workload.run(batch_size, steps, on_batch=built, after_step=growth.after_step)
        synchronize(meter.device)
    except MaxbatchError:
        raise
    except STEP_FAILURES as exc:  # classified right here, never swallowed
        if not is_oom(exc):
            raise WorkloadError(
                f"the step failed at batch size {batch_size} for a reason other than memory: "
                f"{failure_text(exc)}",
                batch_size=batch_size,
            ) from exc
        oom = True
    finally:
        meter.stop()
    # Recovery happens here, outside the except block: no exception (and so no traceback holding
    # the failed batch's tensors) is alive any more.
    seconds = clock() - start
    state = workload.state_bytes()
    host_oom = meter.host_ran_out(oom)
    peak, reserved, retries = meter.read()
    workload.reset()
    release_memory(meter.device)
    usable = meter.usable_bytes
    if host_oom:
        _host_ran_out(batch_size, peak, usable)
    if not oom:
        growth.check(batch_size, workload.loop.allow_growth_bytes)
    fits = not oom and (usable is None or peak <= usable)
    trace = None if recorder is None else recorder.trace(complete=not oom)
    return Trial(
        batch_size=batch_size,
        fits=fits,
        peak_bytes=int(peak),
        seconds=seconds,
        oom=oom,
        reserved_bytes=reserved,
        alloc_retries=retries,
        state_bytes=state,
        trace=trace,
        steps=steps,
    )


def _host_ran_out(batch_size: int, peak: int, usable: int | None) -> None:
    """The allocator refused below the virtual cap: this machine gave out, not the device.

    Raises:
        HostMemoryError: always.
    """
    assert usable is not None
    raise HostMemoryError(
        f"this machine ran out of memory at batch size {batch_size} with "
        f"{format_bytes(peak)} live on the virtual device of {format_bytes(usable)}: it "
        "cannot hold what the cap (memory=, --memory) asks; lower it or use "
        "`maxbatch estimate`",
        capacity_bytes=usable,
        batch_size=batch_size,
    )


def leak_checked(workload: Workload, meter: Meter) -> Callable[[int], Trial]:
    """``run(b)``: trials of which the first to finish also checks the step for leaks.

    Returns:
        The trial function.
    """
    checked = False

    def run(b: int) -> Trial:
        nonlocal checked
        trial = run_trial(workload, meter, b, check_leak=not checked)
        checked = checked or not trial.oom
        return trial

    return run
