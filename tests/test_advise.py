"""The advice arithmetic: accumulation plans, learning-rate scaling, iterations per epoch."""

from __future__ import annotations

import math

import pytest

from maxbatch.errors import ConfigError
from maxbatch.stats.advise import (
    accumulation_plan,
    advise,
    check_even_split,
    iterations_per_epoch,
    per_rank,
    scale_lr,
)


@pytest.mark.parametrize(
    ("global_batch", "ceiling", "micro", "steps", "exact"),
    [
        (256, 300, 256, 1, True),  # fits at once
        (1024, 300, 256, 4, True),  # fewest exact steps
        (1000, 300, 250, 4, True),
        (96, 40, 32, 3, True),
        (1009, 300, 252, 4, False),  # a prime: nearest with 4 steps, difference stated
    ],
)
def test_accumulation_plan(global_batch, ceiling, micro, steps, exact) -> None:
    plan = accumulation_plan(global_batch, ceiling)
    assert (plan.micro_batch, plan.accumulation_steps, plan.exact) == (micro, steps, exact)
    assert plan.micro_batch <= ceiling
    assert plan.effective_batch == micro * steps
    if not exact:
        assert f"{micro * steps - global_batch:+d}" in plan.note
        assert "exactly 1009 takes 1009 steps of 1" in plan.note


@pytest.mark.parametrize(
    ("global_batch", "ceiling", "pick", "micro", "steps", "exact"),
    [
        (1024, 359, 128, 128, 8, True),  # the pick divides the global batch: it is the micro
        (512, 128, 96, 128, 4, True),  # 128 is nearer 96 than 64 is (log scale)
        (256, 300, 128, 128, 2, True),  # fits at once, yet the pick was faster
        (1009, 300, 100, 101, 10, False),  # a prime: 10 steps near the pick, +1 stated
    ],
)
def test_accumulation_plan_centres_on_the_pick(
    global_batch, ceiling, pick, micro, steps, exact
) -> None:
    plan = accumulation_plan(global_batch, ceiling, pick)
    assert (plan.micro_batch, plan.accumulation_steps, plan.exact) == (micro, steps, exact)
    if global_batch <= ceiling:
        assert f"{global_batch} also fits in one step" in plan.note
    if not exact:
        assert "(+1 against 1009); exactly 1009 takes 1009 steps of 1" in plan.note


def test_scale_lr_linear_and_square_root() -> None:
    rates = scale_lr(0.1, 256, 1024)
    assert rates.linear == pytest.approx(0.4)
    assert rates.square_root == pytest.approx(0.2)
    assert scale_lr(1e-3, 64, 16).square_root == pytest.approx(5e-4)


@pytest.mark.parametrize(("n", "b", "steps"), [(50000, 128, 391), (1024, 256, 4), (1, 8, 1)])
def test_iterations_per_epoch(n, b, steps) -> None:
    assert iterations_per_epoch(n, b) == steps == math.ceil(n / b)


def test_advise_combines_everything() -> None:
    advice = advise(96, 128, dataset_size=10_000, global_batch=512, base_batch=256, base_lr=3e-4)
    assert advice.accumulation is not None and advice.effective_batch == 512
    assert advice.iterations_per_epoch == 20
    assert advice.learning_rates is not None
    assert advice.learning_rates.linear == pytest.approx(6e-4)
    assert len(advice.notes) == 3
    assert advice.to_dict()["accumulation"]["accumulation_steps"] == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_batch": 32}, "give base_lr"),
        ({"global_batch": 0}, "global_batch"),
        ({"dataset_size": -5}, "dataset_size"),
    ],
)
def test_advise_rejects_bad_input(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        advise(8, 16, **kwargs)


def test_pick_above_ceiling_is_rejected() -> None:
    with pytest.raises(ConfigError, match="larger than the ceiling"):
        advise(32, 16)


def test_advice_for_a_result_is_the_advice_at_its_pick() -> None:
    from maxbatch import BatchSizeResult, advice_for
    from maxbatch.results import CapacityAnswer, SearchAnswer

    result = BatchSizeResult(
        batch_size=48,
        device="cpu",
        device_name="CPU",
        mode="train",
        precision=None,
        optimizer="AdamW",
        capacity=CapacityAnswer(capacity_bytes=1, headroom_bytes=0, usable_bytes=1, virtual=True),
        search=SearchAnswer(
            ceiling=100, trials=(), memory_model=None, complete=True, stop_reason=""
        ),
        pick_reason="",
        seconds=0.0,
    )
    kw = {"dataset_size": 1000, "global_batch": 256, "base_batch": 32, "base_lr": 1e-3}
    assert advice_for(result, **kw) == advise(48, 100, **kw)


def test_a_global_batch_must_split_evenly_over_the_ranks() -> None:
    check_even_split(None, 3)
    check_even_split(12, 3)
    assert per_rank(12, 3) == 4 and per_rank(None, 3) is None
    for split in (check_even_split, per_rank):
        with pytest.raises(ConfigError, match="global_batch=10 is not a multiple of the 4 ranks"):
            split(10, 4)
