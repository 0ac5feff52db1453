"""``noise_scale``: measure the gradient noise scale of a model on its data, leaving it untouched.

Each draw runs ``k`` forward/backward passes on independent micro-batches of ``b_small`` samples,
keeping the squared norm of each micro-batch gradient and the running sum of the gradients (one
parameter-sized buffer on the device); the estimators are in :mod:`maxbatch.stats.noisestats`. No
optimizer step is taken, and parameters, gradients, buffers, training flags and RNG states are
restored afterwards (:mod:`maxbatch.step.snapshot`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch

from maxbatch.devicekinds import kind_of
from maxbatch.errors import ConfigError, DoesNotFitError, MaxbatchError, WorkloadError
from maxbatch.grid import positive_int
from maxbatch.stats.draws import Draw, check_random, random_batches
from maxbatch.stats.noisestats import (
    ACCUMULATION,
    NoiseScale,
    accumulator_dtype,
    check_finite,
    combine,
    squared_norm,
    two_batch_estimates,
)
from maxbatch.step.batching import map_tensors
from maxbatch.step.oom import is_oom, release_memory
from maxbatch.step.snapshot import Snapshot
from maxbatch.step.spec import ForwardFn, LossFn
from maxbatch.step.workload import default_forward, default_loss, to_device

log = logging.getLogger(__name__)

#: The micro-batch size when none is given (capped by ``max_batch_size``).
SMALL_BATCH = 32


def _loss(model: torch.nn.Module, batch: Any, forward: ForwardFn, loss_fn: LossFn) -> torch.Tensor:
    loss = loss_fn(forward(model, batch), batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
        raise WorkloadError(f"the loss must be a scalar tensor, got {type(loss).__name__}{shape}")
    return loss


def _check_mean(
    model: torch.nn.Module, batch: Any, forward: ForwardFn, loss_fn: LossFn
) -> str | None:
    """Raise when the loss doubles on the batch repeated twice: a sum, not a mean over samples.

    Returns:
        None, or a note when the check could not be made.

    Raises:
        ConfigError: the loss is a sum over samples.
    """
    twice = map_tensors(batch, lambda t: torch.cat([t, t]))
    try:  # with autograd on: a default loss looks for outputs that require grad
        once_value = float(_loss(model, batch, forward, loss_fn).detach())
        twice_value = float(_loss(model, twice, forward, loss_fn).detach())
    except Exception as e:  # noqa: BLE001 - a courtesy check: a batch that cannot be doubled skips it
        return f"could not check that the loss is a mean over samples ({type(e).__name__})"
    if once_value != 0 and abs(twice_value / once_value - 2) < abs(twice_value / once_value - 1):
        raise ConfigError(
            f"the loss went from {once_value:.4g} to {twice_value:.4g} when every sample of the "
            "batch was repeated: it is a sum over samples, but the noise scale needs a mean; "
            "use reduction='mean' or divide by the batch size"
        )
    return None


def _draw(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    total: list[torch.Tensor],
    batches: Iterator[Any],
    forward: ForwardFn,
    loss_fn: LossFn,
) -> tuple[float, float, bool]:
    """The mean squared norm of the micro-batch gradients and the squared norm of their mean.

    ``batches`` is drawn lazily: one micro-batch is on the device at a time.

    Returns:
        The mean squared micro-batch gradient norm, the squared norm of their mean, and
        whether every loss was finite.
    """
    dtype = accumulator_dtype(total[0].device)
    small = torch.zeros((), dtype=dtype, device=total[0].device)
    for t in total:
        t.zero_()
    finite = torch.ones((), dtype=torch.bool, device=total[0].device)
    k = 0
    for batch in batches:
        k += 1
        for p in params:
            p.grad = None
        loss = _loss(model, batch, forward, loss_fn)
        finite &= torch.isfinite(loss.detach()).all()  # checked once per draw: no sync here
        loss.backward()  # type: ignore[no-untyped-call]
        grads = [p.grad for p in params if p.grad is not None]
        small += squared_norm(grads, dtype)
        for p, t in zip(params, total, strict=True):
            if p.grad is not None:
                t.add_(p.grad)
        del batch
    return float(small) / k, float(squared_norm(total, dtype)) / (k * k), bool(finite)


def _measure(
    model: torch.nn.Module,
    draw: Draw,
    batches: int,
    k: int,
    b_small: int,
    forward: ForwardFn,
    loss_fn: LossFn,
) -> tuple[list[float], list[float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    total = [torch.zeros_like(p) for p in params]
    grad_sqs, traces = [], []
    for i in range(batches):
        micro = (to_device(draw(b_small), device) for _ in range(k))
        small_sq, big_sq, finite = _draw(model, params, total, micro, forward, loss_fn)
        check_finite(i + 1, b_small, finite, small_sq, big_sq)
        g, s = two_batch_estimates(small_sq, big_sq, b_small, k * b_small)
        log.debug("noise scale draw %s: |G|^2 %.4g, tr(S) %.4g", i + 1, g, s)
        grad_sqs.append(g)
        traces.append(s)
    return grad_sqs, traces


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


def _attempt(
    model: torch.nn.Module,
    draw: Draw,
    batches: int,
    k: int,
    small: int,
    forward: ForwardFn,
    loss: LossFn,
) -> tuple[str | None, list[float], list[float]] | None:
    """The mean-loss check and the draws at micro-batch ``small``; None after running out of memory.

    Returns:
        The check's note, and each draw's ``|G|²`` and ``tr(Σ)`` estimates; None on an OOM.

    Raises:
        MaxbatchError: raised inside (a sum loss, say), unchanged.
        WorkloadError: the step failed for another reason than memory (chained).
    """
    device = next(p for p in model.parameters() if p.requires_grad).device
    try:
        # Half a micro-batch, so that the batch repeated twice fits as the draws do.
        half = to_device(draw(max(1, small // 2)), device)
        check = _check_mean(model, half, forward, loss)
        del half
        return (check, *_measure(model, draw, batches, k, small, forward, loss))
    except MaxbatchError:
        raise
    except Exception as e:
        if not is_oom(e):
            raise WorkloadError(
                f"the step failed while measuring the noise scale at micro-batch {small}: "
                f"{type(e).__name__}: {e}",
                batch_size=small,
            ) from e
    return None  # the traceback (and the failed micro-batch) dies with ``e``


def noise_scale(
    model: torch.nn.Module,
    data: Any,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    batches: int = 20,
    *,
    b_small: int | None = None,
    b_big: int | None = None,
    max_batch_size: int | None = None,
    seed: int | None = 0,
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
        data: what :func:`maxbatch.find_batch_size` takes: one batch (random rows of it are
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

    Returns:
        A :class:`~maxbatch.stats.noisestats.NoiseScale`. After an out-of-memory error the
        micro-batch is halved and the measurement starts again (a note says so).

    Raises:
        ConfigError: an option is invalid, the model has no trainable parameters, or the loss
            is a sum over samples.
        DoesNotFitError: a micro-batch of one sample does not fit.
        WorkloadError: the forward pass or the loss failed (chained).
        MaxbatchError: raised by maxbatch inside the step, unchanged.
    """
    small, big = _sizes(batches, b_small, b_big, max_batch_size)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters: there is no gradient to measure")
    k = big // small
    forward, loss = forward_fn or default_forward, loss_fn or default_loss
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    snapshot = Snapshot.take(model, None)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        draw, rows = random_batches(data, generator)
        device = next(p for p in model.parameters() if p.requires_grad).device
        if draw is data:  # on forked RNGs: the draws are those of a run without the check
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
        while (measured := _attempt(model, draw, batches, k, small, forward, loss)) is None:
            # Outside the except block: the exception's frames no longer hold the batch.
            release_memory(device)
            if small == 1:
                raise DoesNotFitError(
                    "a micro-batch of 1 sample ran out of memory while measuring the noise scale",
                    batch_size=1,
                    needed_bytes=0,
                    available_bytes=0,
                )
            notes.append(f"micro-batch {small} ran out of memory; measured at {small // 2}")
            small //= 2
        check, grad_sqs, traces = measured
        estimate = combine(
            grad_sqs,
            traces,
            b_small=small,
            b_big=k * small,
            notes=notes + ([check] if check else []),
        )
        return dataclasses.replace(estimate, data_rows=few)
    finally:
        for p in model.parameters():
            p.grad = None
        snapshot.restore(final=True)
