"""find_batch_size on the CPU and the virtual device: exact against brute force, state safe."""

from __future__ import annotations

import copy
import logging
import random
import threading

import numpy as np
import pytest
import torch
from models import MODELS, cnn, encoder, mlp

from maxbatch import (
    ConfigError,
    DeviceError,
    DoesNotFitError,
    EstimateError,
    WorkloadError,
    estimate_batch_size,
    find_batch_size,
)
from maxbatch.devices.accounting import MemoryCounter
from maxbatch.search.meter import CountingMeter
from maxbatch.search.trial import run_trial
from maxbatch.step.forward import default_forward
from maxbatch.step.spec import StepSpec
from maxbatch.step.workload import build_workload


def brute_force(
    name: str,
    cap: int,
    *,
    optimizer: str = "adamw",
    m: int = 1,
    upper: int | None = None,
    mode: str = "train",
) -> int:
    """The largest multiple of ``m`` that fits, scanning every size upward from ``m``."""
    model, sample = MODELS[name]()
    step = StepSpec.build(model, sample, optimizer=optimizer, mode=mode)
    cpu = torch.device("cpu")
    with build_workload(step, cpu) as work, CountingMeter(cpu) as meter:
        meter.set_usable(cap)
        best, b, failures = 0, m, 0
        while failures < 3 and (upper is None or b <= upper):
            if run_trial(work, meter, b).fits:
                best, failures = b, 0
            else:
                failures += 1
            b += m
    return best


# ceilings between about 40 and 140, so that the brute-force scan stays short
CAPS = {
    "mlp": [100_000, 200_000],
    "cnn": [1_500_000, 3_500_000],
    "encoder": [1_000_000, 2_000_000],
    "gru": [600_000, 1_200_000],
}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "cap"), [(n, c) for n, caps in CAPS.items() for c in caps])
def test_ceiling_equals_brute_force(name: str, cap: int) -> None:
    model, sample = MODELS[name]()
    result = find_batch_size(model, sample, memory=cap, profile=False)
    assert result.ceiling == brute_force(name, cap)
    assert result.batch_size == result.ceiling
    assert result.throughput == ()
    tried = {t.batch_size: t.fits for t in result.trials}
    assert tried[result.ceiling] and tried[result.ceiling + 1] is False
    assert result.virtual and result.capacity_bytes == cap and result.headroom_bytes == 0


@pytest.mark.parametrize(
    ("name", "cap", "m", "upper"),
    [
        ("mlp", 200_000, 8, None),
        ("cnn", 3_500_000, 4, None),
        ("mlp", 200_000, 1, 50),
        ("encoder", 2_000_000, 3, 40),
    ],
)
def test_multiple_of_and_max_batch_size(name: str, cap: int, m: int, upper: int | None) -> None:
    model, sample = MODELS[name]()
    result = find_batch_size(
        model, sample, memory=cap, multiple_of=m, max_batch_size=upper, profile=False
    )
    assert result.ceiling == brute_force(name, cap, m=m, upper=upper)
    assert result.ceiling % m == 0
    assert all(t.batch_size % m == 0 for t in result.trials)


def test_inference_and_sgd_match_brute_force() -> None:
    model, sample = mlp()
    result = find_batch_size(model, sample, memory=100_000, mode="inference")
    assert result.ceiling == brute_force("mlp", 100_000, mode="inference")
    assert result.optimizer is None
    model, sample = mlp()
    result = find_batch_size(model, sample, memory=100_000, optimizer="sgd")
    assert result.ceiling == brute_force("mlp", 100_000, optimizer="sgd")
    assert result.optimizer == "SGD"


def test_headroom_is_subtracted() -> None:
    model, sample = mlp()
    result = find_batch_size(model, sample, memory="250KB", headroom=100_000)
    assert result.usable_bytes == 150_000
    assert result.ceiling == brute_force("mlp", 150_000)


def test_bf16_autocast_runs() -> None:
    model, sample = mlp()
    result = find_batch_size(model, sample, memory=200_000, precision="bf16")
    assert result.precision == "bf16" and result.ceiling > 0


def test_make_batch_callable() -> None:
    model, sample = mlp()
    result = find_batch_size(model, lambda b: torch.randn(b, 32), memory=200_000)
    assert result.ceiling == brute_force("mlp", 200_000)


