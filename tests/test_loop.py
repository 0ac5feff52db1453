"""The loop's steady state: gradient-clearing orders, accumulation and leaks (issue 17).

Every number the probe gives is judged by a plain user loop (:func:`tests.loops.train`) inside
``virtual_device(cap)``: five optimizer steps at the answer, and the next size up runs out.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import maxbatch
from maxbatch.errors import ConfigError, LeakError
from maxbatch.step.loop import Loop, ZeroGrad
from tests.loops import object_net, train
from tests.models import cnn, mlp

CAP = 1024 * 1024
MODELS = {"mlp": mlp, "cnn": cnn, "object": object_net}


def probe(model: torch.nn.Module, sample: Any, **kwargs: Any) -> maxbatch.BatchSizeResult:
    return maxbatch.find_batch_size(
        model, sample, memory=CAP, profile=False, optimizer=torch.optim.AdamW, **kwargs
    )


def judge(name: str, batch_size: int, **loop: Any) -> None:
    """``batch_size`` trains the user's loop five steps; ``batch_size + 1`` runs out."""
    model, sample = MODELS[name]()
    train(model, sample, batch_size, CAP, **loop)
    model, sample = MODELS[name]()
    with pytest.raises(torch.OutOfMemoryError):
        train(model, sample, batch_size + 1, CAP, **loop)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("before_forward", ZeroGrad.BEFORE_FORWARD),
        ("before-backward", ZeroGrad.BEFORE_BACKWARD),
        (ZeroGrad.AFTER_STEP, ZeroGrad.AFTER_STEP),
    ],
)
def test_zero_grad_spellings(value: Any, expected: ZeroGrad) -> None:
    assert Loop.build(zero_grad=value).zero_grad is expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"zero_grad": "sometimes"}, "zero_grad='sometimes' is not valid; choose one of"),
        ({"accumulate": 0}, "accumulate"),
        ({"allow_growth": "lots"}, "allow_growth"),
    ],
)
def test_bad_loop_options_are_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Loop.build(**kwargs)


def test_a_train_step_has_its_own_order() -> None:
    model, x = mlp()
    with pytest.raises(ConfigError, match="train_step runs your whole step"):
        probe(model, x, train_step=lambda m, b, o: None, zero_grad="before_backward")


@pytest.mark.slow
def test_steady_state_says_what_was_measured() -> None:
    model, x = mlp()
    plain = probe(model, x)
    late = probe(model, x, zero_grad="before_backward")
    assert plain.steady_state is not None and late.steady_state is not None
    assert plain.steady_state["steps_per_trial"] == 2
    assert plain.steady_state["zero_grad"] == "before_forward"
    assert plain.steady_state["micro_batches"] == 1
    assert "optimizer state" in plain.steady_state["alive_at_start"]
    assert "gradients" not in plain.steady_state["alive_at_start"]
    assert "gradients" in late.steady_state["alive_at_start"]
    data = json.loads(json.dumps(late.to_dict()))
    assert data["steady_state"]["zero_grad"] == "before_backward"
    # Extra steps inside a trial are not extra trials: three verify the ceiling.
    assert len(plain.trials) == 3 and plain.trials[0].steps == 4


