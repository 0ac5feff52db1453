"""Bucket batches survive shuffled epochs inside the virtual device, in far fewer steps.

A long-tailed length distribution (8 to 512 tokens, most short), a transformer whose attention
(the math kernel) grows with the length squared, and a profile of exact ceiling searches per
bucket at the bucket's longest length: every batch of three shuffled epochs trains inside
``virtual_device`` of the profiled capacity without an out-of-memory error, in several times
fewer steps than the single worst-case batch size.
"""

from __future__ import annotations

import pytest
import torch
from scripts import benchmark_script
from torch.utils.data import DataLoader

import maxbatch

CAP = "24MiB"


@pytest.mark.slow
def test_three_shuffled_epochs_fit_in_far_fewer_steps_than_the_worst_case() -> None:
    with benchmark_script("_bucket_epochs") as bench:
        lengths = bench.long_tailed(1000)
        assert min(lengths) == 8 and max(lengths) == 512
        assert sorted(lengths)[len(lengths) // 2] <= 16  # most are short
        profile = bench.search_profile(lengths, CAP)
        sampler = maxbatch.BucketBatchSampler(lengths, profile, seed=1)
        data = bench.Tokens(lengths)
        steps = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
            _, ooms, peak_share = bench.train_epoch(batches, data, CAP)
            assert ooms == 0 and peak_share <= 1.0
            steps.append(len(batches))
        worst = profile.batch_size_for(512)
        worst_steps = -(-len(lengths) // worst)
        assert steps == [len(sampler)] * 3
        assert worst_steps >= 5 * len(sampler)
        # The profile's ceilings are ceilings: one more item in a full batch of the longest
        # bucket runs out of memory, so the epochs above filled the device, not a fraction.
        _, ooms, _ = bench.train_epoch([list(range(worst + 1))], bench.Tokens([512] * 64), CAP)
        assert ooms == 1


@pytest.mark.slow
def test_the_benchmark_renders_each_strategy() -> None:
    with benchmark_script("_bucket_epochs") as bench:
        lengths = [8] * 30 + [40] * 5
        profile = maxbatch.BucketProfile(
            buckets=(
                maxbatch.Bucket(max_length=16, ceiling=16),
                maxbatch.Bucket(max_length=64, ceiling=4),
            )
        )
        rows = bench.compare(profile, lengths, "64MiB")
        lines = bench.render(rows)
    assert [r.strategy for r in rows] == list(bench.STRATEGIES)
    steps = {r.strategy: r.steps for r in rows}
    # 30 short items in batches of 16, 5 long in 4: 2 + 1 + one packed; the worst case: 9.
    # The budget (4 x 64 = 256 tokens) takes all 30 short items at once: past their ceiling.
    assert steps == {"sampler": 4, "worst case": 9, "token budget": 2}
    assert all(r.oom_errors == 0 and r.samples_per_second > 0 for r in rows)
    assert lines[0].split()[:2] == ["strategy", "steps"] and len(lines) == 4


@pytest.mark.slow
def test_micro_batcher_steps_each_batch_and_survives_a_smaller_device() -> None:
    with benchmark_script("_bucket_epochs") as bench:
        lengths = bench.long_tailed(400, seed=2)
        profile = bench.search_profile(lengths, CAP, uppers=(32, 128, 512))
        sampler = maxbatch.BucketBatchSampler(lengths, profile)
        data = bench.Tokens(lengths)
        largest = max(b.batch_size for b in profile.buckets)

        def epoch(cap: str) -> tuple[int, int, list[tuple[int, int, str]]]:
            steps, samples, changes = 0, 0, []
            with maxbatch.virtual_device(cap):
                model = bench.build_model()
                mb = maxbatch.MicroBatcher(
                    model,
                    torch.optim.AdamW(model.parameters()),
                    micro_batch_size=largest,
                    loss_fn=lambda out, batch: out["loss"],
                    on_change=lambda old, new, why: changes.append((old, new, why)),
                    grow_after=1,
                )
                for batch in DataLoader(data, batch_sampler=sampler, collate_fn=bench.pad_collate):
                    mb.step(batch)
                    steps += 1
                    samples += len(batch["input_ids"])
            return steps, samples, changes

        # On the profiled device every batch is one micro-batch: nothing runs out, nothing splits.
        assert epoch(CAP) == (len(sampler), len(lengths), [])
        # On a smaller device the batches that no longer fit are split, and the epoch completes.
        steps, samples, changes = epoch("16MiB")
        assert (steps, samples) == (len(sampler), len(lengths))
        assert changes and changes[0][2] == "out of memory"
