"""The stages of :func:`~maxbatch.find_batch_size`, over the records it builds.

``measure`` opens the workload on the device and runs capacity (:mod:`maxbatch.devices.capacity`) ->
agreement across ranks -> the result cache (:mod:`maxbatch.run.lookup`) -> the ceiling search
(:mod:`maxbatch.search.probe`, from the fake step's first guess on CUDA) -> the profiler
(:mod:`maxbatch.profile.profiler`); then ``noise`` (the gradient noise scale); the result and the
advice over it are :mod:`maxbatch.run.answer`'s. Each takes records, not options.
"""

from __future__ import annotations

import dataclasses
import time

from maxbatch.devices.capacity import (
    Capacity,
    enclosing_room,
    is_virtual,
    probe_capacity,
)
from maxbatch.devices.device import describe
from maxbatch.profile.profiler import ProfileOutcome
from maxbatch.profile.realstep import profile_workload
from maxbatch.results import (
    UNTIMED_REASON,
    BatchSizeResult,
    DeviceInfo,
    Throughput,
)
from maxbatch.run.ceiling import accumulate, agree, search_ceiling
from maxbatch.run.distributed import sharded_note
from maxbatch.run.lookup import Lookup, look_up
from maxbatch.run.request import Request
from maxbatch.run.unfinished import Interruption, PointLog
from maxbatch.search.accumulation import Accumulated
from maxbatch.search.meter import meter_for
from maxbatch.search.probe import SearchOutcome
from maxbatch.stats.noise import noise_scale as measure_noise_scale
from maxbatch.stats.noisestats import NoiseScale
from maxbatch.step.oom import release_memory
from maxbatch.step.workload import Workload, build_workload


@dataclasses.dataclass(frozen=True, kw_only=True)
class Picked:
    """What the profile stage chose, and why."""

    batch_size: int
    reason: str
    profiled: ProfileOutcome | None = None  #: what the profiler timed and picked
    interrupted: Interruption | None = None  #: Ctrl-C or SIGTERM stopped the profiler

    @property
    def points(self) -> tuple[Throughput, ...]:
        """The timed sizes."""
        if self.interrupted is not None:
            return self.interrupted.points
        return () if self.profiled is None else self.profiled.points

    @property
    def note(self) -> str | None:
        """Why the profiler stopped early, if it did."""
        if self.interrupted is not None:
            return self.interrupted.note()
        profiled = self.profiled
        return (
            None if profiled is None or profiled.complete else f"profiler: {profiled.stop_reason}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measured:
    """What the stages on the device found."""

    info: DeviceInfo
    optimizer: str | None
    capacity: Capacity
    outcome: SearchOutcome
    search_notes: tuple[str, ...]
    picked: Picked
    lookup: Lookup | None = None
    alive_at_start: tuple[str, ...] = ()
    accumulated: Accumulated | None = None


def measure(request: Request) -> Measured | BatchSizeResult:
    """Open the workload on the device, plan the capacity, search and profile; restore.

    Returns:
        What the stages found, or a cached answer that held.
    """
    dev, limits = request.device, request.memory
    # Before any step: a trial that runs out of memory inside FSDP's forward leaves its modules
    # unsharded, with plain tensors where the DTensors were.
    sharded = sharded_note(request.step.model)
    info = describe(dev)
    virtual = is_virtual(dev, limits)
    meter = meter_for(dev, virtual=virtual)
    try:
        with meter, build_workload(request.step, dev) as workload:
            base = meter.live_bytes(workload)
            with enclosing_room(dev, workload.state_tensors()) as room:
                local = probe_capacity(info, limits, base, room)
                meter.set_usable(local.usable_bytes)  # this rank's; the search sees the tightest
                capacity = agree(request.ranks, local, dev)
                lookup = look_up(request, info, workload, meter)
                if lookup is not None and lookup.hit is not None:
                    return lookup.hit
                outcome, search_notes = search_ceiling(request, workload, meter, capacity)
                alive = workload.alive_at_start
                picked = (
                    _keep_ceiling(request, workload, outcome)
                    if capacity.beyond_host is None
                    else Picked(
                        batch_size=outcome.ceiling,
                        reason="the estimated ceiling: no size near it can run on this machine "
                        "to be timed",
                    )
                )
                accumulated = accumulate(
                    request, workload, meter, capacity, outcome, picked.batch_size
                )
    finally:
        release_memory(dev, full=True)
    opt = workload.optimizer
    return Measured(
        info=info,
        optimizer=None if opt is None else type(opt).__name__,
        capacity=capacity,
        outcome=outcome,
        search_notes=search_notes if sharded is None else (sharded, *search_notes),
        picked=picked,
        lookup=lookup,
        alive_at_start=alive,
        accumulated=accumulated,
    )


def _keep_ceiling(request: Request, workload: Workload, outcome: SearchOutcome) -> Picked:
    """The profile stage; Ctrl-C or SIGTERM in it keeps the verified ceiling (one rank only)."""
    log = PointLog(request.profile.on_point)
    logged = dataclasses.replace(request.profile, on_point=log)
    try:
        return _profile(dataclasses.replace(request, profile=logged), workload, outcome)
    except KeyboardInterrupt as e:
        if request.ranks.world_size != 1:
            raise  # the other ranks cannot agree on an answer now
        stop = log.stopped(e)
    return Picked(batch_size=outcome.ceiling, reason=stop.reason(outcome.ceiling), interrupted=stop)


def _profile(request: Request, workload: Workload, outcome: SearchOutcome) -> Picked:
    """Time the step at or below the ceiling and pick; without the profiler, the ceiling."""
    settings, budget = request.profile, request.search.time_budget
    if not settings.enabled:
        return Picked(batch_size=outcome.ceiling, reason=UNTIMED_REASON)
    left = None if budget is None else budget - (time.perf_counter() - request.started)
    left = request.ranks.least(left)  # one decision for all ranks
    if left is not None and left <= 0:
        return Picked(
            batch_size=outcome.ceiling,
            reason="the ceiling: the time budget was spent before any size could be timed",
        )
    # Timed without the counter: its per-operator bookkeeping would skew the timings, and the
    # sizes timed are at or below the verified ceiling.
    profiled = profile_workload(
        workload,
        outcome.ceiling,
        grid=request.search.grid,
        settings=settings,
        budget=left,
        # The trials' steps (counted ones are slower) predict what timing costs.
        step_seconds={t.batch_size: t.seconds / t.steps for t in outcome.trials if t.fits},
        # The cost rule's scale: one value for all ranks, so that they time the same sizes.
        probe_seconds=request.ranks.least(time.perf_counter() - request.started) or 0.0,
        agree=request.ranks.timings,
        search_clock=request.ranks.clock,
    )
    return Picked(batch_size=profiled.batch_size, reason=profiled.pick_reason, profiled=profiled)


def noise(request: Request, measured: Measured) -> NoiseScale | None:
    """The gradient noise scale at the pick, when asked for (None otherwise)."""
    if not request.advice.noise_scale:
        return None
    step = request.step
    return measure_noise_scale(
        step.model,
        step.sample,
        loss_fn=step.loss_fn,
        forward_fn=step.forward_fn,
        max_batch_size=measured.picked.batch_size,
        precision=step.precision,
    )