@pytest.mark.slow
@pytest.mark.parametrize("order", ["before_forward", "before_backward", "after_step"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_ceiling_trains_the_users_loop(name: str, order: str) -> None:
    model, sample = MODELS[name]()
    result = probe(model, sample, zero_grad=order)
    judge(name, result.ceiling, zero_grad=order)


class Leaky(torch.nn.Module):
    """The issue's leaking step: a list of losses that keep their graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 8)
        self.history: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        self.history.append(h.pow(2).mean())  # logged, never backpropagated: keeps ``h``
        return self.head(h)


@pytest.mark.slow
def test_a_leak_is_named_not_measured() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    with pytest.raises(LeakError, match=r"each step kept .* more live memory") as info:
        probe(Leaky(), x)
    assert info.value.bytes_per_step >= 4 * 64 * 4  # the kept activation of 4 rows
    assert info.value.graph_tensors > 0
    assert "autograd graph" in str(info.value)
    # The same model without the leak: the ceiling of the plain step.
    leaky, fixed = Leaky(), Leaky()
    fixed.forward = lambda x: fixed.head(fixed.net(x))  # type: ignore[method-assign]
    assert probe(fixed, x).ceiling == probe(torch.nn.Sequential(fixed.net, fixed.head), x).ceiling
    # A bounded growth accepted on purpose: the probe goes on.
    assert probe(leaky, x, allow_growth="1MiB").ceiling > 0


@pytest.mark.slow
def test_a_leak_exits_1_in_the_cli(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from maxbatch.cli import main

    path = tmp_path / "leaky.py"
    path.write_text(
        "import torch\n"
        "from tests.test_loop import Leaky\n"
        "model = Leaky()\n"
        "sample = torch.randn(4, 32)\n"
    )
    result = CliRunner().invoke(
        main, ["probe", str(path), "--memory", "1MiB", "--no-profile", "--no-cache"]
    )
    assert result.exit_code == 1
    assert "the step leaks" in result.output


@pytest.mark.slow
@pytest.mark.parametrize(("name", "global_batch"), [("mlp", 4096), ("cnn", 64), ("object", 4096)])
def test_a_global_batch_plan_trains_the_accumulating_loop(name: str, global_batch: int) -> None:
    model, sample = MODELS[name]()
    result = probe(model, sample, global_batch=global_batch)
    micro = result.accumulation_ceiling
    assert micro is not None and micro <= result.ceiling
    assert 1 <= len(result.accumulation_trials) <= 2  # the extra term predicts it
    judge(name, micro, accumulate=2)
    assert result.advice is not None
    plan = result.advice.accumulation
    assert plan is not None
    assert plan.micro_batch <= micro and plan.accumulation_steps > 1
    model, sample = MODELS[name]()
    train(model, sample, plan.micro_batch, CAP, accumulate=plan.accumulation_steps)


def test_the_plan_takes_its_micro_batch_from_the_accumulating_trials() -> None:
    model, x = mlp()
    plain = probe(model, x)
    # Twice the plain ceiling: without accumulation measured, the plan was ceiling x 2.
    result = probe(model, x, global_batch=2 * plain.ceiling)
    assert result.accumulation_ceiling is not None
    assert result.accumulation_ceiling < plain.ceiling
    assert result.advice is not None
    plan = result.advice.accumulation
    assert plan is not None and plan.micro_batch <= result.accumulation_ceiling
    assert "accumulating keeps a second gradient" in plan.note
    assert result.memory_model is not None and result.memory_model.accumulation_bytes > 0
    model, x = mlp()
    with pytest.raises(torch.OutOfMemoryError):  # the old plan's micro-batch
        train(model, x, plain.ceiling, CAP, accumulate=2)
    model, x = mlp()
    train(model, x, plan.micro_batch, CAP, accumulate=plan.accumulation_steps)


@pytest.mark.slow
def test_accumulate_makes_every_trial_accumulate() -> None:
    model, x = mlp()
    result = probe(model, x, accumulate=2)
    assert result.steady_state is not None and result.steady_state["micro_batches"] == 2
    assert result.accumulation_ceiling == result.ceiling
    judge("mlp", result.ceiling, accumulate=2)


def test_micro_batcher_from_result_stays_under_the_accumulating_ceiling() -> None:
    model, x = mlp()
    result = probe(model, x, global_batch=4096)
    assert result.accumulation_ceiling is not None
    assert result.accumulation_ceiling < result.batch_size  # profile=False: the pick is the ceiling
    model, x = mlp()
    opt = torch.optim.AdamW(model.parameters())
    changes: list[Any] = []
    batcher = maxbatch.MicroBatcher.from_result(
        result, model, opt, on_change=lambda *a: changes.append(a)
    )
    assert batcher.micro_batch_size == result.accumulation_ceiling
    # Batches from the host (on a GPU they would be), micro-batches on the device.
    batches = [torch.randn(2 * batcher.micro_batch_size, 32) for _ in range(5)]
    with maxbatch.virtual_device(CAP) as device:
        device.track(model)
        for batch in batches:
            batcher.step(batch)
    assert changes == []
    # Without accumulating trials the model's extra term predicts the micro-batch ceiling.
    model, x = mlp()
    predicted = probe(model, x).micro_ceiling()
    assert predicted < result.ceiling
    assert abs(predicted - result.accumulation_ceiling) <= 0.02 * result.ceiling


@pytest.mark.parametrize(
    ("global_batch", "pick", "ceiling", "note"),
    [
        (1000, 4000, 5000, "1 step of 1000 samples: no accumulation is needed"),
        (1000, 2000, 5000, "1 step of 1000 samples: no accumulation is needed"),
        (1009, 300, 400, "3 accumulation steps of 336 samples make 1008 (-1 against 1009)"),
        (4096, 512, 1000, "8 accumulation steps of 512 samples make exactly 4096"),
    ],
)
def test_the_accumulation_note_reads_right(
    global_batch: int, pick: int, ceiling: int, note: str
) -> None:
    from maxbatch.stats.advise import accumulation_plan

    plan = accumulation_plan(global_batch, ceiling, pick)
    assert plan.note.startswith(note)
    assert "1 accumulation steps" not in plan.note and "1 steps" not in plan.note


def test_the_loop_order_is_part_of_the_cache_key() -> None:
    model, x = mlp()
    first = probe(model, x, cache=True)
    again = probe(model, x, cache=True)
    other = probe(model, x, cache=True, zero_grad="before_backward")
    assert not first.from_cache and again.from_cache
    assert not other.from_cache  # measured in its own order, not taken from the plain loop's


@pytest.mark.parametrize(
    ("live", "kept"),
    [
        ((10, 20, 20, 20), 0),  # the first step makes the loop's state
        ((10, 20, 30, 30), 0),  # state made once by a later step is no leak
        ((10, 20, 30, 40), 10),  # every step keeps 10 bytes
        ((10, 20, 35, 45), 10),  # the smaller growth is what every step keeps
        ((10, 20, 15, 10), 0),
    ],
)
def test_growth_is_a_leak_only_when_every_step_keeps_bytes(
    live: tuple[int, ...], kept: int
) -> None:
    from maxbatch.search.leaks import Growth

    values = iter(live)
    growth = Growth(lambda: next(values))
    for step in range(1, len(live) + 1):
        growth.after_step(step)
    assert growth.per_step() == kept
