"""The profiler on the real step: each candidate timed by :mod:`maxbatch.profile.timing`.

:func:`~maxbatch.profile.profiler.profile` is the pure search; this is where it meets a
:class:`~maxbatch.step.workload.Workload` on a device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from maxbatch.grid import ALL_SIZES, Grid
from maxbatch.profile.budget import TimeStep
from maxbatch.profile.profiler import ProfileOutcome, candidates, profile
from maxbatch.profile.timing import REPLICATES, WARMUP, time_workload
from maxbatch.settings import ProfileSettings
from maxbatch.step.workload import Workload


def profile_workload(
    workload: Workload,
    ceiling: int,
    *,
    grid: Grid = ALL_SIZES,
    settings: ProfileSettings | None = None,
    budget: float | None = None,
    warmup: int = WARMUP,
    replicates: int = REPLICATES,
    clock: Callable[[], float] | None = None,
    step_seconds: Mapping[int, float] | None = None,
    probe_seconds: float = 0.0,
    agree: Callable[[TimeStep], TimeStep] | None = None,
    search_clock: Callable[[], float] | None = None,
) -> ProfileOutcome:
    """Time the real step over :func:`candidates` up to ``ceiling`` and pick a batch size.

    Args:
        workload: the step, saved (inside ``with workload:``).
        ceiling: the largest size to time.
        grid: the sizes that may be timed (its minimum and multiple).
        settings: the pick rule, its tolerance and the progress callback (default: within 2 %).
        budget: seconds the search may take.
        warmup: untimed steps before each size's replicates.
        replicates: timed steps per size.
        clock: seconds as a float; None: the device kind's own timer for the steps (CUDA
            events on CUDA) and ``time.perf_counter`` for the search.
        step_seconds: seconds of one step at some sizes (e.g. the probe's trials), to predict
            the cost of the first sizes, so that ``budget`` holds from the start.
        probe_seconds: what the probe took, a scale for the cost rule (see :func:`profile`).
        agree: wraps the timing of one size (the ranks' agreement under ``torch.distributed``,
            see :mod:`maxbatch.run.distributed`).
        search_clock: replaces ``clock`` for the search's own decisions (the ranks' clock).

    Returns:
        The timed points and the pick.
    """
    chosen = settings if settings is not None else ProfileSettings()
    steps = warmup + replicates
    prior = {b: s * steps for b, s in (step_seconds or {}).items()}

    def time_step(b: int) -> list[float]:
        return time_workload(workload, b, warmup=warmup, replicates=replicates, clock=clock)

    return profile(
        time_step if agree is None else agree(time_step),
        candidates(ceiling, min_batch_size=grid.min_batch_size, multiple_of=grid.multiple_of),
        rule=chosen.rule,
        tolerance=chosen.tolerance,
        budget=budget,
        clock=search_clock or clock or time.perf_counter,
        on_point=chosen.on_point,
        prior=prior,
        probe_seconds=probe_seconds,
        steps=steps,
    )
