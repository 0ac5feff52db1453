"""The length axis, for real: profiles and longest lengths against brute force (virtual device)."""

from __future__ import annotations

import itertools
from typing import Any

import lengthmodels as lm
import pytest
import torch
from models import TinyEncoder
from sequences import Sequences, lengths, pad_collate

from maxbatch import DoesNotFitError, find_bucket_sizes, find_max_length
from maxbatch.memtrace import MemoryTrace
from maxbatch.run.lengthrun import LengthBatches, Runner, open_runner
from maxbatch.search.lengthmodel import LengthFit, Point
from maxbatch.search.lengthorders import second_size

CAP = "1MiB"
BINS = (4, 8, 16, 32)
STEP = {"loss_fn": lm.loss_fn, "optimizer": "sgd"}


def _runner(
    model: torch.nn.Module, make_batch: Any = lm.make_batch, memory: str = CAP, **step: Any
) -> Any:
    return open_runner(
        model,
        LengthBatches(make_batch),
        device=None,
        memory=memory,
        headroom=None,
        step_options=step or STEP,
    )


def _brute_ceiling(runner: Runner, length: int, start: int = 1) -> int:
    """Every batch size from ``start`` up, until the first that does not fit."""
    b = start
    while runner.run(b, length):
        b += 1
    return b - 1


@pytest.mark.slow
@pytest.mark.parametrize("build", [lm.recurrent, lm.attention], ids=["recurrent", "attention"])
def test_each_bucket_ceiling_equals_brute_force(build: Any) -> None:
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile = find_bucket_sizes(model, lm.make_batch, buckets=BINS, memory=CAP, **STEP)
    assert [b.max_length for b in profile.buckets] == list(BINS)
    with _runner(build()) as runner:
        # from half the answer up (every size from 1 up at the longest bucket): smaller sizes
        # fit a fortiori, and their trials would only slow the test
        starts = [max(1, b.ceiling // 2) for b in profile.buckets[:-1]] + [1]
        brute = [_brute_ceiling(runner, n, s) for n, s in zip(BINS, starts, strict=True)]
    assert [b.ceiling for b in profile.buckets] == brute
    assert brute[0] > brute[-1] >= 1
    # two fitting trials, then two per bucket, for the quadratic model too: each step's growth
    # order is read from the two fitting trials, so no third length is needed
    assert len(profile.trials) <= 2 * len(BINS) + 2
    assert [b.predicted_ceiling for b in profile.buckets] == brute
    assert profile.memory_model is not None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is left as found


@pytest.mark.slow
def test_a_profile_that_assumes_linear_growth_fails_on_attention_not_on_recurrence() -> None:
    outcomes = {}
    for name, build in (("recurrent", lm.recurrent), ("attention", lm.attention)):
        with _runner(build()) as runner:
            for b in (1, 6):
                for n in (16, 32):
                    runner.run(b, n)
            linear = LengthFit(runner.usable_bytes, quadratic=False)
            for point in runner.fit.points:
                linear.add(point)
            guess = linear.ceiling(4, limit=10_000)
            assert guess is not None
            outcomes[name] = (guess, _brute_ceiling(runner, 4), runner.run(guess, 4))
    guess, brute, fits = outcomes["recurrent"]
    assert (guess, fits) == (brute, True)
    guess, brute, fits = outcomes["attention"]
    assert guess > brute
    assert not fits  # the linear profile's batch runs out of memory at the short length


def _gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=256, n_embd=32, n_layer=2, n_head=2, attn_implementation="eager"
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _lm_batch(batch_size: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (batch_size, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_find_max_length_equals_brute_force_on_a_causal_lm(batch_size: int) -> None:
    result = find_max_length(
        _gpt2(), _lm_batch, batch_size=batch_size, memory="4MiB", optimizer="sgd"
    )
    with _runner(_gpt2(), _lm_batch, memory="4MiB", optimizer="sgd") as runner:
        # every length from a quarter of the answer up (shorter ones fit a fortiori)
        n = max(1, result.max_length // 4)
        while runner.run(batch_size, n):
            n += 1
    assert result.max_length == n - 1
    assert result.to_dict()["max_length"] == result.max_length
    assert all(t.batch_size == batch_size for t in result.trials)


@pytest.mark.slow
def test_length_multiple_of_verifies_the_next_multiple() -> None:
    result = find_max_length(
        lm.attention(), lm.make_batch, batch_size=8, length_multiple_of=8, memory=CAP, **STEP
    )
    assert result.max_length % 8 == 0
    seen = {t.length: t.fits for t in result.trials}
    assert seen[result.max_length] is True
    assert seen[result.max_length + 8] is False
    assert all(t.length % 8 == 0 for t in result.trials)


def test_the_shortest_length_not_fitting_is_a_typed_error() -> None:
    with pytest.raises(DoesNotFitError, match="does not fit at batch size 4096"):
        find_max_length(lm.attention(), lm.make_batch, batch_size=4096, memory=CAP, **STEP)


@pytest.mark.slow
def test_a_data_set_with_lengths_gives_quantile_buckets_and_shares() -> None:
    sizes = lengths(n=120, long=4)
    profile = find_bucket_sizes(
        TinyEncoder(),
        Sequences(sizes),
        buckets=3,
        size_fn=lambda item: len(item["input_ids"]),
        collate_fn=pad_collate,
        memory="2MiB",
        optimizer="sgd",
    )
    assert profile.buckets[-1].max_length == max(sizes)
    assert sum(b.items for b in profile.buckets) == len(sizes)
    assert abs(sum(b.share for b in profile.buckets) - 1.0) < 1e-9
    ceilings = [b.ceiling for b in profile.buckets]
    assert ceilings == sorted(ceilings, reverse=True)
    assert profile.batch_size_for(max(sizes)) == ceilings[-1]
    assert sum(count for _, _, count in profile.histogram) == len(sizes)


def _trace(batch_size: int, length: int) -> MemoryTrace:
    """A step of known monomials: weights, then a token tensor, scores, a step freeing both."""
    b, n = batch_size, length
    steps = [4096, 64 * b * n, 4 * b * n * n, 16 * b, 32 * b * n - 64 * b * n - 4 * b * n * n]
    live = tuple(int(v) for v in itertools.accumulate(steps))
    return MemoryTrace(batch_size=b, live=live, batched=live, complete=True)


def test_two_trials_read_each_steps_order_and_predict_a_quadratic_ceiling() -> None:
    usable = 2_000_000
    fit = LengthFit(usable)
    first = 2
    second = second_size(first, 4 / 32, limit=10_000)
    assert second != first  # the fixed and per-sample parts told apart
    for b, n in ((first, 32), (second, 4)):
        trace = _trace(b, n)
        fit.add(Point(batch_size=b, length=n, peak_bytes=max(trace.live), trace=trace))
    for length in (4, 8, 16, 32, 64):
        c = fit.ceiling(length, limit=100_000)
        assert c is not None  # it fits; one more does not
        assert max(_trace(c, length).live) <= usable < max(_trace(c + 1, length).live)
    linear = LengthFit(usable, quadratic=False)  # without the b*L**2 column: wrong past 32
    for point in fit.points:
        linear.add(point)
    assert linear.ceiling(64, limit=100_000) != fit.ceiling(64, limit=100_000)
