"""``NoiseScaleTracker``: the noise scale during training, from the micro-batches of accumulation.

A loop that accumulates gradients over micro-batches already computes what the two-batch
estimators need: each micro-batch's gradient is a small batch, their sum in ``.grad`` the big one.
The tracker reads the first with a gradient hook on every parameter (one squared norm per
parameter per backward, added on the device: no copy of the gradients, no host sync) and the
second from ``.grad`` once per optimizer step, and keeps exponential moving averages of the
estimates, as McCandlish et al. 2018 (appendix A) suggest.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from types import TracebackType

import torch

from maxbatch.errors import ConfigError
from maxbatch.grid import positive_int
from maxbatch.stats.noisestats import (
    NoiseScale,
    accumulator_dtype,
    norm,
    ratio_with_error,
    squared_norm,
    sum_of_squares,
    two_batch_estimates,
)
from maxbatch.train.microstep import MicroStep

#: The moving averages' decay per optimizer step.
BETA = 0.99


class NoiseScaleTracker:
    """Track ``B_simple`` during training as a moving average over optimizer steps.

    Use it in a single-process loop with gradient accumulation (two micro-batches or more per
    optimizer step), where each micro-batch's loss is a mean over its samples::

        tracker = maxbatch.NoiseScaleTracker(model)
        for batch in loader:
            for micro in batch.split(micro_batch):
                weight = len(micro) / len(batch)
                (loss_fn(model(micro)) * weight).backward()
                tracker.micro_batch(len(micro), weight)
            tracker.step()                    # after the last backward, before clipping
            optimizer.step()
            optimizer.zero_grad()
        print(tracker.estimate())

    Gradients must be zero (or None) when a step's first micro-batch starts, and each
    micro-batch's weight proportional to its size (so that ``.grad`` is the mean over the batch,
    up to a common factor). Under a ``GradScaler``, multiply the weight by the scale.

    Args:
        model: the model, or its parameters.
        beta: the moving averages' decay per measured step (0.99: about the last 100).
        every: measure one optimizer step in ``every`` (the first, then every ``every``-th):
            the cost, one norm per parameter per micro-batch, falls by that factor; on the
            other steps the hooks return at once.

    Raises:
        ConfigError: ``beta`` is not in [0, 1), ``every`` is not a positive integer, or there is
            no trainable parameter.
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.nn.Parameter],
        *,
        beta: float = BETA,
        every: int = 1,
    ):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ConfigError(f"beta={beta!r} must be a number in [0, 1)")
        self.every = positive_int(every, "every")
        self._calls = 0  # optimizer steps seen, measured or not
        source = model.parameters() if isinstance(model, torch.nn.Module) else model
        self.params = [p for p in source if p.requires_grad]
        if not self.params:
            raise ConfigError("the tracker found no trainable parameter: nothing to measure")
        self.beta = float(beta)
        device = self.params[0].device
        self._dtype = accumulator_dtype(device)
        # The norms of the backward that ran last, by parameter: a backward that an
        # out-of-memory error cut short leaves some, which the next one overwrites.
        self._norms: dict[int, torch.Tensor] = {}
        # This step's micro-batch gradient norms, by their weight (usually one weight).
        self._micro: dict[float, list[torch.Tensor]] = {}
        # Moving averages of |G|², tr(Σ), their squares and product (for the standard error).
        self._moments = torch.zeros(5, dtype=self._dtype, device=device)
        self._sizes: list[int] = []
        self._weights: list[float] = []
        self.steps = 0
        self._last = (0.0, 0)
        self._handles = [
            p.register_hook(functools.partial(self._on_grad, i))  # type: ignore[no-untyped-call]
            for i, p in enumerate(self.params)
        ]

    @property
    def _active(self) -> bool:
        return self._calls % self.every == 0

    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        if self._active:
            self._norms[index] = norm(grad)  # one kernel per parameter per backward

    def micro_batch(self, batch_size: int, weight: float = 1.0) -> None:
        """Close the micro-batch whose backward just ran.

        Args:
            batch_size: its samples.
            weight: the factor its mean loss was multiplied by before ``backward()``.

        Raises:
            ConfigError: a value is not positive.
        """
        positive_int(batch_size, "batch_size")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ConfigError(f"weight={weight!r} must be a positive number")
        if not self._active:
            return
        if not self._norms:
            raise ConfigError("micro_batch() was called, but no gradient reached the parameters")
        self._micro.setdefault(float(weight), []).extend(self._norms.values())
        self._norms = {}
        self._sizes.append(batch_size)
        self._weights.append(float(weight))

    def step(self) -> None:
        """Turn this optimizer step's micro-batches into one draw and update the averages.

        On a step that ``every`` skips, only counts it.

        Raises:
            ConfigError: fewer than two micro-batches, or weights not proportional to sizes.
        """
        active = self._active
        self._calls += 1
        sizes, weights = self._sizes, self._weights
        self._sizes, self._weights = [], []
        micro, self._micro = self._micro, {}
        self._norms = {}
        if not active:
            return
        if len(sizes) < 2:
            raise ConfigError(
                f"the tracker needs two micro-batches or more per optimizer step, got "
                f"{len(sizes)}: call micro_batch() after each micro-batch's backward"
            )
        ratios = [w / b for w, b in zip(weights, sizes, strict=True)]
        if max(ratios) > min(ratios) * (1 + 1e-6):
            raise ConfigError(
                f"micro-batch weights {weights} are not proportional to their sizes {sizes}: "
                "weigh each mean loss by its share of the batch"
            )
        k, b_big = len(sizes), sum(sizes)
        b_small = k / sum(1 / b for b in sizes)  # harmonic mean: E[mean |g_i|²] uses mean 1/b_i
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise ConfigError("no parameter has a gradient: call step() before zero_grad()")
        big_sq = squared_norm(grads, self._dtype) / sum(weights) ** 2
        small_sum = sum(
            (sum_of_squares(norms, self._dtype) / (w * w) for w, norms in micro.items()),
            start=torch.zeros_like(big_sq),
        )
        g, s = two_batch_estimates(small_sum / k, big_sq, b_small, b_big)
        x = torch.stack([g, s, g * g, s * s, g * s])
        self._moments.mul_(self.beta).add_(x, alpha=1 - self.beta)
        self.steps += 1
        self._last = (b_small, b_big)

    def on_micro_batch(self, micro: MicroStep) -> None:
        """Follow a :class:`~maxbatch.MicroBatcher`: pass ``on_micro_batch=tracker.on_micro_batch``.

        Each micro-batch is taken with its weight (times the ``GradScaler``'s scale; a ``"sum"``
        loss counts as its size times a mean), the last one of a step makes the draw, and a step
        that an out-of-memory error restarts starts again from its first micro-batch. A batch
        that fits in one micro-batch gives no draw (there is no small batch to compare).
        """
        if micro.index == 0:
            self._micro, self._sizes, self._weights = {}, [], []
        summed = micro.weight == 1.0 and micro.size < micro.batch_size
        weight = micro.weight * (micro.size if summed else 1) * micro.grad_scale
        self.micro_batch(micro.size, weight)
        if micro.index == micro.micro_batches - 1:
            if micro.micro_batches > 1:
                self.step()
            else:
                self._micro, self._sizes, self._weights = {}, [], []
                self._calls += 1

    def estimate(self) -> NoiseScale | None:
        """The moving-average estimate (reads the device once), or None before the first step.

        The standard error treats the average as ``(1 + beta) / (1 - beta)`` independent steps
        (fewer early on); drift during training is part of its spread.

        Returns:
            The estimate, or None.
        """
        if self.steps == 0:
            return None
        m = (self._moments / (1 - self.beta**self.steps)).tolist()
        g, s = m[0], m[1]
        var_g, var_s, cov = m[2] - g * g, m[3] - s * s, m[4] - g * s
        n = min(float(self.steps), (1 + self.beta) / (1 - self.beta))
        if n > 1:
            ratio, error = ratio_with_error(s, g, var_s, var_g, cov, n)
        else:
            ratio, error = (s / g if g > 0 else math.inf), math.inf
        return NoiseScale(
            b_simple=ratio,
            std_error=error,
            trace_cov=s,
            grad_sq_norm=g,
            b_small=round(self._last[0]),
            b_big=self._last[1],
            draws=self.steps,
            method=f"delta method over an EMA of steps (beta {self.beta:g})",
        )

    def close(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> NoiseScaleTracker:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
