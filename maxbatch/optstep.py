"""The optimizer step of :class:`~maxbatch.microbatch.MicroBatcher`, safe from an out-of-memory.

An optimizer makes its state lazily, at its first step (Adam's ``exp_avg`` and ``exp_avg_sq``,
SGD's ``momentum_buffer``): an out-of-memory error in the middle leaves a parameter's state half
made, and every later step fails (``KeyError: 'exp_avg'``). Here the state entries that the failed
step made are removed again and its step counters put back, so the next step accepts the
optimizer (and makes the state afresh); then a :class:`~maxbatch.errors.DoesNotFitError` says
what happened. Smaller micro-batches cannot help: the step's memory does not depend on them.
"""

from __future__ import annotations

from typing import Any

import torch

from maxbatch.errors import DoesNotFitError
from maxbatch.oom import is_oom, release_memory

__all__ = ["optimizer_step"]


def _counters(optimizer: torch.optim.Optimizer) -> dict[int, tuple[Any, Any]]:
    """Parameters with state: their ``step`` counter's object and value (one number each)."""
    saved = {}
    for param, entry in optimizer.state.items():
        if entry:
            step = entry.get("step")
            value = step.detach().clone() if isinstance(step, torch.Tensor) else step
            saved[id(param)] = (step, value)
    return saved


def _undo(optimizer: torch.optim.Optimizer, had: dict[int, tuple[Any, Any]]) -> None:
    """Remove the state the failed step made; put the step counters back."""
    for param in list(optimizer.state):
        if id(param) not in had:
            del optimizer.state[param]  # made (or half made) by the step that failed
            continue
        entry = optimizer.state[param]
        step, value = had[id(param)]
        if isinstance(step, torch.Tensor) and entry.get("step") is step:
            with torch.no_grad():
                step.copy_(value)
        elif step is not None:
            entry["step"] = value


def _reset_scaler(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Forget that ``scaler`` unscaled ``optimizer``'s gradients for the step that failed."""
    # GradScaler keeps a per-optimizer stage ("unscaled") until update(): without this the
    # next step would skip unscaling. update() itself would also move the scale.
    states = getattr(scaler, "_per_optimizer_states", None)
    if isinstance(states, dict):
        states.pop(id(optimizer), None)


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: Any, device: torch.device, batch_size: int
) -> None:
    """``optimizer.step()`` (through ``scaler`` when given); on an OOM, undo it and raise.

    Raises:
        DoesNotFitError: the step ran out of memory. The state entries it made are removed,
            step counters restored, the gradients freed: the optimizer's next step works (a
            state that existed before may hold this step's partly updated moments).
    """
    had = _counters(optimizer)
    try:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return
    except Exception as e:
        if not is_oom(e):
            raise
    # Out of memory: outside the except block, so no traceback keeps the step's temporaries.
    _undo(optimizer, had)
    if scaler is not None:
        _reset_scaler(scaler, optimizer)
    optimizer.zero_grad(set_to_none=True)
    release_memory(device)
    raise DoesNotFitError(
        f"the optimizer step ({type(optimizer).__name__}) ran out of memory after the gradients "
        f"of a batch of {batch_size}: its state and temporaries do not fit beside the model and "
        "the gradients, whatever the micro-batch size; the optimizer is left as its next step "
        "accepts it (the state this step made is removed); free memory on the device or use an "
        "optimizer with less state",
        batch_size=batch_size,
        needed_bytes=0,
        available_bytes=0,
    )
