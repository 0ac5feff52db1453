"""``find_batch_size``: a short list of stages over records (see :mod:`maxbatch.spec`).

validate (the keywords become records) -> capacity (:mod:`maxbatch.capacity`) -> search
(:mod:`maxbatch.probe`, from the fake step's first guess on CUDA) -> profile
(:mod:`maxbatch.profiler`) -> assemble (the result, then the advice over it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maxbatch.advise import advice_for, per_rank
from maxbatch.cache import ResultCache, from_cache, key_of, verified
from maxbatch.cache import describe as describe_step
from maxbatch.capacity import (
    Capacity,
    beyond_host,
    counts_live_bytes,
    enclosing_room,
    is_virtual,
    probe_capacity,
)
from maxbatch.data import DataSource
from maxbatch.device import DeviceInfo, describe, device_label, resolve_device
from maxbatch.distributed import Ranks, join, sharded_note
from maxbatch.errors import ConfigError
from maxbatch.estimate import estimate_beyond_host, first_guess
from maxbatch.grid import Grid
from maxbatch.noise import noise_scale as measure_noise_scale
from maxbatch.noisestats import NoiseScale
from maxbatch.oom import release_memory
from maxbatch.pick import TOLERANCE
from maxbatch.probe import SearchOutcome, search
from maxbatch.profiler import Profile, profile_fields, profile_workload
from maxbatch.results import BatchSizeResult, MemoryPoint, Throughput, Trial
from maxbatch.spec import (
    AdviceSettings,
    ForwardFn,
    LossFn,
    MemorySettings,
    Mode,
    OptimizerArg,
    Precision,
    ProfileSettings,
    SearchSettings,
    StepSpec,
    Target,
    TrainStepFn,
)
from maxbatch.trial import REPEATS, Meter, run_trial
from maxbatch.workload import Workload, build_workload


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """Everything a probe was asked, validated: the records its stages take."""

    started: float  #: ``time.perf_counter()`` at the call: the time budget counts from here
    search: SearchSettings
    memory: MemorySettings
    profile: ProfileSettings
    advice: AdviceSettings
    step: StepSpec
    device: torch.device
    ranks: Ranks  #: the ranks that agree under ``torch.distributed`` (one rank: alone)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Picked:
    """What the profile stage chose, and why."""

    batch_size: int
    reason: str
    profile: Profile | None = None

    @property
    def points(self) -> tuple[Throughput, ...]:
        """The timed sizes."""
        return () if self.profile is None else self.profile.points

    @property
    def note(self) -> str | None:
        """Why the profiler stopped early, if it did."""
        prof = self.profile
        return None if prof is None or prof.complete else f"profiler: {prof.stop_reason}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lookup:
    """A look-up in the result cache: where to store the answer, and what was found."""

    store: ResultCache
    key: str
    description: dict[str, Any]
    hit: BatchSizeResult | None = None  #: a cached answer that held (checked or trusted)
    note: str | None = None  #: why a cached answer was not used


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


def find_batch_size(
    model: torch.nn.Module,
    sample: Any,
    *,
    optimizer: OptimizerArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    train_step: TrainStepFn | None = None,
    device: str | torch.device | None = None,
    memory: str | int | None = None,
    headroom: str | int | None = None,
    mode: str | Mode = "train",
    precision: str | Precision | None = None,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    time_budget: float | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    profile: bool = True,
    pick: str = "within",
    tolerance: float = TOLERANCE,
    on_point: Callable[[Throughput], None] | None = None,
    dataset_size: int | None = None,
    global_batch: int | None = None,
    base_batch: int | None = None,
    base_lr: float | None = None,
    estimate_first: bool | None = None,
    noise_scale: bool = False,
    extra_state: Sequence[Any] = (),
    distributed: bool | None = None,
    cache: bool = False,
    trust_cache: bool = False,
) -> BatchSizeResult:
    """Find the largest batch size whose real step fits, and the batch size to use.

    Args:
        model: the model, on the device to probe.
        sample: one batch from your loader (batch dimension first; tensors in tuples, lists, dicts,
            dataclasses, nested), or a callable ``make_batch(batch_size)`` returning a batch.
        optimizer: an optimizer over the model's parameters (its state is restored afterwards), a
            factory ``optimizer(parameters)``, or ``"adamw"``, ``"adam"``, ``"sgd"``, ``"none"``.
            Default in train mode: AdamW over the trainable parameters.
        loss_fn: ``loss_fn(output, batch)`` returning a scalar; default: ``output.loss`` if any,
            else the sum of the means of the floating outputs.
        forward_fn: ``forward_fn(model, batch)``; default ``model(batch)``, ``model(*batch)`` for a
            tuple or list, ``model(**batch)`` for a dict.
        train_step: your whole step ``train_step(model, batch, optimizer)``, run instead of ours.
        device: ``"cpu"``, ``"cuda[:N]"``, ``"mps"``; default: where the model's parameters are.
        memory: cap the bytes live tensors may use (e.g. ``"24GiB"``): the virtual device.
        headroom: bytes kept free below the capacity; default 0 under ``memory``, else 5 % of the
            capacity (at least 256 MiB).
        mode: ``"train"`` (forward, backward, optimizer step) or ``"inference"``.
        precision: ``"bf16"`` or ``"fp16"`` for autocast; ``None``/``"fp32"``: as the model is.
        min_batch_size: the smallest size to try (default 1).
        max_batch_size: the largest size to try (default: no limit).
        multiple_of: only try multiples of this (e.g. 8).
        time_budget: seconds for the probe and the profiler together; when spent, the probe
            stops with the best verified size and the profiler with the sizes timed so far.
        on_trial: called with each :class:`~maxbatch.results.Trial` as it finishes.
        profile: time the step below the ceiling and pick the batch size by throughput; False:
            the pick is the ceiling.
        pick: ``"within"`` (default): the smallest size within ``tolerance`` of the best
            throughput measured; ``"fastest"``: the best outright.
        tolerance: share of the best throughput the ``"within"`` pick may give up (default 2 %).
        on_point: called with each :class:`~maxbatch.results.Throughput` as it is measured.
        dataset_size: samples per epoch, for the iterations per epoch at the pick.
        global_batch: the batch per optimizer step you want; the advice gives the micro-batch
            and gradient-accumulation steps that reach it.
        base_batch: the batch size ``base_lr`` was tuned at.
        base_lr: a tuned learning rate, scaled to the pick (linear and square-root rules).
        estimate_first: start from the ceiling that the step predicts on fake tensors
            (:mod:`maxbatch.estimate`), so that a right prediction needs two verifying trials.
            None (default): only on a CUDA device, where a real trial near the ceiling takes
            seconds and an out-of-memory one flushes the caching allocator, while the fake
            trials run cheaply on the host. Where the trials are counted (the virtual device,
            the CPU, MPS) their traces, operator by operator, predict the ceiling from the
            first trial, so three trials (the fewest that verify a ceiling) are the rule and
            fake trials (each costs several real steps of a small model) save nothing. True or False
            forces it. When it gives no guess (the model cannot be deep-copied, the step needs
            tensor values, nothing fits), a note says why and the search starts as without it.
        noise_scale: also measure the gradient noise scale (:func:`maxbatch.noise_scale`, on
            ``sample``, micro-batches at most the pick; the loss must be a mean over samples):
            the result's ``noise_scale``, and advice for a global batch near the critical batch.
            It depends on the weights, which the result cache does not key: no cache with it.
        extra_state: more state your ``train_step`` changes, restored in place after every
            trial: tensors, modules (an EMA copy), optimizers, ``GradScaler`` objects, and objects
            with ``state_dict()`` and ``load_state_dict()``. A ``GradScaler`` that ``train_step``
            uses as a global or closure variable is restored without being listed.
        distributed: agree with the other ranks of the ``torch.distributed`` process group
            (:mod:`maxbatch.distributed`): every rank probes its own device, runs the same
            sizes, and a size fits only if it fit on every rank; all return the same result.
            None (default): when a group with more than one rank is initialised; True: require
            one; False: this process alone. ``global_batch`` is then over all ranks.
        cache: look the answer up in the result cache (:mod:`maxbatch.cache`, under
            ``$XDG_CACHE_HOME/maxbatch``) and store it there; a hit is checked by running the
            cached ceiling and the size above it. Default False here (the CLI caches by
            default); not used under ``torch.distributed``.
        trust_cache: use a hit without the check.

    Returns:
        A :class:`~maxbatch.results.BatchSizeResult`.

    Raises:
        ConfigError: an option is invalid.
        DeviceError: the device is not available.
        DoesNotFitError: the smallest batch size does not fit.
        WorkloadError: the step failed for a reason other than memory.
        DistributedError: another rank failed (:class:`~maxbatch.errors.RankFailedError`, with
            its message), died, or did not answer within the process group's timeout.
    """
    request = Request(
        started=time.perf_counter(),
        search=SearchSettings(
            grid=Grid.build(
                min_batch_size=min_batch_size,
                max_batch_size=max_batch_size,
                multiple_of=multiple_of,
            ),
            time_budget=time_budget,
            estimate_first=estimate_first,
            on_trial=on_trial,
            cache=cache,
            trust_cache=trust_cache,
        ),
        memory=MemorySettings.build(memory=memory, headroom=headroom),
        profile=ProfileSettings.build(
            enabled=profile, pick=pick, tolerance=tolerance, on_point=on_point
        ),
        advice=AdviceSettings(
            dataset_size=dataset_size,
            global_batch=global_batch,
            base_batch=base_batch,
            base_lr=base_lr,
            noise_scale=noise_scale,
        ),
        step=StepSpec.build(  # last of the options: a data set is scanned here
            model,
            sample,
            optimizer=optimizer,
            loss_fn=loss_fn,
            forward_fn=forward_fn,
            train_step=train_step,
            mode=mode,
            precision=precision,
            extra_state=extra_state,
        ),
        device=_device(model, device),
        ranks=join(distributed),
    )
    try:
        per_rank(global_batch, request.ranks.world_size)
        request.advice.check_step(request.step)
        measured = _measure(request)
    except BaseException as e:
        request.ranks.share(e)  # before raising, so that no other rank waits for this one
        raise
    if isinstance(measured, BatchSizeResult):
        return measured  # a cached answer that held
    request.ranks.done()
    result = _advise(request, _assemble(request, measured, _noise(request, measured)))
    _store(request, measured, result)
    return result


def _device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to probe: ``device``, else where the model is; the model must be there.

    Raises:
        ConfigError: the model is on another device.
        DeviceError: the device is not available.
    """
    here = next(iter([*model.parameters(), *model.buffers()]), None)
    where = None if here is None else here.device
    dev = resolve_device(device) if device is not None else (where or resolve_device("cpu"))
    if where is not None and device_label(where) != device_label(dev):
        raise ConfigError(
            f"the model is on {device_label(where)} but device={device!r}; move it first "
            f"(model.to({device_label(dev)!r}))"
        )
    return dev


