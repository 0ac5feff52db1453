"""What to try after an out-of-memory error: the one "lower the size" rule.

The probe's first fit and its isolated children, ``noise_scale`` and ``MicroBatcher`` all lower
a size that ran out of memory with :func:`lower_after_oom`: halving (snapped to the caller's grid
when it has one), or, given the probe's memory model, the largest size that model says fits. An
out-of-memory error says that more was needed, not how much: only a model can say more.
"""

from __future__ import annotations

from collections.abc import Callable

from maxbatch.results import MemoryModel

__all__ = ["lower_after_oom"]


def lower_after_oom(
    size: int,
    *,
    smallest: int = 1,
    halve: Callable[[int], int] | None = None,
    memory_model: MemoryModel | None = None,
    usable_bytes: float | None = None,
    unseen_bytes: float = 0.0,
) -> int | None:
    """The size to try after ``size`` ran out of memory; None when ``size`` is the smallest.

    Without a memory model, half (``halve(size)``: a grid's snapping; default ``size // 2``).
    With one (and ``usable_bytes``): the model's largest fitting size when it is below ``size``
    (a size above what the probe measured to fit); when the model's own size failed, the model
    refitted with ``unseen_bytes``, what the failure showed was missing from it; only when that
    explains nothing, half.

    Args:
        size: the size that ran out of memory.
        smallest: the smallest size there is (a grid's lower end).
        halve: the half of a size, as the caller's grid rounds it.
        memory_model: the probe's memory model, when there is one.
        usable_bytes: the bytes a step may use, for the model.
        unseen_bytes: bytes the model did not count (what the caller holds besides the step).

    Returns:
        A smaller size, at least ``smallest``; None when ``size`` is at or below it.
    """
    if size <= smallest:
        return None
    new = halve(size) if halve is not None else size // 2
    model = memory_model
    if model is not None and usable_bytes is not None and model.bytes_per_sample > 0:
        fits = model.fitting_size(usable_bytes)
        refit = model.fitting_size(usable_bytes, extra_bytes=unseen_bytes)
        new = fits if fits < size else refit if refit < size else new
    return max(smallest, min(new, size - 1))
