"""Issue 17: every size ``tune()`` sets trains the Hugging Face Trainer's own loop; one more not.

The judge is ``Trainer.train`` itself, five optimizer steps inside ``virtual_device(cap)``, on an
MLP, a CNN with batch norm and GPT-2 (its forward returns an output object), with and without
``global_batch`` (then at the accumulation steps the probe ran, which the plan set does not pass).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from judge_transformers import HF_CASES, trainer, trains
from judged import Case

from maxbatch.integrations.transformers import tune

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: c.name)
def test_the_ceiling_trains_the_trainers_loop_and_one_more_does_not(case: Case) -> None:
    t = trainer(case)
    result = tune(t, memory=case.cap, profile=False)
    assert result.steady_state is not None and result.steady_state["zero_grad"] == "after_step"
    assert t.args.per_device_train_batch_size == result.ceiling
    assert trains(case, result.ceiling)
    assert not trains(case, result.ceiling + 1)


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: c.name)
def test_with_global_batch_the_micro_batch_trains_accumulating(case: Case) -> None:
    t = trainer(case)
    result = tune(t, global_batch=case.global_batch, memory=case.cap, profile=False)
    assert result.steady_state is not None
    probed = result.steady_state["micro_batches"]
    micro, steps = t.args.per_device_train_batch_size, t.args.gradient_accumulation_steps
    assert micro * steps == case.global_batch and 1 < steps <= probed
    assert micro <= result.ceiling
    assert trains(case, result.ceiling, accumulate=probed)
    assert not trains(case, result.ceiling + 1, accumulate=probed)
    if (micro, steps) != (result.ceiling, probed):
        assert trains(case, micro, accumulate=steps)