def test_real_cpu_without_cap() -> None:
    model, sample = mlp()
    result = find_batch_size(model, sample, max_batch_size=64, device="cpu")
    assert result.ceiling == 64 and not result.virtual
    assert result.headroom_bytes >= 256 * 1024**2


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "opt": copy.deepcopy(opt.state_dict()),
        "training": [m.training for m in model.modules()],
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for k in a["grads"]:
        if a["grads"][k] is None:
            assert b["grads"][k] is None
        else:
            assert torch.equal(a["grads"][k], b["grads"][k]), k
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert a["training"] == b["training"]
    assert torch.equal(a["rng"][0], b["rng"][0])
    assert a["rng"][1] == b["rng"][1]
    assert np.array_equal(a["rng"][2], b["rng"][2])


def _trained_cnn():
    model, sample = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # real optimizer state, moved batch-norm statistics, live gradients
        opt.zero_grad()
        model(sample).square().mean().backward()
        opt.step()
    model.eval()  # a user's mode that the probe must give back
    return model, sample, opt


def test_state_is_bit_identical_after_probe() -> None:
    model, sample, opt = _trained_cnn()
    before = _state(model, opt)
    result = find_batch_size(model, sample, optimizer=opt, memory=3_500_000)
    assert result.ceiling > 4
    _assert_same(before, _state(model, opt))


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_state_is_bit_identical_after_an_error(exc: type[BaseException]) -> None:
    model, sample, opt = _trained_cnn()
    before = _state(model, opt)

    def forward(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > 20:
            raise exc("not a memory problem")
        return default_forward(m, batch)

    expected = WorkloadError if exc is Boom else KeyboardInterrupt
    with pytest.raises(expected) as info:
        find_batch_size(model, sample, optimizer=opt, forward_fn=forward, memory=3_500_000)
    if exc is Boom:
        assert isinstance(info.value.__cause__, Boom)
        assert "other than memory" in str(info.value)
    _assert_same(before, _state(model, opt))


def test_non_oom_runtime_error_is_not_swallowed() -> None:
    model, sample = mlp()

    def loss(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch in the user's loss")

    with pytest.raises(WorkloadError, match="shape mismatch") as info:
        find_batch_size(model, sample, loss_fn=loss, memory=200_000)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.batch_size == 4


def test_whole_probe_frees_every_byte() -> None:
    model, sample, opt = _trained_cnn()

    def state() -> list[torch.Tensor]:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        moments = [v for st in opt.state.values() for v in st.values()]
        return [*model.parameters(), *model.buffers(), *grads, *moments]

    outer = MemoryCounter()
    outer.track(state())
    before = outer.live_bytes
    with outer:
        find_batch_size(model, sample, optimizer=opt, memory=3_500_000)
    outer.track(state())  # the gradients: the same objects, their values in new storage
    assert outer.peak_bytes > before  # the outer counter saw the trials' tensors
    assert outer.live_bytes == before  # and none of them is alive afterwards


def test_does_not_fit() -> None:
    model, sample = encoder()
    with pytest.raises(DoesNotFitError, match="batch size 1 does not fit") as info:
        find_batch_size(model, sample, memory=60_000)
    assert info.value.needed_bytes > info.value.available_bytes == 60_000


def test_memory_below_the_model_is_a_config_error() -> None:
    model, sample = encoder()
    with pytest.raises(ConfigError, match="not more than the model"):
        find_batch_size(model, sample, memory=1000)


def test_batch_norm_rejecting_batch_one_is_explained() -> None:
    model, _ = cnn()
    sample = torch.randn(4, 3, 16, 16)

    def forward(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] < 2:
            raise ValueError("Expected more than 1 value per channel when training")
        return default_forward(m, batch)

    # the sample size 4 does not fit, the search goes down to 1, which the model rejects:
    # nothing fits, and the error names both the smallest OOM and the failure below it
    with pytest.raises(DoesNotFitError, match="batch size 2 does not fit") as info:
        find_batch_size(model, sample, forward_fn=forward, memory=60_000)
    assert "at batch size 1, the step failed for a reason other than memory" in str(info.value)
    assert "Expected more than 1 value per channel" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "serve"}, "mode='serve' is not valid; choose one of: train, inference"),
        ({"precision": "fp8"}, "precision='fp8' is not valid"),
        ({"multiple_of": 0}, "multiple_of=0 must be a positive integer"),
        ({"max_batch_size": -1}, "max_batch_size=-1"),
        ({"min_batch_size": 10, "max_batch_size": 5}, "larger than max_batch_size"),
        ({"memory": "lots"}, "memory='lots' is not a size"),
        ({"headroom": "-1GiB"}, "headroom='-1GiB' is not a size"),
        ({"optimizer": "lion"}, "optimizer='lion' is not valid"),
        ({"time_budget": 0}, "time_budget=0"),
        ({"device": "tpu"}, "tpu"),
        ({"estimate_first": "yes"}, "estimate_first='yes' must be True, False or None"),
    ],
)
def test_bad_options_are_rejected_before_any_trial(kwargs: dict, match: str) -> None:
    model, sample = mlp()
    calls = []
    options = {"memory": 200_000, **kwargs}
    with pytest.raises((ConfigError, DeviceError), match=match):
        find_batch_size(model, sample, on_trial=calls.append, **options)
    assert calls == []