def _measure(request: Request) -> Measured | BatchSizeResult:
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
    meter = Meter(dev, counting=counts_live_bytes(dev.type, virtual), virtual=virtual)
    try:
        with meter, build_workload(request.step, dev) as workload:
            base = meter.live_bytes(workload)
            with enclosing_room(dev, workload.state_tensors()) as room:
                local = probe_capacity(info, limits, base, room)
                meter.set_usable(local.usable_bytes)  # this rank's; the search sees the tightest
                capacity = _agree(request.ranks, local, dev)
                lookup = _look_up(request, info, workload, meter)
                if lookup is not None and lookup.hit is not None:
                    return lookup.hit
                outcome, search_notes = _search(request, workload, meter, capacity)
                picked = (
                    _profile(request, workload, outcome)
                    if capacity.beyond_host is None
                    else Picked(
                        batch_size=outcome.ceiling,
                        reason="the estimated ceiling: no size near it can run on this machine "
                        "to be timed",
                    )
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
    )


def _agree(ranks: Ranks, local: Capacity, device: torch.device) -> Capacity:
    """The tightest rank's capacity, with the base against it (alone: this rank's).

    A virtual capacity this machine cannot hold is said up front (:attr:`Capacity.beyond_host`).
    """
    capacity, headroom, _, base = ranks.plan(
        local.capacity_bytes, local.headroom_bytes, local.usable_bytes, local.base_bytes
    )
    beyond = beyond_host(capacity, base, device) if local.virtual else None
    return dataclasses.replace(
        local, capacity_bytes=capacity, headroom_bytes=headroom, base_bytes=base, beyond_host=beyond
    )


