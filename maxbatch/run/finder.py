"""``find_batch_size``: the keywords become records, then the stages run over them.

validate (:mod:`maxbatch.step.spec`: one record per stage) -> measure (:mod:`maxbatch.run.stages`:
capacity, ranks, the result cache, the ceiling search, the profiler) -> the noise scale ->
assemble -> advise -> keep the answer (:mod:`maxbatch.run.lookup`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maxbatch.devices.device import device_label, require_weights, resolve_device
from maxbatch.errors import ConfigError
from maxbatch.grid import Grid
from maxbatch.results import BatchSizeResult, Throughput, Trial
from maxbatch.run import answer, stages
from maxbatch.run.distributed import join
from maxbatch.run.lookup import keep_answer
from maxbatch.run.request import Request
from maxbatch.run.unfinished import ProfileInterrupted
from maxbatch.settings import (
    TOLERANCE,
    AdviceSettings,
    MemorySettings,
    Mode,
    Precision,
    ProfileSettings,
    SearchSettings,
)
from maxbatch.stats.advise import check_even_split
from maxbatch.step.loop import Loop
from maxbatch.step.spec import (
    ForwardFn,
    LossFn,
    OptimizerArg,
    StepSpec,
    TrainStepFn,
    check_noise_scale,
)


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
    max_trials: int | None = None,
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
    zero_grad: str = "before_forward",
    accumulate: int = 1,
    allow_growth: str | int | None = None,
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
        max_trials: trials after which the ceiling search stops with the best verified size
            (the result is then not ``complete``; the first size that fits is always found).
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
            (:mod:`maxbatch.estimate.estimate`), so that a right prediction needs two verifying
            trials. None (default): only on a CUDA device, where a real trial near the ceiling takes
            seconds and an out-of-memory one flushes the caching allocator, while the fake trials
            run cheaply on the host. Where the trials are counted (the virtual device, the CPU, MPS)
            their traces, operator by operator, predict the ceiling from the first trial, so three
            trials (the fewest that verify a ceiling) are the rule and fake trials (each costs
            several real steps of a small model) save nothing. True or False forces it. When it
            gives no guess (the model cannot be deep-copied, the step needs tensor values, nothing
            fits), a note says why and the search starts as without it.
        noise_scale: also measure the gradient noise scale (:func:`maxbatch.noise_scale`, on
            ``sample``, micro-batches at most the pick; the loss must be a mean over samples):
            the result's ``noise_scale``, and advice for a global batch near the critical batch.
            It depends on the weights, which the result cache does not key: no cache with it.
        extra_state: more state your ``train_step`` changes, restored in place after every
            trial: tensors, modules (an EMA copy), optimizers, ``GradScaler`` objects, and objects
            with ``state_dict()`` and ``load_state_dict()``. A ``GradScaler`` that ``train_step``
            uses as a global or closure variable is restored without being listed.
        distributed: agree with the other ranks of the ``torch.distributed`` process group
            (:mod:`maxbatch.run.distributed`): every rank probes its own device, runs the same
            sizes, and a size fits only if it fit on every rank; all return the same result.
            None (default): when a group with more than one rank is initialised; True: require
            one; False: this process alone. ``global_batch`` is then over all ranks.
        cache: look the answer up in the result cache (:mod:`maxbatch.store.cache`, under
            ``$XDG_CACHE_HOME/maxbatch``) and store it there; a hit is checked by running the
            cached ceiling and the size above it. Default False here (the CLI caches by
            default); not used under ``torch.distributed``.
        trust_cache: use a hit without the check.
        zero_grad: where your loop clears gradients: ``"before_forward"`` (default, the plain
            PyTorch loop), ``"before_backward"`` (Lightning: the previous step's gradients live
            through the next forward) or ``"after_step"`` (the Hugging Face Trainer). A trial
            runs the loop's steady state in that order (the result's ``steady_state``).
        accumulate: micro-batches per optimizer step in your loop (gradient accumulation): a
            trial accumulates this many, so the running gradient is alive while the next
            micro-batch's backward makes its own. A ``global_batch`` that needs more than one
            micro-batch gets its micro-batch from an accumulating trial anyway.
        allow_growth: live bytes a step may keep on purpose (``"1MiB"``), e.g. a bounded cache
            that fills over the first steps; steps at one size whose live bytes keep growing by
            more stop the probe with a :class:`~maxbatch.errors.LeakError` (default 0).

    Returns:
        A :class:`~maxbatch.results.BatchSizeResult`.

    Raises:
        ConfigError: an option is invalid, or the model is on the meta device (no weights: only
            :func:`~maxbatch.estimate_batch_size` runs such a model).
        DeviceError: the device is not available.
        DoesNotFitError: the smallest batch size does not fit.
        WorkloadError: the step failed for a reason other than memory.
        LeakError: steps at one size kept growing the live bytes (more than ``allow_growth``).
        DistributedError: another rank failed (:class:`~maxbatch.errors.RankFailedError`, with
            its message), died, or did not answer within the process group's timeout.
        ProfileInterrupted: Ctrl-C or SIGTERM while the step was timed (a ``KeyboardInterrupt``):
            its ``result`` holds the verified ceiling, which is also cached.
    """
    require_weights(model)  # before a data set is scanned: nothing can run without weights
    request = Request(
        started=time.perf_counter(),
        search=SearchSettings(
            grid=Grid.build(
                min_batch_size=min_batch_size,
                max_batch_size=max_batch_size,
                multiple_of=multiple_of,
            ),
            time_budget=time_budget,
            max_trials=max_trials,
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
            loop=Loop.build(zero_grad=zero_grad, accumulate=accumulate, allow_growth=allow_growth),
        ),
        device=_device(model, device),
        ranks=join(distributed),
    )
    try:
        check_even_split(global_batch, request.ranks.world_size)
        check_noise_scale(request.advice, request.step)
        measured = stages.measure(request)
    except BaseException as e:
        request.ranks.share(e)  # before raising, so that no other rank waits for this one
        raise
    if isinstance(measured, BatchSizeResult):
        return measured  # a cached answer that held
    request.ranks.done()
    return _finish(request, measured)


def _finish(request: Request, measured: stages.Measured) -> BatchSizeResult:
    """The noise scale, the result and its advice, kept in the cache.

    Returns:
        The result.

    Raises:
        ProfileInterrupted: Ctrl-C or SIGTERM stopped the profiler (the result is its ``result``).
    """
    stop = measured.picked.interrupted
    noise = None if stop is not None else stages.noise(request, measured)
    result = answer.advise(request, answer.assemble(request, measured, noise))
    keep_answer(
        request, measured.lookup, result, profiled=measured.picked.profiled, interrupted=stop
    )
    if stop is not None:  # the ceiling is an answer: the caller gets it with the interrupt
        raise ProfileInterrupted(result, terminated=stop.terminated)
    return result


def _device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to probe: ``device``, else where the model is; the model must be there.

    Returns:
        The device, resolved.

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
