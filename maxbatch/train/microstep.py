"""``MicroStep``: what ``MicroBatcher`` tells its ``on_micro_batch`` hook after each micro-batch."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["MicroStep"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MicroStep:
    """One micro-batch done: what ``on_micro_batch`` receives, right after its backward.

    At that moment each parameter's ``.grad`` holds the weighted sum of the gradients of the
    micro-batches ``0..index`` of this attempt (times ``grad_scale`` under a ``GradScaler``); after
    the last one (``index == micro_batches - 1``) it is the whole batch's gradient. An
    out-of-memory error makes the step start again at ``index == 0`` with ``attempt + 1``: a
    consumer resets its per-step sums at index 0 and commits them at the last index.

    Attributes:
        step: optimizer steps done before this one.
        attempt: 0 for the first try of this step, then one more after each out-of-memory error.
        index: this micro-batch's position in the batch.
        micro_batches: micro-batches in this attempt.
        size: samples in this micro-batch.
        batch_size: samples in the whole batch.
        weight: what the micro-loss was multiplied by (``size / batch_size`` for a mean loss).
        loss: the micro-batch's own loss, unweighted, detached.
        grad_scale: the ``GradScaler``'s scale the gradients carry (1.0 without one).
    """

    step: int
    attempt: int
    index: int
    micro_batches: int
    size: int
    batch_size: int
    weight: float
    loss: torch.Tensor
    grad_scale: float
