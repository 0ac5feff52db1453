"""The result cache as a stage of the probe: look the answer up, keep a new one.

A hit is checked by two trials (the cached ceiling fits, the size above does not) unless the
user trusts the cache; the cache's own files are :mod:`maxbatch.store.cache`'s. A pick the profiler
was not sure of (``pick_confidence`` ``low``: noise could have flipped it) is never replayed as
the answer: the step is probed and timed again, and the note says why.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from maxbatch.results import BatchSizeResult, DeviceInfo, Trial
from maxbatch.run.unfinished import untimed
from maxbatch.search.meter import Meter
from maxbatch.search.trial import run_trial
from maxbatch.step.workload import Workload
from maxbatch.store.cache import ResultCache, from_cache, key_of, verified
from maxbatch.store.cache import describe as describe_step

if TYPE_CHECKING:
    from maxbatch.run.stages import Measured, Request


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lookup:
    """A look-up in the result cache: where to store the answer, and what was found."""

    store: ResultCache
    key: str
    description: dict[str, Any]
    hit: BatchSizeResult | None = None  #: a cached answer that held (checked or trusted)
    note: str | None = None  #: why a cached answer was not used


def look_up(request: Request, info: DeviceInfo, workload: Workload, meter: Meter) -> Lookup | None:
    """The result cache's answer for this request, checked by two trials unless trusted.

    Returns:
        None without the cache (or under ``torch.distributed``); else the look-up.
    """
    step, search, grid, prof, advice = (
        request.step,
        request.search,
        request.search.grid,
        request.profile,
        request.advice,
    )
    # A noise scale holds for the current weights, which the cache's key does not see.
    if not search.cache or request.ranks.world_size != 1 or advice.noise_scale:
        return None
    description = describe_step(
        step.model,
        step.make_batch(grid.start(step.sample_size)),
        workload.optimizer,
        {"forward_fn": step.forward_fn, "loss_fn": step.loss_fn, "train_step": step.train_step},
        {
            "mode": step.mode.value,
            "precision": step.precision.value,
            "device": [info.kind, info.name, info.total_bytes],
            "memory": request.memory.memory_bytes,
            "headroom": request.memory.headroom_bytes,
            "grid": [grid.min_batch_size, grid.max_batch_size, grid.multiple_of],
            "pick": [prof.enabled, prof.rule.value, prof.tolerance],
            "advice": [
                advice.dataset_size,
                advice.global_batch,
                advice.base_batch,
                advice.base_lr,
                advice.noise_scale,
            ],
            "extra_state": len(step.extra_state.items),
            "loop": [
                step.loop.zero_grad.value,
                step.loop.accumulate,
                step.loop.allow_growth_bytes,
            ],
        },
    )
    lookup = Lookup(store=ResultCache(), key=key_of(description), description=description)
    hit = lookup.store.get(lookup.key)
    if hit is None:
        return lookup
    if prof.enabled and hit.pick_confidence == "low":
        note = (
            f"the cached pick ({hit.batch_size}) had low confidence ({hit.pick_confidence_reason})"
            ": probed and timed again rather than replayed"
        )
        return dataclasses.replace(lookup, note=note)
    check = None
    ran: list[Trial] = []  # this run's trials: the check
    if not search.trust_cache:
        ok, check = verified(
            hit,
            lambda b: _reported(run_trial(workload, meter, b), search.on_trial, ran),
            multiple_of=grid.multiple_of,
            max_batch_size=grid.max_batch_size,
        )
        if not ok:
            note = f"the cached result did not hold ({check}): probed again"
            return dataclasses.replace(lookup, note=note)
    seconds = time.perf_counter() - request.started
    return dataclasses.replace(lookup, hit=from_cache(hit, lookup.key, check, seconds, tuple(ran)))


def _reported(trial: Trial, on_trial: Callable[[Trial], None] | None, ran: list[Trial]) -> Trial:
    ran.append(trial)
    if on_trial is not None:
        on_trial(trial)
    return trial


def store(request: Request, measured: Measured, result: BatchSizeResult) -> None:
    """Keep a complete answer (the profiler's too, when it ran) in the result cache."""
    prof, lookup = measured.picked.profile, measured.lookup
    timed = not request.profile.enabled or (prof is not None and prof.complete)
    if lookup is not None and result.complete and timed:
        lookup.store.put(lookup.key, result, lookup.description)
    stop = measured.picked.interrupted
    if lookup is not None and result.complete and stop is not None:
        # The verified ceiling, kept where a run without timing looks: ``--no-profile``.
        settings = lookup.description["settings"]
        untimed_run = {**settings, "pick": [False, *settings["pick"][1:]]}
        description = {**lookup.description, "settings": untimed_run}
        lookup.store.put(key_of(description), untimed(result, stop.note()), description)
