"""Worst-case batches from the user's real data: a data set or a ``DataLoader``.

A batch size that fits the first batch can run out of memory at a later, larger one (longer
sequences, bigger images). :class:`DataSource` reads the size of every item once (the total
elements of its tensors, or ``size_fn(item)``), ranks the items, and builds each trial's batch of
``b`` from the ``b`` largest, collated as the loader collates them (a padding collate then pads
to the longest sequence). With a custom batch sampler (bucketing), batches only ever hold items of
one bucket: the worst case is its largest bucket (its items times its largest item's size, as a
padding collate makes it), whose items make every trial's batch. The finder and the estimate take a
``DataSource`` as a ``make_batch(batch_size)``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from itertools import cycle, islice
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, default_collate

from maxbatch.answers import DataScan
from maxbatch.errors import ConfigError, WorkloadError
from maxbatch.grid import positive_int
from maxbatch.step.oom import is_oom
from maxbatch.step.snapshot import rng_kept

__all__ = ["SCAN_LIMIT", "DataScan", "DataSource", "as_batch_source"]

log = logging.getLogger(__name__)

#: Items whose size is read by default; a larger data set is read at this many random items.
SCAN_LIMIT = 100_000
#: Items of the worst-case batch listed in its report.
LISTED = 16
#: Seconds between two progress log lines of a scan.
LOG_EVERY = 5.0

SizeFn = Callable[[Any], int]
ProgressFn = Callable[[int, int], None]


def elements(item: Any) -> int:
    """An item's size: the elements of its tensors and arrays, plus 1 per number it holds."""
    total = 0
    for leaf in tree_flatten(item)[0]:
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel()
        elif hasattr(leaf, "size") and hasattr(leaf, "dtype"):  # a NumPy array
            total += int(leaf.size)
        elif isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            total += 1
    return total


def item_size(dataset: Any, index: int, size_fn: SizeFn | None = None) -> int:
    """The size of item ``index``: ``size_fn(item)``, or the elements of its tensors.

    Returns:
        The size, an int >= 0.

    Raises:
        WorkloadError: reading the item or its size raised.
        ConfigError: ``size_fn`` returned something other than an int >= 0.
    """
    try:
        item = dataset[index]
        size = elements(item) if size_fn is None else size_fn(item)
    except Exception as e:
        raise WorkloadError(
            f"reading the size of item {index} of the data set raised {type(e).__name__}: {e}"
        ) from e
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ConfigError(f"size_fn returned {size!r} for item {index}; expected an int >= 0")
    return size


