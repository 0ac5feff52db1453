"""One measurement of the noise scale at one micro-batch size: the draws and the mean-loss check.

Each draw runs ``k`` forward/backward passes (:class:`~maxbatch.step.forward.StepHooks`) on
independent micro-batches of ``b_small`` samples, keeping the squared norm of each micro-batch
gradient and the running sum of the gradients (one parameter-sized buffer on the device); the
estimators are in :mod:`maxbatch.stats.noisestats`. :func:`measure_at` returns None after an
out-of-memory error, so that :func:`~maxbatch.stats.noise.noise_scale` lowers the size outside
the ``except`` block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from maxbatch.errors import ConfigError, MaxbatchError, WorkloadError
from maxbatch.stats.draws import Draw
from maxbatch.stats.noisestats import (
    accumulator_dtype,
    check_finite,
    squared_norm,
    two_batch_estimates,
)
from maxbatch.step.batching import map_tensors
from maxbatch.step.forward import StepHooks, to_device
from maxbatch.step.oom import is_oom

__all__ = ["measure_at"]

log = logging.getLogger("maxbatch.stats.noise")


def _check_mean(model: torch.nn.Module, batch: Any, hooks: StepHooks) -> str | None:
    """Raise when the loss doubles on the batch repeated twice: a sum, not a mean over samples.

    Returns:
        None, or a note when the check could not be made.

    Raises:
        ConfigError: the loss is a sum over samples.
    """
    twice = map_tensors(batch, lambda t: torch.cat([t, t]))
    try:  # with autograd on: a default loss looks for outputs that require grad
        once_value = float(hooks.forward_loss(model, batch)[1].detach())
        twice_value = float(hooks.forward_loss(model, twice)[1].detach())
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
    hooks: StepHooks,
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
        _, loss = hooks.forward_backward(model, batch)
        finite &= torch.isfinite(loss.detach()).all()  # checked once per draw: no sync here
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
    hooks: StepHooks,
) -> tuple[list[float], list[float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    total = [torch.zeros_like(p) for p in params]
    grad_sqs, traces = [], []
    for i in range(batches):
        micro = (to_device(draw(b_small), device) for _ in range(k))
        small_sq, big_sq, finite = _draw(model, params, total, micro, hooks)
        check_finite(i + 1, b_small, finite, small_sq, big_sq)
        g, s = two_batch_estimates(small_sq, big_sq, b_small, k * b_small)
        log.debug("noise scale draw %s: |G|^2 %.4g, tr(S) %.4g", i + 1, g, s)
        grad_sqs.append(g)
        traces.append(s)
    return grad_sqs, traces


def measure_at(
    model: torch.nn.Module,
    draw: Draw,
    batches: int,
    k: int,
    small: int,
    hooks: StepHooks,
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
        check = _check_mean(model, half, hooks)
        del half
        return (check, *_measure(model, draw, batches, k, small, hooks))
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
