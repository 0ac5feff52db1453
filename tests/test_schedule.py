"""batch_schedule: an LR decay as a batch-size ramp with the same noise lr/B."""

from __future__ import annotations

import pytest

from maxbatch import SchedulePhase, batch_schedule
from maxbatch.errors import ConfigError

STEP_DECAY = [(0, 0.1), (30, 0.02), (60, 0.004), (80, 0.0008)]  # Smith et al.'s /5 steps


def rows(schedule: list[SchedulePhase]) -> list[tuple[int, int, int, float]]:
    return [(p.at, p.micro_batch, p.accumulation, round(p.lr, 10)) for p in schedule]


def test_step_decay_becomes_a_batch_ramp_at_the_peak_rate() -> None:
    schedule = batch_schedule(STEP_DECAY, base_batch=128, ceiling=512)
    assert rows(schedule) == [
        (0, 128, 1, 0.1),
        (30, 320, 2, 0.1),  # 640 = 2 x 320 (the exact divisor nearest the ceiling)
        (60, 400, 8, 0.1),  # 3200
        (80, 500, 32, 0.1),  # 16000
    ]
    assert [p.global_batch for p in schedule] == [128, 640, 3200, 16000]


@pytest.mark.parametrize("max_batch", [None, 1000, 2048])
@pytest.mark.parametrize("ceiling", [100, 512, 4096])
def test_the_noise_lr_over_batch_is_the_original_schedules(max_batch, ceiling) -> None:
    schedule = batch_schedule(STEP_DECAY, base_batch=128, ceiling=ceiling, max_batch=max_batch)
    original = dict(STEP_DECAY)
    for phase in schedule:
        assert phase.lr / phase.global_batch == pytest.approx(original[phase.at] / 128)
        assert phase.micro_batch <= ceiling
        assert phase.global_batch == phase.micro_batch * phase.accumulation
        if max_batch is not None:
            assert phase.global_batch <= max_batch * 1.01


def test_past_max_batch_the_rate_decays_instead() -> None:
    schedule = batch_schedule(STEP_DECAY, base_batch=128, ceiling=512, max_batch=2048)
    assert rows(schedule)[2:] == [(60, 512, 4, 0.064), (80, 512, 4, 0.0128)]


def test_steps_start_where_as_many_samples_were_seen() -> None:
    schedule = batch_schedule(STEP_DECAY, base_batch=128, ceiling=512, unit="step")
    # 30 steps of 128 = 3840 samples; then 30 x 128 more at 640 = 6 steps; then 20 x 128 at 3200.
    assert [p.at for p in schedule] == [0, 30, 36, 37]


def test_warm_up_keeps_the_rate_and_a_function_is_sampled() -> None:
    def lr(epoch: int) -> float:
        return 0.1 * (epoch + 1) / 3 if epoch < 3 else 0.1 * 0.5 ** (epoch - 2)

    schedule = batch_schedule(lr, base_batch=64, ceiling=1024, until=6)
    assert [p.global_batch for p in schedule] == [64, 64, 64, 128, 256, 512]
    assert [round(p.lr, 4) for p in schedule] == [0.0333, 0.0667, 0.1, 0.1, 0.1, 0.1]
    assert [p.at for p in schedule] == list(range(6))
    assert schedule[0].to_dict()["micro_batch"] == 64


@pytest.mark.parametrize(
    ("schedule", "kwargs", "match"),
    [
        ([], {}, "empty"),
        ([(5, 0.1)], {}, "start at 0"),
        ([(0, 0.1), (0, 0.01)], {}, "must increase"),
        ([(0, -0.1)], {}, "positive"),
        ([(0, 0.1)], {"micro_batch": 600}, "above the ceiling"),
        ([(0, 0.1)], {"max_batch": 64}, "below base_batch"),
        ([(0, 0.1)], {"unit": "minute"}, "epoch or step"),
        (lambda e: 0.1, {}, "until"),
    ],
)
def test_invalid(schedule, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        batch_schedule(schedule, base_batch=128, ceiling=512, **kwargs)
