"""BucketBatchSampler: every batch fits its longest item, every item once, shuffled, ranks even."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from sequences import Sequences, pad_collate
from torch.utils.data import DataLoader

import maxbatch
from maxbatch.batchstats import batch_stats
from maxbatch.data import DataSource
from maxbatch.sampler import BucketBatchSampler, read_lengths

#: (upper length, batch size) per bucket: what a profile of a small model on a small device says.
TABLE = ((32, 48), (64, 20), (128, 9), (256, 4), (512, 1))


def bucket_profile(table: tuple[tuple[int, int], ...] = TABLE) -> maxbatch.BucketProfile:
    """A profile with these (upper length, ceiling) buckets, as find_bucket_sizes returns one."""
    buckets = (maxbatch.Bucket(max_length=upper, ceiling=size) for upper, size in table)
    return maxbatch.BucketProfile(buckets=tuple(buckets))


def long_tailed(n: int = 3000, seed: int = 0) -> list[int]:
    """Lengths 8 to 512, most of them short (a Pareto tail)."""
    rng = random.Random(seed)
    return [min(512, int(8 * rng.paretovariate(1.1))) for _ in range(n)]


LENGTHS = long_tailed()
PROFILE = bucket_profile()


def test_every_item_once_every_batch_fits_and_len_is_exact() -> None:
    profile = bucket_profile()
    sampler = BucketBatchSampler(LENGTHS, profile)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        answers = [profile.batch_size_for(max(LENGTHS[i] for i in b)) for b in batches]
        assert all(len(b) <= a for b, a in zip(batches, answers, strict=True))
        # Full batches everywhere: at most one batch of the epoch is short of its answer.
        assert sum(len(b) < a for b, a in zip(batches, answers, strict=True)) <= 1


def test_batches_hold_one_bucket_except_the_packed_leftovers() -> None:
    profile = bucket_profile()
    batches = list(BucketBatchSampler(LENGTHS, profile, shuffle=False))
    sizes = Counter(profile.batch_size_for(n) for n in LENGTHS)
    mixed = [b for b in batches if len({profile.batch_size_for(LENGTHS[i]) for i in b}) > 1]
    # Leftovers of the five buckets: at most four batches join two buckets.
    assert len(mixed) <= len(TABLE) - 1
    # Steps: about the items of each bucket over its batch size, far fewer than the worst case.
    assert len(batches) <= sum(-(-count // size) for size, count in sizes.items())
    assert len(batches) * 5 < len(LENGTHS)  # a batch of 1 (the 512 bucket's) gives 3000 steps


def test_shuffled_within_buckets_and_across_batches_reproducibly() -> None:
    a = BucketBatchSampler(LENGTHS, bucket_profile(), seed=3)
    b = BucketBatchSampler(LENGTHS, bucket_profile(), seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b) == a.batches(1)
    assert a.batches(0) != a.batches(1) and a.epoch == 1
    assert list(BucketBatchSampler(LENGTHS, bucket_profile(), seed=4)) != list(b)
    # Within a bucket the items are shuffled: the batches are not runs of the data set's order.
    plain = list(BucketBatchSampler(LENGTHS, bucket_profile(), shuffle=False))
    assert all(b == sorted(b) for b in plain[:-5])
    shuffled = list(a)
    assert sum(b == sorted(b) for b in shuffled if len(b) > 5) == 0
    # Across batches: long and short batches interleave instead of running bucket by bucket.
    longest = [max(LENGTHS[i] for i in b) for b in shuffled]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("ranks", [1, 2, 3, 7])
def test_every_rank_gets_the_same_number_of_batches(ranks: int, drop_last: bool) -> None:
    samplers = [
        BucketBatchSampler(LENGTHS, PROFILE, num_replicas=ranks, rank=r, drop_last=drop_last)
        for r in range(ranks)
    ]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert {len(b) for b in per_rank} == {len(s) for s in samplers} == {len(samplers[0])}
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    one = BucketBatchSampler(LENGTHS, bucket_profile(), drop_last=drop_last)
    one.set_epoch(2)
    total = len(one)
    if drop_last:  # the batches that do not divide evenly are dropped: nothing twice
        assert max(seen.values()) == 1
        assert len(per_rank[0]) == total // ranks
    else:  # the first batches repeat to even the count: everything at least once
        assert set(seen) == set(range(len(LENGTHS)))
        assert len(per_rank[0]) == -(-total // ranks)
        assert sum(seen.values()) - len(LENGTHS) == sum(
            len(b) for b in one.batches(2)[: len(per_rank[0]) * ranks - total]
        )


def test_drop_last_drops_the_one_short_batch() -> None:
    profile = bucket_profile(((8, 5),))
    kept = list(BucketBatchSampler([3] * 12, profile, shuffle=False))
    dropped = list(BucketBatchSampler([3] * 12, profile, shuffle=False, drop_last=True))
    assert [len(b) for b in kept] == [5, 5, 2]
    assert dropped == kept[:2]
    assert len(BucketBatchSampler([3] * 12, profile, drop_last=True)) == 2


def test_leftovers_pack_at_the_answer_for_their_longest_item() -> None:
    # 3 long items (batch 4) and 7 short ones (batch 8): one full short batch, then the long
    # leftovers with one short item padded to the long length, then the rest.
    profile = bucket_profile(((10, 8), (20, 4)))
    lengths = [20, 20, 20] + [5] * 15
    batches = list(BucketBatchSampler(lengths, profile, shuffle=False))
    assert [len(b) for b in batches] == [8, 4, 6]
    assert batches[1][:3] == [0, 1, 2]
    assert len(BucketBatchSampler(lengths, profile)) == 3


def test_a_plain_loop_over_a_data_loader() -> None:
    lengths = [n % 60 + 4 for n in range(150)]
    ds = Sequences(lengths)
    source = DataSource(ds, size_fn=lambda it: len(it["input_ids"]))
    sampler = BucketBatchSampler(source, bucket_profile())
    assert sampler.lengths == lengths
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=pad_collate)
    seen = 0
    for batch in loader:
        n, longest = batch["input_ids"].shape
        assert n <= bucket_profile().batch_size_for(longest)
        seen += n
    assert seen == len(ds) and len(loader) == len(sampler)


def test_lengths_from_tensors_arrays_and_data_sets() -> None:
    assert read_lengths(torch.tensor([3, 1, 2])) == [3, 1, 2]
    assert read_lengths(np.array([3, 1, 2])) == [3, 1, 2]
    assert read_lengths((5, 6)) == [5, 6]
    # A plain data set: an item's elements (here one tensor of its length).
    assert read_lengths([torch.zeros(4), torch.zeros(9)]) == [4, 9]


@pytest.mark.parametrize(
    ("lengths", "kwargs", "match"),
    [
        ([], {}, "no items"),
        ([4, 0], {}, "item 1 has length 0"),
        ([4, 2.5], {}, "item 1 has length 2.5"),
        ([4, 513], {}, r"no batch size for length 513 \(item 1\)"),
        ([4], {"rank": 2, "num_replicas": 2}, r"rank=2: expected an int in \[0, 2\)"),
        ([4], {"num_replicas": 0}, "num_replicas"),
        (object(), {}, "cannot read lengths from a object"),
    ],
)
def test_mistakes_are_named(lengths: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(maxbatch.ConfigError, match=match):
        BucketBatchSampler(lengths, bucket_profile(), **kwargs)


class Nothing:
    """A profile (any object with batch_size_for) that answers 0 past 512."""

    def batch_size_for(self, length: int) -> int:
        return 0 if length > 512 else 1


def test_a_profile_where_nothing_fits_is_refused() -> None:
    with pytest.raises(maxbatch.ConfigError, match="batch size 0 for length 600"):
        BucketBatchSampler([600], Nothing())


def test_frameworks_set_the_epoch_through_the_batch_samplers_sampler() -> None:
    sampler = BucketBatchSampler(LENGTHS, bucket_profile())
    loader = DataLoader(Sequences([4] * 3), batch_sampler=sampler)
    assert loader.batch_sampler is sampler
    sampler.sampler.set_epoch(5)  # what Lightning and Accelerate call
    assert sampler.epoch == 5
    assert list(sampler.sampler) == [i for b in sampler.batches(5) for i in b]
    assert len(sampler.sampler) == len(LENGTHS)


def test_stats_report_batch_size_and_tokens_per_step() -> None:
    stats = batch_stats([[0, 1], [2]], [3, 5, 10])
    assert stats.steps == 2 and stats.samples == 3
    assert (stats.mean_batch_size, stats.min_batch_size, stats.max_batch_size) == (1.5, 1, 2)
    assert (stats.mean_tokens, stats.min_tokens, stats.max_tokens) == (9.0, 8, 10)
    assert stats.padded_tokens == 20 and stats.padding_share == pytest.approx(0.1)
    sampler = BucketBatchSampler(LENGTHS, bucket_profile())
    figures = sampler.stats().to_dict()
    assert figures["steps"] == len(sampler) and figures["samples"] == len(LENGTHS)
    assert figures["min_batch_size"] == 1 and figures["max_batch_size"] == 48
    assert figures["mean_tokens"] == pytest.approx(sum(LENGTHS) / len(sampler))
