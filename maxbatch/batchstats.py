"""What variable batches change for training: batch size and tokens per step, and padding.

With a bucket sampler the batch size changes from step to step (large batches of short items, small
ones of long items): the gradient noise and, with a per-sample mean loss, each item's weight in the
step change with it. :func:`batch_stats` gives the figures to judge that by.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = ["BatchStats", "batch_stats"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchStats:
    """What variable batches change for training: batch size and tokens per step, and padding.

    Attributes:
        steps: batches (optimizer steps without accumulation) in the epoch, on this rank.
        samples: items in them (repeats under ``torch.distributed`` counted again).
        mean_batch_size: samples per batch, on average.
        min_batch_size: the smallest batch.
        max_batch_size: the largest batch.
        mean_tokens: tokens per batch (the sum of its items' lengths), on average.
        min_tokens: the fewest tokens in one batch.
        max_tokens: the most tokens in one batch.
        padded_tokens: the epoch's tokens after padding each batch to its longest item.
        padding_share: the share of ``padded_tokens`` that is padding.
    """

    steps: int
    samples: int
    mean_batch_size: float
    min_batch_size: int
    max_batch_size: int
    mean_tokens: float
    min_tokens: int
    max_tokens: int
    padded_tokens: int
    padding_share: float

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        return dataclasses.asdict(self)


def batch_stats(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> BatchStats:
    """The batch size, tokens per step and padding of an epoch's ``batches`` of ``lengths``.

    Returns:
        The figures; all zero for no batches.
    """
    sizes = [len(b) for b in batches]
    tokens = [sum(lengths[i] for i in b) for b in batches]
    padded = sum(len(b) * max((lengths[i] for i in b), default=0) for b in batches)
    steps = len(batches)
    return BatchStats(
        steps=steps,
        samples=sum(sizes),
        mean_batch_size=sum(sizes) / steps if steps else 0.0,
        min_batch_size=min(sizes, default=0),
        max_batch_size=max(sizes, default=0),
        mean_tokens=sum(tokens) / steps if steps else 0.0,
        min_tokens=min(tokens, default=0),
        max_tokens=max(tokens, default=0),
        padded_tokens=padded,
        padding_share=1.0 - sum(tokens) / padded if padded else 0.0,
    )
