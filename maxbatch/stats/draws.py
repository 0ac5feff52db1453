"""Random batches for statistics such as the noise scale (the probe's batches are worst cases).

Samples are drawn independently and uniformly with replacement, so that estimators over them
are unbiased for the data given: rows of a sample batch, items of a map-style data set, of a
``DataLoader``'s data set or of a :class:`~maxbatch.step.data.DataSource`'s (through its collate
function). A user's ``make_batch`` is trusted to draw random samples itself, and checked to.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, Dataset, default_collate

from maxbatch.errors import ConfigError
from maxbatch.step.batching import batch_size_of, map_tensors
from maxbatch.step.data import DataSource

Draw = Callable[[int], Any]


def random_batches(data: Any, generator: torch.Generator) -> tuple[Draw, int | None]:
    """A function from a size to a batch of that many random samples, and the rows available.

    Samples are drawn independently and uniformly with replacement, so that the estimators are
    unbiased for the data given (a data set, or the rows of a sample batch); a ``make_batch``
    is trusted to draw random samples itself.

    Returns:
        The drawing function, and the number of rows (None for ``make_batch``).

    Raises:
        ConfigError: ``data`` is a module, or not a batch, ``make_batch`` or data set.
    """
    if isinstance(data, torch.nn.Module):
        raise ConfigError(f"data must be a batch, make_batch or data set, got the module {data}")
    collate: Callable[[list[Any]], Any] = default_collate
    if isinstance(data, DataSource):  # the probe's worst-case source: its data set, at random
        collate, data = data.collate_fn, data.dataset
    if isinstance(data, DataLoader):
        collate, data = data.collate_fn, data.dataset
    if isinstance(data, Dataset):
        if not isinstance(data, Sized):
            raise ConfigError(
                "the noise scale draws random samples by index: give a map-style data set "
                f"(with __len__), not the iterable {type(data).__name__}"
            )
        dataset, n = data, len(data)

        def from_dataset(b: int) -> Any:
            index = torch.randint(n, (b,), generator=generator).tolist()
            return collate([dataset[i] for i in index])

        return from_dataset, n
    if callable(data) and not isinstance(data, torch.Tensor):
        return data, None
    sample, rows = data, batch_size_of(data)

    def from_sample(b: int) -> Any:
        index = torch.randint(rows, (b,), generator=generator)
        return map_tensors(sample, lambda t: t.index_select(0, index.to(t.device)))

    return from_sample, rows


def check_random(make_batch: Draw) -> None:
    """Raise when ``make_batch`` gives the same batch twice: it has no noise to measure.

    Raises:
        ConfigError: the two batches are equal.
    """
    first, second = (tree_flatten(make_batch(2))[0] for _ in range(2))
    tensors = [(a, b) for a, b in zip(first, second, strict=False) if isinstance(a, torch.Tensor)]
    if tensors and all(a.shape == b.shape and torch.equal(a, b) for a, b in tensors):
        raise ConfigError(
            "make_batch returned the same batch twice: the noise scale needs random samples; "
            "draw them at random from your data (e.g. torch.randint over its indices)"
        )
