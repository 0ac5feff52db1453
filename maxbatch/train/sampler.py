"""``BucketBatchSampler``: batches that fill memory at every length, from a bucket profile.

Items are grouped by the profile's length buckets; each bucket is cut into batches of the profile's
answer for its longest length, so every batch fits: its size is at most the answer for the longest
item in it, and a padding collate pads it to at most that length. The leftovers of the buckets
(fewer items than a batch) are packed together, longest first, at the answer for the longest item
of each packed batch, so an epoch has at most one short batch. Every item is in exactly one batch
of an epoch; the order within buckets and of the batches is shuffled, reproducibly from the seed
and the epoch (:meth:`BucketBatchSampler.set_epoch`).

Under ``torch.distributed`` the epoch's batches are dealt round-robin to the ranks, and every rank
gets the same number (an uneven count would leave one rank waiting in an all-reduce for ever):
``drop_last=False`` repeats the first batches of the epoch until the count divides evenly (those
items are seen twice that epoch, on other ranks), ``drop_last=True`` drops the last few batches
(and the one short batch) instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import cycle, islice
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from maxbatch.errors import ConfigError, MaxbatchError
from maxbatch.grid import positive_int
from maxbatch.train.batchstats import BatchStats, batch_stats

__all__ = ["BucketBatchSampler", "ItemOrder", "SizeProfile", "read_lengths"]

#: An odd 64-bit constant (the golden ratio's) that spreads seeds apart from epochs.
_MIX = 0x9E3779B97F4A7C15


class SizeProfile(Protocol):
    """What the sampler reads of a :class:`~maxbatch.BucketProfile`: the batch size per length."""

    def batch_size_for(self, length: int) -> int:
        """The largest batch that fits when its longest item has ``length``."""
        ...


def read_lengths(data: Any) -> list[int]:
    """Every item's length: given as numbers, or read from a data set.

    Args:
        data: a list (tuple, 1-d tensor, array) of int lengths; a map-style data set whose
            items are read once for their size (the elements of their tensors); or a
            :class:`~maxbatch.DataSource`, whose ``size_fn`` gives an item's length.

    Returns:
        One length per item.

    Raises:
        ConfigError: a length is not an int >= 1, or the data cannot be read for lengths.
        WorkloadError: reading an item of a data set failed.
    """
    from maxbatch.step.data import DataSource, item_size

    size_fn = None  # the elements of an item's tensors
    if isinstance(data, DataSource):
        size_fn, data = data.size_fn, data.dataset
    elif hasattr(data, "tolist") and hasattr(data, "dtype"):  # a tensor or a NumPy array
        data = data.tolist()
    if isinstance(data, (list, tuple, range)) and all(isinstance(n, (int, float)) for n in data):
        lengths = list(data)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        lengths = [item_size(data, i, size_fn) for i in range(len(data))]
    else:
        raise ConfigError(
            f"cannot read lengths from a {type(data).__name__}: pass the items' lengths (a list "
            "of ints), a map-style data set, or DataSource(dataset, size_fn=...)"
        )
    if not lengths:
        raise ConfigError("there are no items: the sampler has nothing to batch")
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"item {i} has length {n!r}; lengths are ints >= 1")
    return lengths


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose size fits their longest item: ``DataLoader(batch_sampler=...)``.

    Args:
        lengths_or_dataset: the items' lengths (a list of ints, a 1-d tensor or array), a
            map-style data set (each item read once, its size the elements of its tensors), or a
            :class:`~maxbatch.DataSource` whose ``size_fn`` returns an item's length. Lengths are
            in the unit of the profile (tokens, frames).
        profile: a :class:`~maxbatch.BucketProfile` (anything with ``batch_size_for(length)``).
        shuffle: shuffle the items within each bucket and the order of the batches, anew each
            epoch (from ``seed`` and the epoch); False keeps the data set's order, shortest first.
        seed: the seed of the shuffle, the same on every rank.
        drop_last: drop the epoch's one short batch (and, over several ranks, the batches that
            do not divide evenly) instead of keeping it (and repeating batches to even them).
        num_replicas: ranks the batches are dealt to; default the ``torch.distributed`` world
            size when a process group is initialised, else 1.
        rank: this rank; default the ``torch.distributed`` rank, else 0.

    Raises:
        ConfigError: no items, a length that is not an int >= 1 or that the profile has no
            batch size for, or an invalid option.
    """

    def __init__(
        self,
        lengths_or_dataset: Any,
        profile: SizeProfile,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        self.lengths = read_lengths(lengths_or_dataset)
        self.profile = profile
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = _ranks(num_replicas, rank)
        self.epoch = 0
        self._groups = _groups(self.lengths, profile)
        self._len = len(self._rank_batches(self._epoch_batches(shuffle=False)))
        # Lightning and Accelerate call set_epoch on ``loader.batch_sampler.sampler``.
        self.sampler = ItemOrder(self)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next epoch as ``epoch``: call it before each epoch, on every rank."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._rank_batches(self._epoch_batches(shuffle=self.shuffle))

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the current one), as iterating yields them.

        Returns:
            The batches, lists of item indices.
        """
        if epoch is None:
            return list(self)
        kept, self.epoch = self.epoch, epoch
        try:
            return list(self)
        finally:
            self.epoch = kept

    def stats(self, epoch: int | None = None) -> BatchStats:
        """Batch size and tokens per step of this rank's batches of ``epoch``, and their padding.

        Returns:
            The figures.
        """
        return batch_stats(self.batches(epoch), self.lengths)

    def _epoch_batches(self, *, shuffle: bool) -> list[list[int]]:
        """The epoch's batches over all ranks: full batches per group, then the leftovers packed."""
        # Not seed + epoch: seed 4 at epoch 0 would repeat seed 3 at epoch 1.
        g = torch.Generator().manual_seed((self.seed * _MIX + self.epoch) % 2**64)
        batches: list[list[int]] = []
        leftovers: list[tuple[int, list[int]]] = []
        for size, members in self._groups:
            if shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            full = len(members) - len(members) % size
            batches += [members[j : j + size] for j in range(0, full, size)]
            leftovers.append((size, members[full:]))
        packed = _pack(leftovers)
        if packed and self.drop_last and len(packed[-1][1]) < packed[-1][0]:
            packed.pop()
        batches += [b for _, b in packed]
        if shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def _rank_batches(self, batches: list[list[int]]) -> list[list[int]]:
        """This rank's share: every ``num_replicas``-th batch, the count evened over the ranks."""
        extra = len(batches) % self.num_replicas
        if extra and self.drop_last:
            batches = batches[: len(batches) - extra]
        elif extra:
            batches = batches + list(islice(cycle(batches), self.num_replicas - extra))
        return batches[self.rank :: self.num_replicas]


