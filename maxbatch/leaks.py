"""Leaks: steps at one batch size whose live bytes keep growing.

A step that keeps something per call (a list of losses that still hold their graphs, a cache
that grows) makes every later trial start from more memory, so a ceiling measured over it shrinks
with every trial. The trial that checks reads the live bytes after each of its steps; when every
step after the first kept more than the loop allows (``allow_growth``), the probe stops with a
:class:`~maxbatch.errors.LeakError` that says how much each step kept and, where it can tell,
which tensors keep it (tensors still holding an autograd graph between steps).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from maxbatch.errors import LeakError
from maxbatch.units import format_bytes


def graph_tensors() -> int:
    """Tensors alive now that still hold an autograd graph (a ``grad_fn``).

    Between steps the loop's own outputs and losses are gone, so any such tensor was kept by
    the step: with it, every activation its graph saved.

    Returns:
        How many there are.
    """
    count = 0
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and obj.grad_fn is not None:
                count += 1
        except Exception:  # noqa: BLE001 - an object that fails isinstance is no tensor
            continue
    return count


class Growth:
    """The live bytes after each step of one trial, and the leak they show.

    Args:
        live: reads the live bytes now.
    """

    def __init__(self, live: Callable[[], int]):
        self.live = live
        self.after: list[int] = []

    def after_step(self, step: int) -> None:
        """Record the live bytes after step ``step`` (from 1)."""
        self.after.append(self.live())

    def per_step(self) -> int:
        """The bytes every step after the first kept (0 without three steps, or no growth)."""
        if len(self.after) < 3:
            return 0
        # The first step creates the loop's state (optimizer moments, gradients); from then on
        # a steady loop ends every step with the same live bytes.
        return max(0, min(b - a for a, b in zip(self.after[1:], self.after[2:], strict=False)))

    def check(self, batch_size: int, allowed: int) -> None:
        """Raise when the steps kept more than ``allowed`` bytes each.

        Raises:
            LeakError: they did.
        """
        kept = self.per_step()
        if kept <= allowed:
            return
        graphs = graph_tensors()  # what the step kept is still referenced: look for it
        where = (
            f"; {graphs} tensors that still hold an autograd graph are alive between "
            "steps (a loss or output kept across steps, e.g. appended to a list: keep "
            "loss.item() or loss.detach() instead)"
            if graphs
            else ""
        )
        raise LeakError(
            f"the step leaks: at batch size {batch_size} each step kept {format_bytes(kept)} "
            f"more live memory than the one before{where}; a ceiling over it would shrink "
            "with every step. Fix the step, or accept a bounded growth on purpose with "
            "allow_growth= (--allow-growth)",
            batch_size=batch_size,
            bytes_per_step=kept,
            graph_tensors=graphs,
        )
