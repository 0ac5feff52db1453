"""What the integrations set from a result: the pick only when it is sure enough (issue 17)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from maxbatch import BatchSizeResult, find_batch_size
from maxbatch.integrations._common import plan_of


@pytest.fixture(scope="module")
def measured() -> BatchSizeResult:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    result = find_batch_size(
        model, torch.randn(4, 16), memory="1MiB", max_batch_size=16, profile=False
    )
    assert result.ceiling == 16
    return result


def picked(result: BatchSizeResult, confidence: str | None) -> BatchSizeResult:
    reason = None if confidence is None else f"{confidence} for the test"
    return dataclasses.replace(
        result,
        batch_size=result.ceiling // 2,
        profile=dataclasses.replace(
            result.profile, confidence=confidence, confidence_reason=reason
        ),
    )


@pytest.mark.parametrize(
    ("confidence", "uses_pick"), [("high", True), ("medium", True), ("low", False), (None, False)]
)
def test_the_pick_only_at_medium_confidence_or_more(
    measured: BatchSizeResult,
    confidence: str | None,
    uses_pick: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    result = picked(measured, confidence)
    with caplog.at_level(logging.INFO, logger="maxbatch.integrations"):
        plan = plan_of(result)
    assert plan.batch_size == (result.batch_size if uses_pick else result.ceiling)
    assert plan.accumulation_steps == 1 and plan.note is None
    line = caplog.records[-1].getMessage()
    assert f"sets batch size {plan.batch_size} x 1" in line
    if uses_pick:
        assert f"the pick {result.batch_size} ({confidence} confidence)" in line
    else:
        assert f"the ceiling {result.ceiling}, not the pick {result.batch_size}" in line


def test_a_global_batch_is_planned_over_the_size_set(measured: BatchSizeResult) -> None:
    ceiling = measured.ceiling
    low = picked(measured, "low")
    plan = plan_of(low, 4 * ceiling)
    # Over the ceiling, not the unsure pick: 4 micro-batches of the ceiling, not 8 of the pick.
    assert (plan.batch_size, plan.accumulation_steps) == (ceiling, 4)
    assert plan.note is not None and "4 accumulation steps" in plan.note
