"""``MicroBatcher``: gradient accumulation that survives an out-of-memory error.

One call to :meth:`MicroBatcher.step` is one optimizer step over the whole batch, split into
micro-batches of at most ``micro_batch_size`` samples. Each micro-loss is weighted by its share of
the batch, so the accumulated gradient is the full batch's. When a micro-batch runs out of memory
the whole step is thrown away (partial gradients, buffers, RNG) and done again with smaller
micro-batches, so no sample is lost or counted twice and the optimizer steps exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from maxbatch.errors import ConfigError, DoesNotFitError
from maxbatch.grid import positive_int
from maxbatch.results import BatchSizeResult, MemoryModel
from maxbatch.settings import Precision, parse_enum
from maxbatch.step.batching import batch_size_of, held_bytes, map_tensors
from maxbatch.step.forward import StepHooks
from maxbatch.step.oom import is_oom, release_memory
from maxbatch.step.retry import lower_after_oom
from maxbatch.step.snapshot import Snapshot
from maxbatch.step.spec import ForwardFn, LossFn
from maxbatch.train.microstep import MicroStep
from maxbatch.train.optstep import optimizer_step

__all__ = ["MicroBatcher", "MicroStep"]

log = logging.getLogger(__name__)

ChangeFn = Callable[[int, int, str], None]


class MicroBatcher:
    """Steps an optimizer once per batch, in micro-batches that shrink after an out-of-memory error.

    Args:
        model: the model (its device is where memory runs out).
        optimizer: stepped once per :meth:`step`.
        micro_batch_size: the largest micro-batch to try (e.g. ``find_batch_size(...).batch_size``).
        loss_fn: ``loss_fn(output, micro_batch)``; default: ``output.loss`` or the sum of the
            means of the floating outputs, as the probe's step.
        forward_fn: ``forward_fn(model, micro_batch)``; default ``model(batch)``, ``model(*batch)``
            for a tuple or list, ``model(**batch)`` for a dict.
        scaler: a ``torch.amp.GradScaler``: the loss is scaled, the optimizer stepped through it.
        precision: ``"fp32"`` (default: no autocast), ``"bf16"`` or ``"fp16"``: the forward and
            the loss run under autocast, as the probe's step does.
        on_change: ``on_change(old, new, reason)`` after each change of the micro-batch size.
        grow_after: after this many steps without an out-of-memory error, try twice the size again
            (never above ``micro_batch_size``); None (default): never grow.
        loss_reduction: ``"mean"`` (the loss is a mean over the samples: each micro-loss is
            weighted by its share) or ``"sum"`` (the micro-losses add up as they are).
        on_micro_batch: called with a :class:`MicroStep` after each micro-batch's backward: the
            hook for statistics over micro-batch gradients (such as the gradient noise scale).
        memory_model: the probe's memory model (``fixed + per_sample * b``): after an
            out-of-memory error at a size above the model's largest fitting size, that size;
            otherwise (and without a model) half.
        usable_bytes: the bytes a step may use (the probe's ``usable_bytes``), for the model.

    Raises:
        ConfigError: an option is invalid.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        micro_batch_size: int,
        loss_fn: LossFn | None = None,
        forward_fn: ForwardFn | None = None,
        scaler: Any = None,
        precision: Precision | str = Precision.FP32,
        on_change: ChangeFn | None = None,
        grow_after: int | None = None,
        loss_reduction: str = "mean",
        on_micro_batch: Callable[[MicroStep], None] | None = None,
        memory_model: MemoryModel | None = None,
        usable_bytes: int | None = None,
    ):
        positive_int(micro_batch_size, "micro_batch_size")
        if grow_after is not None:
            positive_int(grow_after, "grow_after")
        if loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"loss_reduction={loss_reduction!r} is not valid; choose mean or sum")
        if (memory_model is None) != (usable_bytes is None):
            raise ConfigError("the memory model needs both memory_model and usable_bytes")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        self.model = model
        self.optimizer = optimizer
        self.micro_batch_size = micro_batch_size
        self.max_micro_batch_size = micro_batch_size
        self.scaler = scaler
        #: the forward, the loss and the precision every micro-batch runs with
        self.hooks = StepHooks.build(
            forward_fn=forward_fn,
            loss_fn=loss_fn,
            precision=parse_enum(Precision, precision, "precision"),
        )
        self.on_change = on_change
        self.grow_after = grow_after
        self.loss_reduction = loss_reduction
        self.on_micro_batch = on_micro_batch
        self.memory_model = memory_model
        self.usable_bytes = usable_bytes
        self.steps = 0
        self.clean_steps = 0
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    @classmethod
    def from_result(
        cls,
        result: BatchSizeResult,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        **kwargs: Any,
    ) -> MicroBatcher:
        """A micro-batcher at the probe's pick, lowering sizes with the probe's memory model.

        Accumulating keeps a second gradient per parameter alive, so the micro-batch is at most
        the result's :meth:`~maxbatch.BatchSizeResult.micro_ceiling` (measured by accumulating
        trials when a ``global_batch`` asked for them, else predicted by the memory model).

        Returns:
            The micro-batcher.
        """
        micro = min(result.batch_size, result.micro_ceiling())
        return cls(
            model,
            optimizer,
            micro_batch_size=kwargs.pop("micro_batch_size", micro),
            memory_model=result.memory_model,
            usable_bytes=result.usable_bytes if result.memory_model is not None else None,
            **kwargs,
        )

    # -- one step -------------------------------------------------------------------------------

    def step(self, batch: Any) -> torch.Tensor:
        """One optimizer step over ``batch`` (batch dimension first), in micro-batches.

        Returns:
            The batch's loss (the weighted sum of the micro-losses), detached.

        Raises:
            DoesNotFitError: a micro-batch of one sample runs out of memory, or the optimizer
                step does (the optimizer is then left as its next step accepts it).
            WorkloadError: the batch has no batch dimension.
            Exception: any error other than out-of-memory, raised unchanged.
        """
        n = batch_size_of(batch)
        saved = Snapshot.of_buffers(self.model)
        attempt = 0
        while True:
            size = self.micro_batch_size
            loss = self._attempt(batch, n, size, attempt)
            if loss is not None:
                break
            # Out of memory: no exception is alive here, so the failed micro-batch's tensors are
            # gone once its gradients are thrown away and garbage is collected.
            self.optimizer.zero_grad(set_to_none=True)
            saved.restore()
            release_memory(self.device)
            unseen = held_bytes(batch, self.device) + self._grad_bytes()
            self._change(size, self._lower(size, unseen), "out of memory")
            attempt += 1
        optimizer_step(self.optimizer, self.scaler, self.device, n)
        self.steps += 1
        self.clean_steps = self.clean_steps + 1 if attempt == 0 else 0
        if self.grow_after is not None and self.clean_steps >= self.grow_after:
            self.clean_steps = 0
            if self.micro_batch_size < self.max_micro_batch_size:
                grown = min(self.max_micro_batch_size, 2 * self.micro_batch_size)
                self._change(self.micro_batch_size, grown, f"{self.grow_after} clean steps")
        return loss

    def _attempt(self, batch: Any, n: int, size: int, attempt: int) -> torch.Tensor | None:
        """Accumulate the gradient of the whole batch; None when a micro-batch ran out of memory."""
        self.optimizer.zero_grad(set_to_none=True)
        starts = range(0, n, size)
        total = None
        try:
            for index, start in enumerate(starts):
                weighted, loss = self._micro(batch, start, min(start + size, n), n)
                total = weighted if total is None else total + weighted
                if self.on_micro_batch is not None:
                    self._report(attempt, index, len(starts), min(size, n - start), n, loss)
        except Exception as e:
            if not is_oom(e):
                raise
            return None  # the traceback (and the failed micro-batch's frame) dies with ``e``
        assert total is not None
        return total

    def _micro(
        self, batch: Any, start: int, stop: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of samples ``start:stop``; their weighted and own loss, detached.

        Its own frame holds the micro-batch's output: an out-of-memory error's traceback keeps
        it, and it is gone with the exception.

        Returns:
            The weighted loss and the micro-batch's own loss, detached.

        Raises:
            WorkloadError: the loss is not a scalar tensor.
        """
        part = map_tensors(batch, lambda t: t[start:stop])
        weight = (stop - start) / n if self.loss_reduction == "mean" else 1.0
        _, weighted = self.hooks.forward_backward(
            self.model, part, device=self.device, weight=weight, scaler=self.scaler
        )
        weighted = weighted.detach()
        return weighted, weighted if weight == 1.0 else weighted / weight

    def _report(
        self, attempt: int, index: int, count: int, size: int, n: int, loss: torch.Tensor
    ) -> None:
        assert self.on_micro_batch is not None
        weight = size / n if self.loss_reduction == "mean" else 1.0
        scale = 1.0 if self.scaler is None else float(self.scaler.get_scale())
        info = MicroStep(
            step=self.steps,
            attempt=attempt,
            index=index,
            micro_batches=count,
            size=size,
            batch_size=n,
            weight=weight,
            loss=loss,
            grad_scale=scale,
        )
        self.on_micro_batch(info)

    # -- the size -------------------------------------------------------------------------------

    def _lower(self, size: int, held: int) -> int:
        """The next size after ``size`` ran out of memory, ``held`` bytes unseen by the model.

        :func:`~maxbatch.step.retry.lower_after_oom` with the probe's memory model; ``held``
        is what the failure showed was missing from it: the whole batch this step holds on the
        device and the gradients accumulated across micro-batches.

        Returns:
            The smaller size.

        Raises:
            DoesNotFitError: a micro-batch of one sample ran out of memory.
        """
        model, usable = self.memory_model, self.usable_bytes
        new = lower_after_oom(size, memory_model=model, usable_bytes=usable, unseen_bytes=held)
        if new is None:
            raise DoesNotFitError(
                "a micro-batch of 1 sample runs out of memory; the model does not fit this device",
                batch_size=1,
                needed_bytes=0 if model is None else int(model.peak(1)),
                available_bytes=usable or 0,
            )
        return new

    def _grad_bytes(self) -> int:
        """The bytes of one copy of the gradients on the device.

        Accumulating keeps the gradients so far while a backward makes new ones: one more copy
        than the probe's single step held.

        Returns:
            The bytes.
        """
        params = (p for p in self.model.parameters() if p.requires_grad)
        return sum(p.numel() * p.element_size() for p in params if p.device == self.device)

    def _change(self, old: int, new: int, reason: str) -> None:
        self.micro_batch_size = new
        level = logging.WARNING if reason == "out of memory" else logging.INFO
        log.log(
            level,
            "micro-batch size %d -> %d (%s, optimizer step %d)",
            old,
            new,
            reason,
            self.steps + 1,
        )
        if self.on_change is not None:
            self.on_change(old, new, reason)
