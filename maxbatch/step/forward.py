"""The one forward/backward of a step: the hooks' defaults, autocast, the loss check, the backward.

:meth:`StepHooks.forward_backward` is what the probe's workload (through its loop),
``MicroBatcher`` and ``noise_scale`` run for one (micro-)batch: ``forward_fn(model, batch)`` and
``loss_fn(output, batch)`` under autocast at the step's precision, the check that the loss is a
scalar tensor, the loss weighted and scaled (a ``GradScaler``), and its backward. Each of them
holds its hooks and precision as one :class:`StepHooks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from maxbatch.errors import WorkloadError
from maxbatch.settings import Precision
from maxbatch.step.spec import ForwardFn, LossFn

__all__ = [
    "StepHooks",
    "autocast",
    "check_loss",
    "default_forward",
    "default_loss",
    "to_device",
]


def default_forward(model: torch.nn.Module, batch: Any) -> Any:
    """Call ``model(**batch)`` for a dict, ``model(*batch)`` for a sequence, else ``model(x)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def default_loss(output: Any, batch: Any) -> torch.Tensor:
    """The output's ``loss`` if it has one, else the sum of the means of its floating outputs."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    leaves = [
        t
        for t in tree_flatten(output)[0]
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]
    if not leaves:
        raise WorkloadError(
            "the model's output has no floating-point tensor that requires grad, so there is "
            "nothing to backpropagate; pass loss_fn (or define loss() in the model file)"
        )
    total = leaves[0].mean()
    for t in leaves[1:]:
        total = total + t.mean()
    return total


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a nested batch to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``precision`` on ``device``'s kind (FP32: none)."""
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_loss(loss: Any) -> torch.Tensor:
    """The loss, if it is a scalar tensor.

    Returns:
        The loss.

    Raises:
        WorkloadError: it is not.
    """
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise WorkloadError(
            f"the loss must be a scalar tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    return loss


def _device_of(model: torch.nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepHooks:
    """The user's forward and loss and the autocast precision: how every forward of a step runs.

    The workload, ``MicroBatcher`` and ``noise_scale`` each hold one (:meth:`build` fills in the
    defaults) and run their (micro-)batches through :meth:`forward_backward`.
    """

    forward_fn: ForwardFn = default_forward
    loss_fn: LossFn = default_loss
    precision: Precision = Precision.FP32

    @classmethod
    def build(
        cls,
        *,
        forward_fn: ForwardFn | None = None,
        loss_fn: LossFn | None = None,
        precision: Precision = Precision.FP32,
    ) -> StepHooks:
        """The hooks given, :func:`default_forward` and :func:`default_loss` for those not given.

        Returns:
            The record.
        """
        return cls(
            forward_fn=forward_fn or default_forward,
            loss_fn=loss_fn or default_loss,
            precision=precision,
        )

    def forward_loss(
        self, model: torch.nn.Module, batch: Any, *, device: torch.device | None = None
    ) -> tuple[Any, torch.Tensor]:
        """The forward and the loss under autocast, the loss checked (no backward).

        Args:
            model: the model.
            batch: a batch already on the device.
            device: the device whose kind autocast takes; default the model's.

        Returns:
            The output and the loss.

        Raises:
            WorkloadError: the loss is not a scalar tensor.
        """
        with autocast(self.precision, device or _device_of(model)):
            output = self.forward_fn(model, batch)
            loss = self.loss_fn(output, batch)
        return output, check_loss(loss)

    def forward_backward(
        self,
        model: torch.nn.Module,
        batch: Any,
        *,
        device: torch.device | None = None,
        weight: float = 1.0,
        scaler: Any = None,
        before_backward: Callable[[], None] | None = None,
    ) -> tuple[Any, torch.Tensor]:
        """One forward, loss and backward: the step's one home (see the module doc).

        Args:
            model: the model.
            batch: a batch already on the device.
            device: the device whose kind autocast takes; default the model's.
            weight: the loss is multiplied by it before the backward (1: left as it is).
            scaler: a ``torch.amp.GradScaler`` that scales the loss before the backward.
            before_backward: called between the forward and the backward (a loop that clears
                gradients there).

        Returns:
            The output and the weighted loss the backward ran from (the loss itself at weight
            1), attached: the caller decides how long they live (a user's loop keeps the last
            ones until the next forward has made its own). The unweighted loss is not kept
            alive through the backward, as a user's ``loss = loss / n`` does not keep it.

        Raises:
            WorkloadError: the loss is not a scalar tensor.
        """
        output, loss = self.forward_loss(model, batch, device=device)
        weighted = loss if weight == 1.0 else loss * weight
        del loss
        if before_backward is not None:
            before_backward()
        (weighted if scaler is None else scaler.scale(weighted)).backward()
        return output, weighted
