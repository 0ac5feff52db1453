"""``noise_scale``: measure the gradient noise scale of a model on its data, leaving it untouched.

Each draw runs ``k`` forward/backward passes on independent micro-batches of ``b_small`` samples,
keeping the squared norm of each micro-batch gradient and the running sum of the gradients (one
parameter-sized buffer on the device); the estimators are in :mod:`maxbatch.stats.noisestats`. No
optimizer step is taken, and parameters, gradients, buffers, training flags and RNG states are
restored afterwards (:mod:`maxbatch.step.snapshot`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from maxbatch.devicekinds import kind_of
from maxbatch.errors import ConfigError, DoesNotFitError
from maxbatch.grid import positive_int
from maxbatch.settings import Precision, parse_enum
from maxbatch.stats.draws import check_random, random_batches
from maxbatch.stats.noiserun import measure_at
from maxbatch.stats.noisestats import ACCUMULATION, NoiseScale, combine
from maxbatch.step.forward import (
    StepHooks,
)
from maxbatch.step.oom import release_memory
from maxbatch.step.retry import lower_after_oom
from maxbatch.step.snapshot import Snapshot
from maxbatch.step.spec import ForwardFn, LossFn

#: The micro-batch size when none is given (capped by ``max_batch_size``).
SMALL_BATCH = 32


def _sizes(
    batches: int, b_small: int | None, b_big: int | None, max_batch_size: int | None
) -> tuple[int, int]:
    """The micro-batch and the draw's size, checked.

    Returns:
        ``(b_small, b_big)``.

    Raises:
        ConfigError: a size is invalid.
    """
    if positive_int(batches, "batches") < 2:
        raise ConfigError(f"batches={batches} must be at least 2 (the standard error needs two)")
    cap = None if max_batch_size is None else positive_int(max_batch_size, "max_batch_size")
    small = min(SMALL_BATCH, cap or SMALL_BATCH) if b_small is None else b_small
    small = positive_int(small, "b_small")
    big = positive_int(ACCUMULATION * small if b_big is None else b_big, "b_big")
    if cap is not None and small > cap:
        raise ConfigError(f"b_small={small} is above max_batch_size={cap}, the largest that fits")
    if big % small or big < 2 * small:
        raise ConfigError(f"b_big={big} must be a multiple of b_small={small}, at least twice it")
    return small, big


def noise_scale(
    model: torch.nn.Module,
    sample: Any = None,
    *args: Any,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    batches: int = 20,
    b_small: int | None = None,
    b_big: int | None = None,
    max_batch_size: int | None = None,
    seed: int | None = 0,
    precision: Precision | str = Precision.FP32,
    **kwargs: Any,
) -> NoiseScale:
    """Estimate the simple gradient noise scale ``B_simple = tr(Σ) / |G|²`` at the current weights.

    The loss must be a **mean over the samples of the batch** (as ``reduction="mean"`` gives):
    the estimators rest on the gradient of ``B`` samples having ``1/B`` of one sample's variance.
    A loss that doubles when every sample is repeated (a sum) is refused. The gradients are the
    training ones (``model.train()``, dropout on); batch norm makes a sample's gradient depend on
    its batch, which the estimate then includes. ``B_simple`` grows during training: it holds at
    these weights.

    Args:
        model: the model, on its device.
        sample: what :func:`maxbatch.find_batch_size` takes: one batch (random rows of it are
            drawn, with replacement), a ``make_batch(batch_size)`` that returns random samples,
            a map-style ``Dataset`` or a ``DataLoader`` (random items of its data set, through
            its ``collate_fn``).
        loss_fn: ``loss_fn(output, batch)``, a mean over samples; default as for the probe.
        forward_fn: ``forward_fn(model, batch)``; default as for the probe.
        batches: draws to average (at least 2); each is ``b_big / b_small`` forward and
            backward passes of ``b_small`` samples.
        b_small: samples per micro-batch (default 32, at most ``max_batch_size``).
        b_big: samples per draw, a multiple of ``b_small`` of at least twice it (default 8x).
        max_batch_size: the largest batch that fits (the probe's ceiling), when known.
        seed: seeds the draws (and the global RNG for a ``make_batch``; every RNG is restored
            afterwards); None: draw from the RNGs as they are.
        precision: ``"fp32"`` (default: no autocast), ``"bf16"`` or ``"fp16"``: the forward
            and the loss run under autocast, as the probe's step does.
        *args: the old spelling ``noise_scale(model, data, loss_fn, forward_fn, batches)``,
            deprecated: give them by keyword (a ``DeprecationWarning``; removed in the next
            release).
        **kwargs: ``data=``, the old name of ``sample`` (deprecated as well).

    Returns:
        A :class:`~maxbatch.stats.noisestats.NoiseScale`. After an out-of-memory error the
        micro-batch is halved and the measurement starts again (a note says so).

    Raises:
        TypeError: an argument is given twice (by position and by keyword) or is unknown.
        ConfigError: an option is invalid, the model has no trainable parameters, or the loss
            is a sum over samples.
        DoesNotFitError: a micro-batch of one sample does not fit.
        WorkloadError: the forward pass or the loss failed (chained).
        MaxbatchError: raised by maxbatch inside the step, unchanged.
    """
    if args or kwargs:
        sample, loss_fn, forward_fn, batches = _old_spelling(
            args, kwargs, sample, loss_fn=loss_fn, forward_fn=forward_fn, batches=batches
        )
    small, big = _sizes(batches, b_small, b_big, max_batch_size)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters: there is no gradient to measure")
    hooks = StepHooks.build(
        forward_fn=forward_fn,
        loss_fn=loss_fn,
        precision=parse_enum(Precision, precision, "precision"),
    )
    snapshot = Snapshot.take(model, None)
    try:
        return _noise_scale(model, sample, hooks, batches=batches, small=small, big=big, seed=seed)
    finally:
        for p in model.parameters():
            p.grad = None
        snapshot.restore(final=True)


def _old_spelling(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    sample: Any,
    *,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    batches: int,
) -> tuple[Any, LossFn | None, ForwardFn | None, int]:
    """The arguments of the old spelling, with a ``DeprecationWarning``.

    Returns:
        ``sample``, ``loss_fn``, ``forward_fn`` and ``batches``.

    Raises:
        TypeError: too many positional arguments, one given twice, or an unknown keyword.
    """
    unknown = set(kwargs) - {"data"}
    if unknown or len(args) > 3:
        what = f"unexpected keyword {sorted(unknown)[0]!r}" if unknown else "too many arguments"
        raise TypeError(f"noise_scale() got {what}")
    if "data" in kwargs:
        if sample is not None:
            raise TypeError("noise_scale() got both sample and data (its old name)")
        sample = kwargs["data"]
    given: dict[str, Any] = {"loss_fn": loss_fn, "forward_fn": forward_fn, "batches": batches}
    defaults: dict[str, Any] = {"loss_fn": None, "forward_fn": None, "batches": 20}
    for name, value in zip(("loss_fn", "forward_fn", "batches"), args, strict=False):
        if given[name] is not defaults[name] and given[name] != defaults[name]:
            raise TypeError(f"noise_scale() got {name} by position and by keyword")
        given[name] = value
    warnings.warn(
        "noise_scale(model, data, loss_fn, forward_fn, batches) is deprecated: call "
        "noise_scale(model, sample, *, loss_fn=..., forward_fn=..., batches=...); "
        "the old spelling goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return sample, given["loss_fn"], given["forward_fn"], given["batches"]


def _noise_scale(
    model: torch.nn.Module,
    sample: Any,
    hooks: StepHooks,
    *,
    batches: int,
    small: int,
    big: int,
    seed: int | None,
) -> NoiseScale:
    """The measurement of :func:`noise_scale` (which restores the model afterwards).

    Returns:
        The estimate.

    Raises:
        DoesNotFitError: a micro-batch of one sample does not fit.
    """
    k = big // small
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
        torch.manual_seed(seed)
    draw, rows = random_batches(sample, generator)
    device = next(p for p in model.parameters() if p.requires_grad).device
    if draw is sample:  # on forked RNGs: the draws are those of a run without the check
        with torch.random.fork_rng([device] if kind_of(device).own_rng else []):
            check_random(draw)
    notes: list[str] = []
    few = rows if rows is not None and rows < big else None
    if few is not None:
        notes.append(
            f"the data holds {few} samples, fewer than the {big} of one draw: this is the "
            "noise of those samples only, not of your data; for your data's, give a data set "
            "or make_batch (in a model file: `dataset` or `make_batch`, not `sample`)"
        )
    model.train()
    while (measured := measure_at(model, draw, batches, k, small, hooks)) is None:
        # Outside the except block: the exception's frames no longer hold the batch.
        release_memory(device)
        lower = lower_after_oom(small)
        if lower is None:
            raise DoesNotFitError(
                "a micro-batch of 1 sample ran out of memory while measuring the noise scale",
                batch_size=1,
                needed_bytes=0,
                available_bytes=0,
            )
        notes.append(f"micro-batch {small} ran out of memory; measured at {lower}")
        small = lower
    check, grad_sqs, traces = measured
    estimate = combine(
        grad_sqs,
        traces,
        b_small=small,
        b_big=k * small,
        notes=notes + ([check] if check else []),
    )
    return dataclasses.replace(estimate, data_rows=few)
