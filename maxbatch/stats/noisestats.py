"""The gradient noise scale's record and estimators (pure arithmetic on squared norms).

``B_simple = tr(Σ) / |G|²`` (Σ: the per-sample gradient covariance, G: the true gradient), from
McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A: gradients at a
small and a big batch size give unbiased estimates of ``|G|²`` and ``tr(Σ)``. Here a draw is
``k`` micro-batches of ``b_small`` samples; their gradients give the small-batch norm (the mean of
their squared norms) and their mean the big-batch norm (``b_big = k * b_small``), in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch

from maxbatch.answers import NoiseScale as NoiseScale  # re-exported: its home moved down
from maxbatch.devicekinds import kind_of
from maxbatch.errors import ConfigError, WorkloadError

#: Micro-batches per draw by default: the big batch is this many small ones.
ACCUMULATION = 8

#: The statement every report of the noise scale carries.
GROWS_NOTE = (
    "B_simple is measured at the current weights; it grows as training proceeds (often by "
    "10x or more), so measure it again later in training (maxbatch.NoiseScaleTracker)"
)


Num = TypeVar("Num", float, torch.Tensor)


def two_batch_estimates(
    small_sq: Num, big_sq: Num, b_small: float, b_big: float
) -> tuple[Num, Num]:
    """The unbiased ``(|G|², tr(Σ))`` from squared gradient norms at two batch sizes.

    ``E|G_B|² = |G|² + tr(Σ)/B`` for a mean over ``B`` independent samples, so (appendix A)
    ``|G|² ≈ (b_big·|G_big|² − b_small·|G_small|²) / (b_big − b_small)`` and
    ``tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/b_small − 1/b_big)``.

    Args:
        small_sq: ``|G_small|²`` (or the mean of several, which is as unbiased); a float or a
            0-dim tensor (then the estimates are too).
        big_sq: ``|G_big|²``, of the same type.
        b_small: the small batch size (for unequal micro-batches: their harmonic mean).
        b_big: the big batch size, larger than ``b_small``.

    Returns:
        The estimates of ``|G|²`` and ``tr(Σ)``.
    """
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return grad_sq, trace


def ratio_with_error(
    trace: float, grad_sq: float, var_trace: float, var_grad: float, cov: float, n: float
) -> tuple[float, float]:
    """``trace / grad_sq`` and its delta-method standard error from ``n`` draws' moments.

    Args:
        trace: the mean of the ``tr(Σ)`` estimates.
        grad_sq: the mean of the ``|G|²`` estimates.
        var_trace: the variance of one draw's ``tr(Σ)`` estimate.
        var_grad: the variance of one draw's ``|G|²`` estimate.
        cov: their covariance.
        n: the number of draws (or the effective number).

    Returns:
        The ratio (``inf`` when ``grad_sq <= 0``) and its standard error.
    """
    if not grad_sq > 0:
        return math.inf, math.inf
    r = trace / grad_sq
    var = (var_trace - 2 * r * cov + r * r * var_grad) / (grad_sq * grad_sq * n)
    return r, math.sqrt(max(var, 0.0))


def combine(
    grad_sqs: Sequence[float],
    traces: Sequence[float],
    *,
    b_small: int,
    b_big: int,
    notes: Sequence[str] = (),
) -> NoiseScale:
    """Average the draws' estimates and take the ratio of the averages, as the paper does.

    Args:
        grad_sqs: each draw's ``|G|²`` estimate.
        traces: each draw's ``tr(Σ)`` estimate.
        b_small: the small batch size.
        b_big: the big batch size.
        notes: notes to carry.

    Returns:
        The :class:`NoiseScale`, with a delta-method standard error over the draws.

    Raises:
        ConfigError: fewer than two draws, or the two sequences differ in length.
    """
    n = len(grad_sqs)
    if n < 2 or len(traces) != n:
        raise ConfigError(f"the noise scale needs at least 2 draws of both estimates, got {n}")
    g = sum(grad_sqs) / n
    s = sum(traces) / n
    var_g = sum((x - g) ** 2 for x in grad_sqs) / (n - 1)
    var_s = sum((x - s) ** 2 for x in traces) / (n - 1)
    cov = sum((x - s) * (y - g) for x, y in zip(traces, grad_sqs, strict=True)) / (n - 1)
    ratio, error = ratio_with_error(s, g, var_s, var_g, cov, n)
    extra = () if g > 0 else (_NO_SIGNAL,)
    return NoiseScale(
        b_simple=ratio,
        std_error=error,
        trace_cov=s,
        grad_sq_norm=g,
        b_small=b_small,
        b_big=b_big,
        draws=n,
        notes=tuple(notes) + extra,
    )


def check_finite(
    draw: int, b_small: int, loss_finite: bool, small_sq: float, big_sq: float
) -> None:
    """Refuse a draw whose losses or gradients are not finite (they would read as "no signal").

    Raises:
        WorkloadError: a loss, or a gradient, of draw ``draw`` was NaN or infinite.
    """
    if not loss_finite:
        what = "the loss was NaN or infinite"
    elif not (math.isfinite(small_sq) and math.isfinite(big_sq)):
        what = "the gradient was NaN or infinite (the loss was finite)"
    else:
        return
    raise WorkloadError(
        f"cannot measure the noise scale: {what} in draw {draw} (micro-batches of {b_small} "
        "samples); the noise scale needs finite losses and gradients at the current weights: "
        "check the data (NaN inputs, bad labels) and the model's numerics",
        batch_size=b_small,
    )


_NO_SIGNAL = (
    "the gradient's squared norm was not above its noise (estimate <= 0): the noise scale is "
    "larger than these draws can resolve; use more batches or a larger b_big"
)


def norm(t: torch.Tensor) -> torch.Tensor:
    """The norm of ``t`` in one kernel (float32 for half precision: its square would overflow)."""
    result: torch.Tensor = torch.linalg.vector_norm(
        t, dtype=torch.float32 if t.element_size() < 4 else None
    )
    return result


def sum_of_squares(norms: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``Σ n²`` over 0-dim ``norms`` as one ``dtype`` scalar: a stack per dtype, no host sync."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for n in norms:
        by_dtype.setdefault(n.dtype, []).append(n)
    parts = [torch.stack(ns).to(dtype).square().sum() for ns in by_dtype.values()]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def squared_norm(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum of the squared norms of ``tensors`` as one ``dtype`` scalar (no host sync)."""
    return sum_of_squares([norm(t) for t in tensors], dtype)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for the norms' sums, except on a kind that has none (MPS)."""
    return torch.float64 if kind_of(device).float64 else torch.float32


def few_samples_note(rows: int) -> str:
    """Why no global batch is suggested from a noise scale of ``rows`` samples, and what to give."""
    return (
        f"no global batch suggested: the noise scale was measured on {rows} samples, fewer than "
        "one draw, so its critical batch is not your data's; give `dataset` or `make_batch` in "
        "the model file (the library: a data set or make_batch) for one"
    )