class ItemOrder(Sampler[int]):
    """A bucket sampler's items in the order of its batches: its ``sampler``, as a BatchSampler's.

    ``set_epoch`` sets the bucket sampler's epoch, so frameworks that shuffle through
    ``loader.batch_sampler.sampler.set_epoch`` (Lightning, Accelerate) shuffle it too.
    """

    def __init__(self, owner: BucketBatchSampler):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        """Set the owner's epoch."""
        self.owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (i for batch in self.owner for i in batch)

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.owner)


def _ranks(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """The number of ranks and this rank: given, else torch.distributed's, else 1 and 0."""
    grouped = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if grouped else 1
    if rank is None:
        rank = dist.get_rank() if grouped else 0
    positive_int(num_replicas, "num_replicas")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ConfigError(f"rank={rank!r}: expected an int in [0, {num_replicas})")
    return num_replicas, rank


def _groups(lengths: Sequence[int], profile: SizeProfile) -> list[tuple[int, list[int]]]:
    """The items grouped by their batch size, longest lengths first: ``(batch size, indices)``.

    A profile answers one batch size per bucket, so a group is a bucket (or neighbouring buckets
    with the same answer). Every item of a group shares its answer, so a batch of that many of
    them fits whichever item is the longest.

    Returns:
        ``(batch size, item indices)`` per group, the group of the longest items first.

    Raises:
        ConfigError: the profile has no batch size for a length, or answers one below 1.
    """
    answers: dict[int, int] = {}
    for length in sorted(set(lengths)):
        try:
            size = profile.batch_size_for(length)
        except MaxbatchError as e:
            raise ConfigError(
                f"the profile has no batch size for length {length} "
                f"(item {lengths.index(length)}): {e}"
            ) from e
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(
                f"the profile answers batch size {size!r} for length {length}; nothing fits: "
                "leave such items out or profile a larger device"
            )
        answers[length] = size
    members: dict[int, list[int]] = {}
    longest: dict[int, int] = {}
    for i, length in enumerate(lengths):
        size = answers[length]
        members.setdefault(size, []).append(i)
        longest[size] = max(longest.get(size, 0), length)
    return [(size, members[size]) for size in sorted(members, key=lambda s: -longest[s])]


def _pack(leftovers: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
    """Pack the groups' leftover items, longest groups first, into as few batches as fit.

    A batch holds at most the smallest batch size of the groups in it: with a profile whose
    answer falls as the length grows, that is the answer for its longest item.

    Returns:
        ``(capacity, indices)`` per batch; only the last can hold fewer than its capacity.
    """
    packed: list[tuple[int, list[int]]] = []
    cap, current = 0, list[int]()
    for size, items in leftovers:
        for i in items:
            if current and len(current) >= min(cap, size):
                packed.append((cap, current))
                current = []
            cap = min(cap, size) if current else size
            current.append(i)
    if current:
        packed.append((cap, current))
    return packed