def _look_up(request: Request, info: DeviceInfo, workload: Workload, meter: Meter) -> Lookup | None:
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
        },
    )
    lookup = Lookup(store=ResultCache(), key=key_of(description), description=description)
    hit = lookup.store.get(lookup.key)
    if hit is None:
        return lookup
    check = None
    if not search.trust_cache:
        ok, check = verified(
            hit,
            lambda b: _reported(run_trial(workload, meter, b), search.on_trial),
            multiple_of=grid.multiple_of,
            max_batch_size=grid.max_batch_size,
        )
        if not ok:
            note = f"the cached result did not hold ({check}): probed again"
            return dataclasses.replace(lookup, note=note)
    seconds = time.perf_counter() - request.started
    return dataclasses.replace(lookup, hit=from_cache(hit, lookup.key, check, seconds))


def _reported(trial: Trial, on_trial: Callable[[Trial], None] | None) -> Trial:
    if on_trial is not None:
        on_trial(trial)
    return trial


def _store(request: Request, measured: Measured, result: BatchSizeResult) -> None:
    """Keep a complete answer (the profiler's too, when it ran) in the result cache."""
    prof = measured.picked.profile
    timed = not request.profile.enabled or (prof is not None and prof.complete)
    if measured.lookup is not None and result.complete and timed:
        measured.lookup.store.put(measured.lookup.key, result, measured.lookup.description)


