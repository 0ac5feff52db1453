"""``find_batch_size``: validate once, build the workload, probe the ceiling, pick a size."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maxbatch.advise import advise
from maxbatch.batching import make_batch_fn
from maxbatch.cache import ResultCache, from_cache, key_of, verified
from maxbatch.cache import describe as describe_step
from maxbatch.data import DataSource, as_batch_source
from maxbatch.device import HEADROOM_FRACTION as HEADROOM_FRACTION  # re-exported
from maxbatch.device import MIN_HEADROOM as MIN_HEADROOM  # re-exported
from maxbatch.device import default_headroom as default_headroom  # re-exported
from maxbatch.device import describe, device_label, resolve_device
from maxbatch.distributed import join, sharded_note
from maxbatch.errors import ConfigError
from maxbatch.estimate import first_guess
from maxbatch.extrastate import ExtraState
from maxbatch.hostmem import beyond_host, estimate_beyond_host
from maxbatch.noise import noise_scale as measure_noise_scale
from maxbatch.oom import release_memory
from maxbatch.pick import TOLERANCE, check_pick
from maxbatch.probe import search
from maxbatch.profiler import profile_fields, profile_workload
from maxbatch.results import BatchSizeResult, MemoryPoint, Throughput, Trial
from maxbatch.trial import REPEATS, Meter, run_trial
from maxbatch.units import format_bytes, parse_bytes
from maxbatch.virtual import EnclosingDevices
from maxbatch.workload import (
    ForwardFn,
    LossFn,
    Mode,
    OptimizerArg,
    Precision,
    TrainStepFn,
    build_workload,
    parse_enum,
)

log = logging.getLogger(__name__)


def _positive_int(value: Any, name: str, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def _model_device(model: torch.nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _reported(trial: Trial, on_trial: Callable[[Trial], None] | None) -> Trial:
    if on_trial is not None:
        on_trial(trial)
    return trial


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
            dataclasses, nested), a callable ``make_batch(batch_size)`` returning a batch, or the
            data itself: a map-style ``Dataset``, a ``DataLoader`` or a
            :class:`~maxbatch.data.DataSource`, whose largest items make each trial's batch.
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
        tolerance: share of the best throughput the ``"within"`` pick may give up (default 3 %).
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
    started = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    run_mode: Mode = parse_enum(Mode, mode, "mode")
    prec: Precision = parse_enum(Precision, precision or "fp32", "precision")
    step = _positive_int(multiple_of, "multiple_of", allow_none=False) or 1
    min_b = _positive_int(min_batch_size, "min_batch_size")
    max_b = _positive_int(max_batch_size, "max_batch_size")
    if min_b is not None and max_b is not None and min_b > max_b:
        raise ConfigError(f"min_batch_size={min_b} is larger than max_batch_size={max_b}")
    if time_budget is not None and not time_budget > 0:
        raise ConfigError(f"time_budget={time_budget!r} must be a positive number of seconds")
    cap = None if memory is None else parse_bytes(memory, name="memory")
    if cap == 0:
        raise ConfigError("memory=0 leaves no room for anything; give a size such as 300MiB")
    fixed_headroom = None if headroom is None else parse_bytes(headroom, name="headroom")
    pick_rule = check_pick(pick, tolerance)
    if estimate_first is not None and not isinstance(estimate_first, bool):
        raise ConfigError(f"estimate_first={estimate_first!r} must be True, False or None (auto)")
    for name, value in (("dataset_size", dataset_size), ("global_batch", global_batch)):
        _positive_int(value, name)
    _positive_int(base_batch, "base_batch")
    if base_lr is not None and (isinstance(base_lr, bool) or not float(base_lr) > 0):
        raise ConfigError(f"base_lr={base_lr!r} must be a positive number")
    if (base_batch is None) != (base_lr is None):
        raise ConfigError("scaling a learning rate needs both base_batch and base_lr")
    if noise_scale and (run_mode is Mode.INFERENCE or (train_step is not None and not loss_fn)):
        raise ConfigError(
            "noise_scale needs the training loss: not in inference mode, and with a train_step "
            "pass loss_fn too"
        )
    extra = ExtraState(extra_state).with_scalers(train_step)

    ranks = join(distributed)
    if global_batch is not None and global_batch % ranks.world_size:
        raise ConfigError(
            f"global_batch={global_batch} is not a multiple of the {ranks.world_size} ranks"
        )
    sample = as_batch_source(sample)  # a data set or loader: its worst case, scanned now
    make_batch, sample_size = make_batch_fn(sample)
    here = _model_device(model)
    dev = resolve_device(device) if device is not None else (here or resolve_device("cpu"))
    if here is not None and device_label(here) != device_label(dev):
        raise ConfigError(
            f"the model is on {device_label(here)} but device={device!r}; move it first "
            f"(model.to({device_label(dev)!r}))"
        )

    workload = build_workload(
        model,
        make_batch,
        dev,
        optimizer=optimizer,
        mode=run_mode,
        precision=prec,
        forward_fn=forward_fn,
        loss_fn=loss_fn,
        train_step=train_step,
        extra_state=extra,
    )
    notes: list[str] = []
    opt = workload.optimizer
    if optimizer is None and opt is not None:
        notes.append("no optimizer given: the step used AdamW, whose state is real memory")
    opt_name = None if opt is None else type(opt).__name__
    if (sharded := sharded_note(model)) is not None:
        notes.append(sharded)
    info = describe(dev)
    virtual = cap is not None or EnclosingDevices.present(dev)
    meter = Meter(dev, counting=virtual or dev.type != "cuda", virtual=virtual)
    workload.save()
    enclosing = None
    try:
        workload.prepare()
        base = meter.live_bytes(workload)
        # Inside a user's virtual_device the smaller cap wins (theirs counts what ours does not).
        enclosing = EnclosingDevices(dev, workload.state_tensors())
        outer = enclosing.capacity_bytes
        if outer is not None:
            capacity = outer if cap is None else min(cap, outer)
            notes.append(f"inside a virtual device: capacity {format_bytes(capacity)}")
        elif cap is not None:
            capacity = cap
        elif dev.type == "cuda":
            capacity = info.capacity_bytes
        else:
            capacity = info.capacity_bytes + base
            notes.append(
                f"capacity is the host's available memory plus the model: {format_bytes(capacity)}"
            )
        room = (
            fixed_headroom
            if fixed_headroom is not None
            else default_headroom(capacity, virtual=virtual)
        )
        usable = capacity - room
        if usable <= base:
            raise ConfigError(
                f"the usable memory ({format_bytes(usable)} = capacity {format_bytes(capacity)} - "
                f"headroom {format_bytes(room)}) is not more than the model and optimizer state "
                f"already hold ({format_bytes(base)}); raise memory or lower headroom"
            )
        meter.set_usable(usable)
        # This rank's meter keeps its own usable bytes; the search sees the tightest rank's.
        local_usable = usable
        capacity, room, usable, base = ranks.plan(capacity, room, usable, base)
        beyond = beyond_host(capacity, base, dev) if virtual else None  # said up front
        lower = min_b or 1
        start = sample_size if sample_size is not None else max(lower, 2)
        start = max(start, lower)
        # A noise scale holds for the current weights, which the cache's key does not see.
        store = ResultCache() if cache and ranks.world_size == 1 and not noise_scale else None
        if store is not None:
            description = describe_step(
                model,
                make_batch(start),
                opt,
                {"forward_fn": forward_fn, "loss_fn": loss_fn, "train_step": train_step},
                {
                    "mode": run_mode.value,
                    "precision": prec.value,
                    "device": [info.kind, info.name, info.total_bytes],
                    "memory": cap,
                    "headroom": fixed_headroom,
                    "grid": [lower, max_b, step],
                    "pick": [profile, pick_rule.value, tolerance],
                    "advice": [dataset_size, global_batch, base_batch, base_lr, noise_scale],
                    "extra_state": len(extra_state),
                },
            )
            key = key_of(description)
            hit = store.get(key)
            if hit is not None:
                ok, check = True, None
                if not trust_cache:
                    ok, check = verified(
                        hit,
                        lambda b: _reported(run_trial(workload, meter, b), on_trial),
                        multiple_of=step,
                        max_batch_size=max_b,
                    )
                if ok:
                    return from_cache(hit, key, check, time.perf_counter() - started)
                notes.append(f"the cached result did not hold ({check}): probed again")
        guess = None
        # Auto: only on CUDA, where the real trials it saves are the expensive ones.
        with_estimate = dev.type == "cuda" if estimate_first is None else estimate_first
        if with_estimate:
            guess, why = first_guess(
                workload,
                sample,
                usable,
                start=start,
                min_batch_size=lower,
                max_batch_size=max_b,
                multiple_of=step,
            )
            if guess is None:
                notes.append(
                    f"no first guess from fake tensors: {why}; the search started from "
                    f"batch size {start}"
                )
        if beyond is not None:
            notes.append(f"{beyond}: the ceiling is estimated on fake tensors, nothing was timed")
            outcome = estimate_beyond_host(
                workload,
                sample,
                usable,
                beyond,
                start=start,
                min_batch_size=lower,
                max_batch_size=max_b,
                multiple_of=step,
            )
            profile = False
        else:
            with ranks.quiet_step(model):
                outcome = search(
                    ranks.trials(lambda b: run_trial(workload, meter, b), local_usable),
                    start=start,
                    usable_bytes=usable,
                    base_bytes=base,
                    min_batch_size=lower,
                    max_batch_size=max_b,
                    multiple_of=step,
                    time_budget=time_budget,
                    on_trial=on_trial,
                    first_guess=guess,
                    clock=ranks.clock,
                )
        chosen, reason = outcome.ceiling, "the ceiling (profile=False)"
        if beyond is not None:
            reason = "the estimated ceiling: no size near it can run on this machine to be timed"
        points: tuple[Throughput, ...] = ()
        prof = None
        if profile:
            left = None if time_budget is None else time_budget - (time.perf_counter() - started)
            left = ranks.least(left)  # one decision for all ranks
            if left is not None and left <= 0:
                reason = "the ceiling: the time budget was spent before any size could be timed"
            else:
                # Timed without the counter: its per-operator bookkeeping would skew the timings,
                # and the sizes timed are at or below the verified ceiling.
                prof = profile_workload(
                    workload,
                    outcome.ceiling,
                    min_batch_size=lower,
                    multiple_of=step,
                    rule=pick_rule,
                    tolerance=tolerance,
                    budget=left,
                    on_point=on_point,
                    # The trials' steps (counted ones are slower) predict what timing costs.
                    step_seconds={
                        t.batch_size: t.seconds / REPEATS for t in outcome.trials if t.fits
                    },
                    probe_seconds=time.perf_counter() - started,
                    agree=ranks.timings,
                    search_clock=ranks.clock,
                )
                chosen, reason, points = prof.batch_size, prof.pick_reason, prof.points
                if not prof.complete:
                    notes.append(f"profiler: {prof.stop_reason}")
    except BaseException as e:
        ranks.share(e)  # before raising, so that no other rank waits for this one
        raise
    finally:
        if enclosing is not None:
            enclosing.restore()
        workload.reset(final=True)
        meter.close()
        release_memory(dev, full=True)
    ranks.done()
    if not outcome.complete:
        notes.append(outcome.stop_reason)
    scan = sample.report(outcome.ceiling) if isinstance(sample, DataSource) else None
    if scan is not None:
        notes.append(scan.note)
    noise = None
    if noise_scale:
        noise = measure_noise_scale(model, sample, loss_fn, forward_fn, max_batch_size=chosen)
    # The critical batch is over all ranks; the advice is per rank, as for global_batch.
    critical = None if noise is None else noise.critical_batch
    advice = None
    if noise or dataset_size is not None or global_batch is not None or base_batch is not None:
        advice = advise(
            chosen,
            outcome.ceiling,
            dataset_size=dataset_size,
            global_batch=None if global_batch is None else global_batch // ranks.world_size,
            base_batch=base_batch,
            base_lr=base_lr,
            critical_batch=None if critical is None else max(1, critical // ranks.world_size),
        ).to_dict()
    peaks = {t.batch_size: t.peak_bytes for t in outcome.trials if t.fits}
    plan = (advice or {}).get("accumulation") or {"micro_batch": chosen, "accumulation_steps": 1}
    result = BatchSizeResult(
        batch_size=chosen,
        ceiling=outcome.ceiling,
        ceiling_source="measured" if beyond is None else "estimated",
        device=device_label(dev),
        device_name=info.name,
        mode=run_mode.value,
        precision=None if prec is Precision.FP32 else prec.value,
        optimizer=opt_name,
        trials=outcome.trials,
        capacity_bytes=capacity,
        headroom_bytes=room,
        usable_bytes=usable,
        virtual=virtual,
        memory_model=outcome.memory_model,
        complete=outcome.complete,
        stop_reason=outcome.stop_reason,
        pick_reason=reason,
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
        throughput=tuple(points),
        memory=tuple(MemoryPoint(b, p) for b, p in sorted(peaks.items())),
        advice=advice,
        noise_scale=None if noise is None else noise.to_dict(),
        **({} if prof is None else profile_fields(prof)),
        world_size=ranks.world_size,
        accumulation_steps=plan["accumulation_steps"],
        global_batch_size=plan["micro_batch"] * ranks.world_size * plan["accumulation_steps"],
        data=None if scan is None else scan.to_dict(),
    )
    if store is not None and result.complete and (not profile or (prof and prof.complete)):
        store.put(key, result, description)
    return result
