"""Isolated trials: each trial of a model file runs in a fresh process.

No allocator cache, cuDNN autotuning or fragmentation from an earlier trial helps or hurts the
next one, which makes the ceiling the most faithful on CUDA; and on a CPU without ``memory=``, a
trial that wakes the kernel's OOM killer kills its own process, not the probe: a child killed by
SIGKILL while the kernel recorded an out-of-memory kill counts as "does not fit" at that size,
with a note. Any other death (SIGSEGV, SIGABRT, a SIGKILL without that record) is a crash: a
:class:`~maxbatch.errors.WorkloadError` that names the signal.

Each child is bounded (:mod:`maxbatch.run.childproc`): ``trial_timeout`` seconds (default
:data:`TRIAL_TIMEOUT`), and no later than the end of ``time_budget`` during the search; past it
its whole process group is killed. A child dies with the probe, however the probe dies.

The parent runs the same search (:func:`maxbatch.search.probe.search`) over ``run(b)``, where each
``run(b)`` starts ``python -m maxbatch.run.isotrial REQUEST`` (:mod:`maxbatch.run.isotrial`) and the
child runs :func:`~maxbatch.find_batch_size` on the freshly loaded file at exactly ``b``
(``min_batch_size = max_batch_size = b``). At the end one more child times the sizes up to the
ceiling and picks (when profiling or advice was asked for). The parent never touches the device.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from maxbatch.devices.device import require_weights
from maxbatch.errors import ConfigError, DoesNotFitError
from maxbatch.grid import Grid
from maxbatch.results import UNTIMED_REASON, BatchSizeResult, MemoryPoint, Throughput, Trial
from maxbatch.run.childoptions import TRIAL_TIMEOUT, check_options, child_values, search_options
from maxbatch.run.distributed import is_distributed
from maxbatch.run.modelfile import ModelSpec, load_model_file
from maxbatch.search.bracket import fit_memory_model
from maxbatch.search.probe import SearchOutcome, search
from maxbatch.settings import SearchSettings
from maxbatch.step.batching import make_batch_fn
from maxbatch.step.retry import lower_after_oom

if TYPE_CHECKING:  # imported when used: the children run it as __main__ (python -m)
    from maxbatch.run.isotrial import Children


def probe_isolated(
    model_file: str,
    *,
    start: int,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    time_budget: float | None = None,
    trial_timeout: float | None = TRIAL_TIMEOUT,
    on_trial: Callable[[Trial], None] | None = None,
    on_point: Callable[[Throughput], None] | None = None,
    **options: Any,
) -> BatchSizeResult:
    """Find the ceiling of a model file with every trial in a fresh process, then pick.

    Args:
        model_file: the model file (README, "The model file").
        start: the first size (the sample's own batch size).
        min_batch_size: the smallest size to try.
        max_batch_size: the largest size to try.
        multiple_of: only multiples of this.
        time_budget: seconds for the search (the final profiling child is not counted); a
            child still running when it ends is killed and the search stops with the best so far.
        trial_timeout: seconds each child may run (None: no limit); past it its process group
            is killed and the probe stops with a :class:`~maxbatch.errors.WorkloadError`.
        on_trial: called with each trial as its child finishes.
        on_point: called with each timed size once the profiling child finished.
        **options: :func:`~maxbatch.find_batch_size` options that take plain values
            (not in :data:`~maxbatch.run.childoptions.PARENT_OWN`).

    Returns:
        The result, as :func:`~maxbatch.find_batch_size` gives it.

    Raises:
        ConfigError: an option cannot be passed to a child, or ``trial_timeout`` is not a
            positive number of seconds.
        DoesNotFitError: the smallest size does not fit (or its process was OOM-killed), or the
            time budget ran out before any size fitted.
        WorkloadError: a child failed for a reason other than memory: an error, a crash (a
            signal other than an OOM kill), or its timeout.
    """
    from maxbatch.run.isotrial import BudgetSpent, Children, final_child

    started = time.perf_counter()
    check_options(options, trial_timeout)
    grid = Grid.build(
        min_batch_size=min_batch_size, max_batch_size=max_batch_size, multiple_of=multiple_of
    )
    # The search's options are this process's: each child runs one size.
    settings = SearchSettings(
        grid=grid, time_budget=time_budget, on_trial=on_trial, **search_options(options)
    )
    notes: list[str] = ["isolated: every trial ran in a fresh process that loaded the model file"]
    children = Children(
        model_file,
        {**options, "multiple_of": multiple_of},
        notes,
        timeout=trial_timeout,
        deadline=None if time_budget is None else time.monotonic() + time_budget,
    )
    done: dict[int, Trial] = {}
    try:
        outcome = _search(children, settings, start, done)
    except BudgetSpent as e:
        outcome = _budget_outcome(done, e.batch_size, time_budget or 0.0, children.usable)
    want_answer = options.get("profile", True) or any(
        options.get(k) is not None for k in ("dataset_size", "global_batch", "base_batch")
    )
    if want_answer:
        final = final_child(children, outcome.ceiling, min_batch_size, on_point)
    else:
        assert children.first is not None
        final = dataclasses.replace(
            children.first,
            batch_size=outcome.ceiling,
            pick_reason=UNTIMED_REASON,
            profile=dataclasses.replace(children.first.profile, throughput=()),
        )
    fits = sorted((t.batch_size, t.peak_bytes) for t in outcome.trials if t.fits)
    return dataclasses.replace(
        final,
        search=dataclasses.replace(
            final.search,
            ceiling=outcome.ceiling,
            trials=outcome.trials,
            memory_model=fit_memory_model(outcome.trials),
            complete=outcome.complete,
            stop_reason=outcome.stop_reason,
            memory=tuple(MemoryPoint(batch_size=s, peak_bytes=p) for s, p in fits),
        ),
        notes=(*notes, *(n for n in final.notes if n not in notes)),
        seconds=time.perf_counter() - started,
    )


def _search(
    children: Children, settings: SearchSettings, start: int, done: dict[int, Trial]
) -> SearchOutcome:
    """The ceiling search over isolated trials; ``done`` collects every trial as it ends."""

    def run(b: int) -> Trial:
        if b not in done:
            done[b] = children.trial(b)
        return done[b]

    # The search needs the usable bytes before its first trial: take them from the first child
    # that reports them, halving as the search would after a killed one.
    grid, on_trial = settings.grid, settings.on_trial
    b = grid.snap_down(start)
    killed: list[Trial] = []
    while True:
        trial = run(b)
        if children.usable is not None:
            break
        killed.append(trial)
        if on_trial is not None:
            on_trial(trial)
        lower = lower_after_oom(b, smallest=grid.lower, halve=lambda n: grid.snap_down(n / 2))
        if lower is None:
            raise DoesNotFitError(
                f"batch size {b} does not fit: its isolated process was killed by the kernel's "
                "OOM killer",
                batch_size=b,
                needed_bytes=trial.peak_bytes,
                available_bytes=0,
            )
        b = lower
    outcome = search(
        run,
        start=b,
        usable_bytes=children.usable,
        base_bytes=(children.first.trials[0].state_bytes or 0) if children.first else 0,
        settings=settings,
    )
    again = {t.batch_size for t in outcome.trials}
    trials = (*(t for t in killed if t.batch_size not in again), *outcome.trials)
    return dataclasses.replace(outcome, trials=trials)


def _budget_outcome(
    done: Mapping[int, Trial], b: int, budget: float, usable: int | None
) -> SearchOutcome:
    """The best so far when the time budget ended while the trial at ``b`` was running.

    Returns:
        The search's outcome: the largest size that fit, incomplete.

    Raises:
        DoesNotFitError: no size had fitted yet.
    """
    trials = tuple(done.values())
    fits = [t.batch_size for t in trials if t.fits]
    if not fits:
        raise DoesNotFitError(
            f"time budget of {budget:g}s spent before any batch size fitted: the isolated trial "
            f"at batch size {b} was still running (its process was killed)",
            batch_size=b,
            needed_bytes=0,
            available_bytes=usable or 0,
        )
    return SearchOutcome(
        ceiling=max(fits),
        trials=trials,
        memory_model=fit_memory_model(trials),
        complete=False,
        stop_reason=(
            f"time budget of {budget:g}s spent while the trial at {b} ran (its process was "
            f"killed): {max(fits)} is verified to fit, larger sizes were not settled"
        ),
    )


def probe_file(
    model_file: str | os.PathLike[str] | ModelSpec,
    *,
    isolate: bool = False,
    trial_timeout: float | None = TRIAL_TIMEOUT,
    on_scan: Callable[[int, int], None] | None = None,
    **options: Any,
) -> BatchSizeResult:
    """Probe a model file (README, "The model file") as ``maxbatch probe`` does.

    The file's hooks are the step's; its model must have weights and is moved to ``device``.

    Args:
        model_file: the file: ``model`` or ``build_model()``, ``sample`` or ``make_batch`` or
            ``dataset``, and the optional hooks; or the file already loaded
            (:func:`~maxbatch.run.modelfile.load_model_file`), as the CLI does to report a bad
            file before anything else.
        isolate: run every trial in a fresh process that loads the file (:func:`probe_isolated`):
            the options must be plain values (a name, a number, a switch) and not the parent's
            own (:data:`~maxbatch.run.childoptions.PARENT_OWN`), unless at their default; plus
            ``min_batch_size``, ``max_batch_size``, ``time_budget``, ``on_trial`` and
            ``on_point``. The file's ``extra_state()`` is called here once to check it; every
            child calls its own.
        trial_timeout: with ``isolate``: seconds each child may run (None: no limit).
        on_scan: called as ``on_scan(done, total)`` while the file's ``dataset`` is scanned in
            this process (isolated children scan theirs unreported).
        **options: :func:`~maxbatch.find_batch_size` options; ``optimizer`` defaults to the
            file's ``optimizer()``, ``extra_state`` to what its ``extra_state()`` returns.

    Returns:
        The result.

    Raises:
        ModelFileError: the file does not load or follow the conventions.
        ConfigError: ``isolate=True`` under an initialised ``torch.distributed`` group, an
            option a child cannot take, ``trial_timeout`` without ``isolate``, or the model is
            on the meta device (no weights).
        MaxbatchError: as :func:`~maxbatch.find_batch_size`.
        ProfileInterrupted: as :func:`~maxbatch.find_batch_size` (not with ``isolate``).
    """
    from maxbatch.run.isotrial import find_in_file

    if isolate and is_distributed():
        raise ConfigError(
            "isolated trials do not combine with torch.distributed: run without --isolate under "
            "torchrun (the ranks then agree in one process each)"
        )
    model_spec = model_file if isinstance(model_file, ModelSpec) else load_model_file(model_file)
    require_weights(model_spec.model)  # checked here, in this process, before any child starts
    if not isolate:
        if trial_timeout != TRIAL_TIMEOUT:
            raise ConfigError(
                f"trial_timeout={trial_timeout!r} bounds the processes of isolated trials; pass "
                "isolate=True (without it every trial runs in this process: time_budget bounds "
                "the search)"
            )
        return find_in_file(model_spec, options, on_scan=on_scan)
    model_spec.extra_state_items()
    sample_size = None if model_spec.sample is None else make_batch_fn(model_spec.sample)[1]
    lower = options.get("min_batch_size") or 1
    start = max(lower, sample_size if sample_size is not None else 2)
    return probe_isolated(
        model_spec.path, start=start, trial_timeout=trial_timeout, **child_values(options)
    )
