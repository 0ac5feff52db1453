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
from typing import Any

from maxbatch.profile.profiler import ProfileOutcome
from maxbatch.results import BatchSizeResult, DeviceInfo, Trial
from maxbatch.run.request import Request, cache_settings
from maxbatch.run.unfinished import Interruption, untimed
from maxbatch.search.meter import Meter
from maxbatch.search.trial import run_trial
from maxbatch.step.workload import Workload
from maxbatch.store.cache import ResultCache, from_cache, key_of, verified
from maxbatch.store.cache import describe as describe_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lookup:
    """A look-up in the result cache: the cache, the key to keep the answer under, what it found."""

    cache: ResultCache
    key: str
    description: dict[str, Any]
    hit: BatchSizeResult | None = None  #: a cached answer that held (checked or trusted)
    note: str | None = None  #: why a cached answer was not used


def look_up(request: Request, info: DeviceInfo, workload: Workload, meter: Meter) -> Lookup | None:
    """The result cache's answer for this request, checked by two trials unless trusted.

    Returns:
        None without the cache (or under ``torch.distributed``); else the look-up.
    """
    step, search, grid = request.step, request.search, request.search.grid
    # A noise scale holds for the current weights, which the cache's key does not see.
    if not search.cache or request.ranks.world_size != 1 or request.advice.noise_scale:
        return None
    functions, settings = cache_settings(request, [info.kind, info.name, info.total_bytes])
    description = describe_step(
        step.model,
        step.make_batch(grid.start(step.sample_size)),
        workload.optimizer,
        functions,
        settings,
    )
    lookup = Lookup(cache=ResultCache(), key=key_of(description), description=description)
    hit = lookup.cache.get(lookup.key)
    if hit is None:
        return lookup
    if request.profile.enabled and hit.pick_confidence == "low":
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


def keep_answer(
    request: Request,
    lookup: Lookup | None,
    result: BatchSizeResult,
    *,
    profiled: ProfileOutcome | None,
    interrupted: Interruption | None,
) -> None:
    """Keep a complete answer (the profiler's too, when it ran) in the result cache."""
    if lookup is None or not result.complete:
        return
    if not request.profile.enabled or (profiled is not None and profiled.complete):
        lookup.cache.put(lookup.key, result, lookup.description)
    if interrupted is not None:
        # The verified ceiling, kept where a run without timing looks: ``--no-profile``.
        untimed_run = {**lookup.description["settings"], "profile.enabled": False}
        description = {**lookup.description, "settings": untimed_run}
        lookup.cache.put(key_of(description), untimed(result, interrupted.note()), description)