def test_profiler_picks_at_or_below_the_ceiling_and_reports_curves() -> None:
    model, sample, opt = _trained_cnn()
    before = _state(model, opt)
    result = find_batch_size(
        model,
        sample,
        optimizer=opt,
        memory=3_500_000,
        dataset_size=1000,
        global_batch=256,
        base_batch=32,
        base_lr=0.1,
    )
    _assert_same(before, _state(model, opt))  # timing steps leave no trace either
    assert 1 <= result.batch_size <= result.ceiling
    timed = {p.batch_size for p in result.throughput}
    assert result.batch_size in timed and max(timed) <= result.ceiling
    assert all(p.samples_per_second > 0 and p.replicates >= 3 for p in result.throughput)
    assert result.pick_reason
    assert [m.batch_size for m in result.memory] == sorted(
        {t.batch_size for t in result.trials if t.fits}
    )
    data = result.to_dict()
    assert {"throughput", "memory", "memory_model", "pick_reason", "advice"} <= data.keys()
    assert data["memory_model"]["bytes_per_sample"] > 0
    plan = data["advice"]["accumulation"]
    assert (
        plan["micro_batch"] * plan["accumulation_steps"] == 256
        and plan["micro_batch"] <= result.ceiling
    )
    assert data["advice"]["learning_rates"]["linear"] > 0.1


# -- the estimate's first guess -------------------------------------------------------------------


def _estimate_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "maxbatch.estimate.guess"]


def test_auto_runs_no_estimate_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="maxbatch.estimate.guess")
    model, sample = mlp()
    auto = find_batch_size(model, sample, memory="2MiB", profile=False)
    assert _estimate_logs(caplog) == []
    assert auto.trials[0].batch_size == 4  # the search starts from the sample's size
    assert not any("first guess" in note for note in auto.notes)
    off = find_batch_size(model, sample, memory="2MiB", profile=False, estimate_first=False)
    sizes = [(t.batch_size, t.fits) for t in auto.trials]
    assert [(t.batch_size, t.fits) for t in off.trials] == sizes


def test_estimate_first_true_still_runs_it_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="maxbatch.estimate.guess")
    model, sample = mlp()
    forced = find_batch_size(model, sample, memory="2MiB", profile=False, estimate_first=True)
    auto = find_batch_size(model, sample, memory="2MiB", profile=False)
    assert forced.ceiling == auto.ceiling
    assert len(_estimate_logs(caplog)) == 1
    assert _estimate_logs(caplog)[0].startswith(f"first guess from fake tensors: {forced.ceiling}")
    # The right guess, its neighbour above, and the sample's size for the memory model.
    assert [(t.batch_size, t.fits) for t in forced.trials] == [
        (forced.ceiling, True),
        (forced.ceiling + 1, False),
        (4, True),
    ]
    assert len(forced.trials) <= len(auto.trials)


class LockedMLP(torch.nn.Module):
    """A model that copy.deepcopy cannot copy: it holds a lock."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()[0]
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.net(x)


class ReadsItem(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y * 2 if y.sum().item() > 0 else y


@pytest.mark.parametrize(
    ("module", "why"),
    [
        (
            LockedMLP,
            "the model cannot be deep-copied onto fake tensors "
            "(TypeError: cannot pickle '_thread.lock' object)",
        ),
        (ReadsItem, "the step calls aten._local_scalar_dense.default, which reads a tensor"),
    ],
)
def test_a_first_guess_that_cannot_be_made_is_noted(module: type, why: str) -> None:
    model, sample = module(), torch.randn(4, 32)
    with pytest.raises(EstimateError):  # the premise: no estimate for this model
        estimate_batch_size(model, sample, memory="2MiB")
    forced = find_batch_size(model, sample, memory="2MiB", profile=False, estimate_first=True)
    notes = [n for n in forced.notes if "first guess" in n]
    assert len(notes) == 1
    assert notes[0].startswith(f"no first guess from fake tensors: {why}")
    assert notes[0].endswith("; the search started from batch size 4")
    assert forced.trials[0].batch_size == 4
    auto = find_batch_size(model, sample, memory="2MiB", profile=False)
    assert auto.ceiling == forced.ceiling
    assert not any("first guess" in n for n in auto.notes)