def _search(
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
    cuda = capacity.kind == "cuda"
    if cuda if settings.estimate_first is None else settings.estimate_first:
        guess, why = first_guess(
            request.step.with_optimizer(workload.optimizer),
            capacity.usable_bytes,
            start=start,
            grid=grid,
            target=Target.CUDA if cuda else Target.CPU,
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
        outcome = estimate_beyond_host(
            request.step.with_optimizer(workload.optimizer),
            capacity.usable_bytes,
            capacity.beyond_host,
            start=start,
            grid=grid,
            target=Target.CUDA if cuda else Target.CPU,
        )
        return outcome, (*notes, beyond)
    ranks, local_usable = request.ranks, meter.usable_bytes
    assert local_usable is not None  # set from this rank's capacity
    with ranks.quiet_step(request.step.model):
        outcome = search(
            ranks.trials(lambda b: run_trial(workload, meter, b), local_usable),
            start=start,
            usable_bytes=capacity.usable_bytes,
            base_bytes=capacity.base_bytes,
            grid=grid,
            time_budget=settings.time_budget,
            on_trial=settings.on_trial,
            first_guess=guess,
            clock=ranks.clock,
        )
    return outcome, notes


def _profile(request: Request, workload: Workload, outcome: SearchOutcome) -> Picked:
    """Time the step at or below the ceiling and pick; without the profiler, the ceiling."""
    settings, budget = request.profile, request.search.time_budget
    if not settings.enabled:
        return Picked(batch_size=outcome.ceiling, reason="the ceiling (profile=False)")
    left = None if budget is None else budget - (time.perf_counter() - request.started)
    left = request.ranks.least(left)  # one decision for all ranks
    if left is not None and left <= 0:
        return Picked(
            batch_size=outcome.ceiling,
            reason="the ceiling: the time budget was spent before any size could be timed",
        )
    # Timed without the counter: its per-operator bookkeeping would skew the timings, and the
    # sizes timed are at or below the verified ceiling.
    prof = profile_workload(
        workload,
        outcome.ceiling,
        grid=request.search.grid,
        settings=settings,
        budget=left,
        # The trials' steps (counted ones are slower) predict what timing costs.
        step_seconds={t.batch_size: t.seconds / REPEATS for t in outcome.trials if t.fits},
        # The cost rule's scale: one value for all ranks, so that they time the same sizes.
        probe_seconds=request.ranks.least(time.perf_counter() - request.started) or 0.0,
        agree=request.ranks.timings,
        search_clock=request.ranks.clock,
    )
    return Picked(batch_size=prof.batch_size, reason=prof.pick_reason, profile=prof)


def _noise(request: Request, measured: Measured) -> NoiseScale | None:
    """The gradient noise scale at the pick, when asked for (None otherwise)."""
    if not request.advice.noise_scale:
        return None
    step = request.step
    return measure_noise_scale(
        step.model,
        step.sample,
        step.loss_fn,
        step.forward_fn,
        max_batch_size=measured.picked.batch_size,
    )


def _assemble(request: Request, measured: Measured, noise: NoiseScale | None) -> BatchSizeResult:
    """The result record, with the notes in the order the stages made them."""
    step, capacity, outcome, picked = (
        request.step,
        measured.capacity,
        measured.outcome,
        measured.picked,
    )
    sample = step.sample
    scan = sample.report(outcome.ceiling) if isinstance(sample, DataSource) else None
    notes = [
        "no optimizer given: the step used AdamW, whose state is real memory"
        if step.optimizer is None and measured.optimizer is not None
        else None,
        capacity.note,
        None if measured.lookup is None else measured.lookup.note,
        *measured.search_notes,
        picked.note,
        None if outcome.complete else outcome.stop_reason,
        None if scan is None else scan.note,
    ]
    peaks = {t.batch_size: t.peak_bytes for t in outcome.trials if t.fits}
    return BatchSizeResult(
        batch_size=picked.batch_size,
        ceiling=outcome.ceiling,
        ceiling_source="measured" if capacity.beyond_host is None else "estimated",
        device=measured.info.device,
        device_name=measured.info.name,
        mode=step.mode.value,
        precision=step.precision_name,
        optimizer=measured.optimizer,
        trials=outcome.trials,
        capacity_bytes=capacity.capacity_bytes,
        headroom_bytes=capacity.headroom_bytes,
        usable_bytes=capacity.usable_bytes,
        virtual=capacity.virtual,
        memory_model=outcome.memory_model,
        complete=outcome.complete,
        stop_reason=outcome.stop_reason,
        pick_reason=picked.reason,
        notes=tuple(n for n in notes if n is not None),
        seconds=time.perf_counter() - request.started,
        throughput=picked.points,
        memory=tuple(MemoryPoint(b, p) for b, p in sorted(peaks.items())),
        noise_scale=None if noise is None else noise.to_dict(),
        **({} if picked.profile is None else profile_fields(picked.profile)),
        world_size=request.ranks.world_size,
        data=None if scan is None else scan.to_dict(),
    )


def _advise(request: Request, result: BatchSizeResult) -> BatchSizeResult:
    """The result with the advice over it, and the samples per optimizer step over all ranks."""
    wanted, noise = request.advice, result.noise_scale
    critical = None if noise is None else noise.get("critical_batch")
    advice = (
        advice_for(result, critical_batch=critical, **wanted.keywords()) if wanted.wanted else None
    )
    plan = None if advice is None else advice.accumulation
    micro, steps = (
        (result.batch_size, 1) if plan is None else (plan.micro_batch, plan.accumulation_steps)
    )
    return dataclasses.replace(
        result,
        advice=None if advice is None else advice.to_dict(),
        accumulation_steps=steps,
        global_batch_size=micro * result.world_size * steps,
    )
