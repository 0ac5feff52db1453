"""How the user's training loop runs a step: where it clears gradients, how many micro-batches.

A trial runs the step as the loop runs it, long enough to reach the loop's steady state (what the
previous step leaves alive), so that the ceiling is the peak of that state:

- ``zero_grad="before_forward"`` (default, the plain PyTorch loop): ``optimizer.zero_grad()``
  first, so a step starts with parameters, buffers and optimizer state alive, no gradients;
- ``"before_backward"`` (Lightning's automatic optimisation): the gradients are cleared after
  the forward, so the previous step's gradients live through the next forward;
- ``"after_step"`` (the Hugging Face Trainer): cleared right after ``optimizer.step()``.

``accumulate=n`` runs ``n`` micro-batches (``loss / n``, backward each) per optimizer step, so
that the running gradient is alive while the next micro-batch's backward makes its own.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import torch

from maxbatch.errors import ConfigError
from maxbatch.grid import positive_int
from maxbatch.units import parse_bytes

#: Optimizer steps per trial: the first creates lazily allocated state (optimizer moments,
#: gradients a late ``zero_grad`` keeps, workspaces), the second starts from the steady state.
STEPS = 2
#: Steps of the trial that also checks for leaks: the live bytes after the second, third and fourth
#: show whether each step keeps bytes (two growths in a row, so that state one later step creates
#: once is not called a leak).
LEAK_STEPS = 4


class ZeroGrad(str, enum.Enum):
    """Where the user's loop clears gradients (``set_to_none=True``)."""

    BEFORE_FORWARD = "before_forward"
    BEFORE_BACKWARD = "before_backward"
    AFTER_STEP = "after_step"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loop:
    """The order of the user's loop around the step.

    Attributes:
        zero_grad: where gradients are cleared.
        accumulate: micro-batches per optimizer step (gradient accumulation) in a trial.
        allow_growth_bytes: live bytes a step may keep on purpose (a bounded cache, a history)
            before repeated steps that keep growing are called a leak.
    """

    zero_grad: ZeroGrad = ZeroGrad.BEFORE_FORWARD
    accumulate: int = 1
    allow_growth_bytes: int = 0

    @classmethod
    def build(
        cls,
        *,
        zero_grad: str | ZeroGrad = ZeroGrad.BEFORE_FORWARD,
        accumulate: int = 1,
        allow_growth: str | int | None = None,
    ) -> Loop:
        """Validate the loop's keywords (see :func:`~maxbatch.find_batch_size`).

        Returns:
            The loop.

        Raises:
            ConfigError: an unknown ``zero_grad``, a bad ``accumulate`` or ``allow_growth``.
        """
        if isinstance(zero_grad, ZeroGrad):
            order = zero_grad
        else:
            try:
                order = ZeroGrad(str(zero_grad).lower().replace("-", "_"))
            except ValueError:
                choices = ", ".join(z.value for z in ZeroGrad)
                raise ConfigError(
                    f"zero_grad={zero_grad!r} is not valid; choose one of: {choices}"
                ) from None
        growth = 0 if allow_growth is None else parse_bytes(allow_growth, name="allow_growth")
        return cls(
            zero_grad=order,
            accumulate=positive_int(accumulate, "accumulate"),
            allow_growth_bytes=growth,
        )

    def accumulating(self, n: int = 2) -> Loop:
        """This loop with ``n`` micro-batches per optimizer step (at least its own)."""
        return dataclasses.replace(self, accumulate=max(n, self.accumulate))


def clear(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Free the gradients, as ``zero_grad(set_to_none=True)`` does."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)


#: Runs one micro-batch's forward, loss and backward (the loss times ``weight``, and
#: ``before_backward()`` called between the forward and the backward); returns the output and
#: the weighted loss.
MicroStepFn = Callable[[Any, float, "Callable[[], None] | None"], tuple[Any, Any]]


def train_step(
    loop: Loop,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    batch: Any,
    micro_step: MicroStepFn,
) -> None:
    """One optimizer step: ``loop.accumulate`` micro-batches, gradients cleared as the loop does.

    ``micro_step(batch, weight, before_backward)`` runs the forward, the loss (under autocast) and
    the backward (:meth:`~maxbatch.step.forward.StepHooks.forward_backward`) and returns the output
    and the weighted loss. As in a user's loop, they stay referenced until the next micro-batch's
    forward has made its own (the names are rebound then: ``before_backward``), and the last ones
    until the optimizer step is done.
    """
    if loop.zero_grad is ZeroGrad.BEFORE_FORWARD:
        clear(model, optimizer)
    weight = 1.0 if loop.accumulate == 1 else 1.0 / loop.accumulate
    held: list[Any] = []  # the last micro-batch's output and loss
    first = [True]

    def before_backward() -> None:
        # The new forward is done, so the user's names now point at its output and loss: the
        # previous ones are gone before this backward, as in the user's loop.
        held.clear()
        if first[0] and loop.zero_grad is ZeroGrad.BEFORE_BACKWARD:
            clear(model, optimizer)
        first[0] = False

    for _ in range(loop.accumulate):
        held.extend(micro_step(batch, weight, before_backward))
    if optimizer is not None:
        optimizer.step()
    if loop.zero_grad is ZeroGrad.AFTER_STEP:
        clear(model, optimizer)
    held.clear()


def steady_state(
    loop: Loop, alive: tuple[str, ...], *, own_step: bool, inference: bool
) -> dict[str, Any]:
    """The loop state a probe's trials measured, as the result's ``steady_state``.

    Args:
        loop: the loop's order.
        alive: what was alive at the start of the measured step.
        own_step: the user's ``train_step`` ran (its own order: no ``zero_grad`` to report).
        inference: forward passes only.

    Returns:
        ``steps_per_trial``, ``zero_grad``, ``micro_batches``, ``alive_at_start``,
        ``leak_check_steps`` and ``allow_growth_bytes``.
    """
    return {
        "steps_per_trial": STEPS,
        "zero_grad": None if own_step or inference else loop.zero_grad.value,
        "micro_batches": loop.accumulate,
        "alive_at_start": list(alive),
        "leak_check_steps": LEAK_STEPS,
        "allow_growth_bytes": loop.allow_growth_bytes,
    }