class DataSource:
    """The worst-case batch of any size from a map-style data set or a ``DataLoader``.

    Args:
        data: a map-style dataset (``len`` and ``data[i]``) or a ``DataLoader`` over one, whose
            ``collate_fn`` and custom batch sampler (when it has one) are used.
        size_fn: ``size_fn(item)`` returning an item's size, cheaply (a length); default: the
            elements of its tensors and arrays.
        collate_fn: turns a list of items into a batch; default: the loader's, else torch's
            ``default_collate`` (which stacks: items of different shapes need a padding collate).
        scan_limit: read at most this many items (chosen at random, seeded), default
            :data:`SCAN_LIMIT`; None reads every item.
        on_progress: called as ``on_progress(done, total)`` while the scan runs.

    Raises:
        ConfigError: ``data`` cannot be indexed, or an option is invalid.
    """

    def __init__(
        self,
        data: Any,
        *,
        size_fn: SizeFn | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        scan_limit: int | None = SCAN_LIMIT,
        on_progress: ProgressFn | None = None,
    ):
        batch_sampler: Iterable[list[int]] | None = None
        indices: list[int] | None = None
        if isinstance(data, DataLoader):
            if data.batch_sampler is None:
                raise ConfigError(
                    "the DataLoader does not batch (batch_size=None): pass one of its batches "
                    "as the sample, or the loader of the items"
                )
            if collate_fn is not None:
                raise ConfigError("collate_fn is given and the DataLoader has its own; keep one")
            collate_fn = data.collate_fn
            if type(data.batch_sampler) is not BatchSampler:
                batch_sampler = data.batch_sampler
            else:
                indices = getattr(data.sampler, "indices", None)  # SubsetRandomSampler
            data = data.dataset
        if isinstance(data, IterableDataset) or not (
            hasattr(data, "__len__") and hasattr(data, "__getitem__")
        ):
            raise ConfigError(
                f"a {type(data).__name__} cannot be indexed: pass a map-style dataset (len and "
                "data[i]), a DataLoader over one, one batch, or make_batch(batch_size)"
            )
        if scan_limit is not None:
            positive_int(scan_limit, "scan_limit")
        self.dataset = data
        self.size_fn = size_fn
        self.collate_fn = collate_fn or default_collate
        self.scan_limit = scan_limit
        self.on_progress = on_progress
        self._batch_sampler = batch_sampler
        self._indices = list(indices) if indices is not None else list(range(len(data)))
        self._ranking: list[tuple[int, int]] | None = None  # (index, size), largest first
        self._scan: DataScan | None = None

    def _size(self, index: int) -> int:
        return item_size(self.dataset, index, self.size_fn)

    def scan(self) -> DataScan:
        """Read the items' sizes once (later calls return the first scan's report).

        Returns:
            The scan's report.

        Raises:
            ConfigError: the data set is empty, or no item has a size.
            WorkloadError: reading an item failed.
        """
        if self._scan is not None:
            return self._scan
        # Reading items (augmentations) and a batch sampler (shuffling) may draw random numbers:
        # the scan runs before the probe saves the RNG states, so it keeps them itself.
        with rng_kept():
            self._scan = self._read_sizes()
        return self._scan

    def _read_sizes(self) -> DataScan:
        started = time.perf_counter()
        total = len(self._indices)
        if total == 0:
            raise ConfigError("the data set is empty: there is no batch to build")
        limit = total if self.scan_limit is None else min(total, self.scan_limit)
        if self._batch_sampler is not None:
            order = [i for batch in self._batch_sampler for i in batch]
            wanted = order[:limit]
        elif limit < total:
            wanted = random.Random(0).sample(self._indices, limit)
        else:
            wanted = self._indices
        sizes: dict[int, int] = {}
        last_log = started
        step = max(1, limit // 100)
        for done, index in enumerate(wanted, 1):
            if index not in sizes:
                sizes[index] = self._size(index)
            if done % step == 0 or done == limit:
                if self.on_progress is not None:
                    self.on_progress(done, limit)
                now = time.perf_counter()
                if now - last_log >= LOG_EVERY:
                    log.info("scanned %d of %d items (%.0f s)", done, limit, now - started)
                    last_log = now
        if not any(sizes.values()):
            raise ConfigError(
                "no item of the data set holds a tensor, array or number to size it by; pass "
                "size_fn(item) returning its size (such as the sequence length)"
            )
        bucket = self._largest_bucket(sizes) if self._batch_sampler is not None else None
        pool = bucket if bucket is not None else list(sizes)
        self._ranking = sorted(((i, sizes[i]) for i in pool), key=lambda p: (-p[1], p[0]))
        return DataScan(
            items=total,
            scanned=len(sizes),
            sampled=limit < total,
            seconds=time.perf_counter() - started,
            size_of="elements" if self.size_fn is None else "size_fn",
            bucket=None if bucket is None else tuple(bucket),
            batch_size=0,
            indices=(),
            sizes=(),
        )

    def _largest_bucket(self, sizes: dict[int, int]) -> list[int]:
        """The batch sampler's largest batch (over the items read).

        A batch's size is its items times its largest item's size: the elements of the batch a
        padding collate makes, and of a stacking one (its items are all the same size).

        Returns:
            The indices of the largest batch.
        """
        assert self._batch_sampler is not None
        best: list[int] = []
        best_size = -1
        for batch in self._batch_sampler:
            read = [i for i in batch if i in sizes]
            size = len(read) * max((sizes[i] for i in read), default=0)
            if size > best_size:
                best, best_size = read, size
        return best

    def worst_indices(self, batch_size: int) -> list[int]:
        """The items of the worst-case batch of ``batch_size``, largest first.

        When the pool (the items read, or the largest bucket) holds fewer, they repeat, cycling.

        Returns:
            ``batch_size`` indices.
        """
        self.scan()
        assert self._ranking is not None
        return [i for i, _ in islice(cycle(self._ranking), batch_size)]

    def report(self, batch_size: int) -> DataScan:
        """The scan's report with the worst-case batch at ``batch_size``."""
        scan = self.scan()
        assert self._ranking is not None
        listed = list(islice(cycle(self._ranking), min(batch_size, LISTED)))
        return dataclasses.replace(
            scan,
            batch_size=batch_size,
            indices=tuple(i for i, _ in listed),
            sizes=tuple(s for _, s in listed),
        )

    def __call__(self, batch_size: int) -> Any:
        """The worst-case batch of ``batch_size`` items, collated.

        The items are read as host data, outside any dispatch mode (a virtual device's counter,
        the estimate's fake tensors); the collated batch is made inside them.

        Returns:
            The batch.

        Raises:
            WorkloadError: reading or collating the items failed for a reason other than memory.
        """
        chosen = self.worst_indices(batch_size)
        with _disable_current_modes():
            items = [self.dataset[i] for i in chosen]
        try:
            return self.collate_fn(items)
        except Exception as e:
            if is_oom(e):
                raise
            raise WorkloadError(
                f"collating {batch_size} items of the data set (largest: #{chosen[0]}) raised "
                f"{type(e).__name__}: {e}; items of different shapes need a collate_fn that "
                "pads them",
                batch_size=batch_size,
            ) from e


def as_batch_source(sample: Any) -> Any:
    """A :class:`DataSource` for a map-style dataset or a ``DataLoader``; anything else as given.

    Scans the data now, at the entry, before any device work.

    Returns:
        The data source (scanned), or ``sample`` unchanged.
    """
    if isinstance(sample, (Dataset, DataLoader)):
        sample = DataSource(sample)
    if isinstance(sample, DataSource):
        sample.scan()
    return sample
