"""Issue 17: every size ``MaxBatch`` sets trains Lightning's own loop, and one more does not.

The judge is ``trainer.fit`` itself, five optimizer steps inside ``virtual_device(cap)``, on an
MLP, a CNN with batch norm and a model whose forward returns an output object, with and without
``global_batch`` (then the micro-batch ceiling is judged with two accumulated micro-batches, and
the plan set is trained as set).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("lightning.pytorch")

from judge_lightning import Manual, module, trainer, trains
from judged import CASES, Case

from maxbatch.integrations.lightning import MaxBatch

pytestmark = pytest.mark.slow


def probe(case: Case, kind: Any = None, **kwargs: Any) -> MaxBatch:
    tuner = MaxBatch(memory=case.cap, profile=False, global_batch=kwargs.pop("global_batch", None))
    trainer(tuner, steps=1, **kwargs).fit(module(case, 4, kind=kind) if kind else module(case, 4))
    assert tuner.result is not None and tuner.plan is not None
    return tuner


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_ceiling_trains_lightnings_loop_and_one_more_does_not(case: Case) -> None:
    tuner = probe(case)
    assert tuner.result is not None and tuner.result.steady_state is not None
    assert tuner.result.steady_state["zero_grad"] == "before_backward"
    ceiling = tuner.result.ceiling
    assert tuner.plan is not None and tuner.plan.batch_size == ceiling
    assert trains(case, ceiling)
    assert not trains(case, ceiling + 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_with_global_batch_the_micro_batch_trains_accumulating(case: Case) -> None:
    tuner = probe(case, global_batch=case.global_batch)
    assert tuner.result is not None and tuner.plan is not None
    assert tuner.result.steady_state is not None
    assert tuner.result.steady_state["micro_batches"] == 2
    ceiling, plan = tuner.result.ceiling, tuner.plan
    assert trains(case, ceiling, accumulate=2)
    assert not trains(case, ceiling + 1, accumulate=2)
    assert plan.batch_size * plan.accumulation_steps == case.global_batch
    assert plan.accumulation_steps > 1 and plan.batch_size <= ceiling
    assert trains(case, plan.batch_size, accumulate=plan.accumulation_steps)


def test_precision_clipping_and_the_trainers_own_accumulation() -> None:
    case = CASES[2]  # the output object, whose gradients weigh most
    options = {"precision": "bf16-mixed", "gradient_clip_val": 1.0}
    tuner = probe(case, accumulate=2, **options)
    assert tuner.result is not None and tuner.plan is not None
    ceiling = tuner.result.ceiling
    assert tuner.plan.accumulation_steps == 1  # no global_batch: the trainer's 2 are kept
    assert trains(case, ceiling, accumulate=2, **options)
    assert not trains(case, ceiling + 1, accumulate=2, **options)


def test_manual_optimization_is_judged_by_its_own_order() -> None:
    case = CASES[2]
    tuner = probe(case, kind=Manual)
    assert tuner.result is not None
    ceiling = tuner.result.ceiling
    assert trains(case, ceiling, kind=Manual)
    assert not trains(case, ceiling + 1, kind=Manual)
