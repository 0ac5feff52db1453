"""The ceiling stages of the probe: agreement on the capacity, the search, accumulating trials.

:func:`agree` takes the tightest rank's capacity; :func:`search_ceiling` runs the ceiling search
(:mod:`maxbatch.search.probe`), from the fake step's first guess when asked, or estimates the
ceiling when this machine cannot hold the virtual capacity; :func:`accumulate` finds the
micro-batch ceiling from accumulating trials when the global batch's plan needs it.
"""

from __future__ import annotations

import dataclasses

import torch

from maxbatch.devicekinds import kind_of
from maxbatch.devices.capacity import Capacity
from maxbatch.devices.host import beyond_host
from maxbatch.estimate.guess import estimate_beyond_host, first_guess
from maxbatch.run.distributed import Ranks
from maxbatch.run.request import Request
from maxbatch.search.accumulation import Accumulated, accumulating_trials, gradient_bytes
from maxbatch.search.accumulation import measure as measure_accumulation
from maxbatch.search.meter import Meter
from maxbatch.search.probe import SearchOutcome, search
from maxbatch.search.trial import leak_checked
from maxbatch.settings import Mode, Target
from maxbatch.stats.advise import accumulation_plan, per_rank
from maxbatch.step.workload import Workload


def agree(ranks: Ranks, local: Capacity, device: torch.device) -> Capacity:
    """The tightest rank's capacity, with the base against it (alone: this rank's).

    A virtual capacity this machine cannot hold is said up front (:attr:`Capacity.beyond_host`).

    Returns:
        The agreed capacity.
    """
    capacity, headroom, _, base = ranks.plan(
        local.capacity_bytes, local.headroom_bytes, local.usable_bytes, local.base_bytes
    )
    beyond = beyond_host(capacity, base, device) if local.virtual else None
    return dataclasses.replace(
        local, capacity_bytes=capacity, headroom_bytes=headroom, base_bytes=base, beyond_host=beyond
    )


def search_ceiling(
    request: Request, workload: Workload, meter: Meter, capacity: Capacity
) -> tuple[SearchOutcome, tuple[str, ...]]:
    """The ceiling search, from the fake step's first guess when asked (auto: on CUDA only).

    Returns:
        The outcome, and notes: why a first guess asked for could not be made, and that the
        ceiling was estimated when this machine cannot hold the virtual capacity.

    Raises:
        DoesNotFitError: the smallest size does not fit.
        WorkloadError: the step failed for another reason.
    """
    settings, grid = request.search, request.search.grid
    start = grid.start(request.step.sample_size)
    guess: int | None = None
    notes: tuple[str, ...] = ()
    # Auto: only on CUDA, where the real trials it saves are the expensive ones.
    kind = kind_of(capacity.kind)
    target = Target(kind.estimate_target)
    if kind.guess_first if settings.estimate_first is None else settings.estimate_first:
        guess, why = first_guess(
            request.step.with_optimizer(workload.optimizer),
            capacity.usable_bytes,
            start=start,
            grid=grid,
            target=target,
        )
        if guess is None:
            notes = (
                f"no first guess from fake tensors: {why}; the search started from "
                f"batch size {start}",
            )
    if capacity.beyond_host is not None:
        beyond = (
            f"{capacity.beyond_host}: the ceiling is estimated on fake tensors, nothing was timed"
        )
        ceiling, how = estimate_beyond_host(
            request.step.with_optimizer(workload.optimizer),
            capacity.usable_bytes,
            capacity.beyond_host,
            start=start,
            grid=grid,
            target=target,
        )
        outcome = SearchOutcome(
            ceiling=ceiling, trials=(), memory_model=None, complete=True, stop_reason=how
        )
        return outcome, (*notes, beyond)
    ranks, local_usable = request.ranks, meter.usable_bytes
    assert local_usable is not None  # set from this rank's capacity
    with ranks.quiet_step(request.step.model):
        outcome = search(
            ranks.trials(leak_checked(workload, meter), local_usable),
            start=start,
            usable_bytes=capacity.usable_bytes,
            base_bytes=capacity.base_bytes,
            settings=settings,
            first_guess=guess,
            clock=ranks.clock,
        )
    return outcome, notes


def accumulate(
    request: Request,
    workload: Workload,
    meter: Meter,
    capacity: Capacity,
    outcome: SearchOutcome,
    pick: int,
) -> Accumulated | None:
    """The micro-batch ceiling from accumulating trials, when the global batch's plan needs it.

    Returns:
        The accumulating trials' answer, or None when the plan has one micro-batch (or the
        trials already accumulate, or there is nothing to accumulate).
    """
    step, ranks = request.step, request.ranks
    wanted = per_rank(request.advice.global_batch, ranks.world_size)
    if (
        wanted is None
        or capacity.beyond_host is not None
        or step.mode is Mode.INFERENCE
        or step.train_step is not None
        or step.loop.accumulate > 1
        or accumulation_plan(wanted, outcome.ceiling, pick).accumulation_steps == 1
    ):
        return None
    usable = meter.usable_bytes
    assert usable is not None  # set from this rank's capacity
    with ranks.quiet_step(step.model):
        return measure_accumulation(
            ranks.trials(accumulating_trials(workload, meter), usable),
            ceiling=outcome.ceiling,
            model=outcome.memory_model,
            usable=capacity.usable_bytes,
            grid=request.search.grid,
            extra_guess=gradient_bytes(step.model.parameters()),
            plain=outcome.trials,
            on_trial=request.search.on_trial,
        )
