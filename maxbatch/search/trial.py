"""Running one trial: the step at batch size ``b``, measured, with full recovery after an OOM."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

from maxbatch.devices.accounting import MemoryCounter, default_rounding
from maxbatch.devices.device import CudaPeak, synchronize
from maxbatch.errors import HostMemoryError, MaxbatchError, WorkloadError
from maxbatch.memtrace import TraceRecorder
from maxbatch.results import Trial
from maxbatch.search.leaks import Growth
from maxbatch.step.batching import check_rows
from maxbatch.step.loop import LEAK_STEPS, STEPS
from maxbatch.step.oom import STEP_FAILURES, failure_text, is_oom, release_memory
from maxbatch.step.workload import Workload
from maxbatch.units import format_bytes

#: Steps per trial (:data:`maxbatch.step.loop.STEPS`): the first creates lazily allocated state
#: (optimizer moments, workspaces, gradients a late ``zero_grad`` keeps), the second starts from
#: the loop's steady state, whose peak counts.
REPEATS = STEPS


class Meter:
    """Measures the peak bytes of a trial and decides whether it fits in ``usable_bytes``.

    The counting meter (virtual device, CPU, MPS) enforces the cap itself with a
    :class:`~maxbatch.devices.accounting.MemoryCounter`; on CUDA without a cap the caching
    allocator's own peak counters are read and the device raises its own out-of-memory errors.

    ``with meter:`` closes it at the end.

    Args:
        device: where the trials run.
        counting: count live bytes (else read CUDA's counters).
        round_to: round each counted storage up to this (default: 512 B on CUDA, else 1).
        label: the name the counter's out-of-memory errors give the device.
        every_device: count storages on every device, not only ``device``'s (fake tensors'
            storages are on the meta device).
        virtual: the cap is a virtual device's, not this machine's (a real OOM below it is the
            host's).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        counting: bool,
        round_to: int | None = None,
        label: str = "virtual",
        every_device: bool = False,
        virtual: bool = False,
    ):
        self.device = device
        #: the cap is a virtual device's, not this machine's: a real OOM below it is the host's
        self.virtual = virtual
        self.usable_bytes: int | None = None
        self.counter: MemoryCounter | None = None
        self.cuda: CudaPeak | None = None
        if counting:
            rounding = round_to if round_to is not None else default_rounding(device)
            self.counter = MemoryCounter(
                None, round_to=rounding, label=label, device=None if every_device else device
            )
        else:
            self.cuda = CudaPeak(device)

    def set_usable(self, usable_bytes: int | None) -> None:
        """Set the bytes a trial may peak at (None: no cap); counting raises an OOM past them."""
        self.usable_bytes = usable_bytes
        if self.counter is not None:
            self.counter.cap_bytes = usable_bytes

    def close(self) -> None:
        """Release the counter's hold on the model's storages."""
        if self.counter is not None:
            self.counter.close()

    def __enter__(self) -> Meter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def live_now(self) -> int:
        """Bytes live on the device now, as counted or allocated (inside a trial)."""
        if self.counter is not None:
            return self.counter.live_bytes
        assert self.cuda is not None
        return self.cuda.allocated_bytes()

    def live_bytes(self, workload: Workload) -> int:
        """Bytes live on the device now (counting: the model's state plus anything counted)."""
        if self.counter is not None:
            self.counter.track(workload.state_tensors())
            return self.counter.live_bytes
        assert self.cuda is not None
        return self.cuda.allocated_bytes()


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
    counter, cuda = meter.counter, meter.cuda
    oom = False
    reserved = retries = None
    start = clock()
    recorder = None
    if counter is not None:
        counter.track(workload.state_tensors())
        counter.refused_bytes = 0
        counter.reset_peak()
        fixed = {tuple(t.shape) for t in workload.state_tensors(grads=False)}
        recorder = counter.recorder = TraceRecorder(batch_size, fixed)
        context: contextlib.AbstractContextManager[Any] = counter
    else:
        assert cuda is not None
        cuda.start()
        context = contextlib.nullcontext()

    def built(batch: Any) -> None:
        check_rows(batch, batch_size)
        if recorder is not None:
            recorder.steps_start()  # the same operators run from here on at every size

    steps = LEAK_STEPS if check_leak else STEPS
    growth = Growth(lambda: meter.live_now())
    try:
        with context:
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
        if counter is not None:
            counter.recorder = None
    # Recovery happens here, outside the except block: no exception (and so no traceback holding
    # the failed batch's tensors) is alive any more.
    seconds = clock() - start
    state = workload.state_bytes()
    host_oom = oom and meter.virtual and counter is not None and not counter.refused_bytes
    if counter is not None:
        peak = max(counter.peak_bytes, counter.refused_bytes)
    else:
        assert cuda is not None
        peak, reserved, retries = cuda.read()
    workload.reset()
    release_memory(meter.device)
    usable = meter.usable_bytes
    if host_oom:
        # The allocator refused below the virtual cap: this machine gave out, not the device.
        assert usable is not None
        raise HostMemoryError(
            f"this machine ran out of memory at batch size {batch_size} with "
            f"{format_bytes(peak)} live on the virtual device of {format_bytes(usable)}: it "
            "cannot hold what the cap (memory=, --memory) asks; lower it or use "
            "`maxbatch estimate`",
            capacity_bytes=usable,
            batch_size=batch_size,
        )
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
