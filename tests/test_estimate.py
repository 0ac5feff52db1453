"""Estimates on fake tensors: the virtual device's peaks and the probe's ceilings, no memory."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from models import cnn, encoder, gru, mlp
from torch import nn

from maxbatch import find_batch_size
from maxbatch.devicekinds import CUDA_ROUNDING
from maxbatch.devices.accounting import MemoryCounter
from maxbatch.devices.capacity import default_headroom
from maxbatch.errors import ConfigError
from maxbatch.estimate.estimate import (
    CUDA_CONTEXT_BYTES,
    EstimateError,
    estimate_batch_size,
)
from maxbatch.estimate.guess import first_guess
from maxbatch.grid import Grid
from maxbatch.run.modelfile import ModelSpec, load_model_file
from maxbatch.search.meter import CountingMeter
from maxbatch.search.trial import run_trial
from maxbatch.settings import Target
from maxbatch.step.spec import StepSpec
from maxbatch.step.workload import build_workload
from maxbatch.units import parse_bytes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MiB = 1024**2


def example(name: str) -> ModelSpec:
    return load_model_file(EXAMPLES / f"{name}.py")


def hooks(spec: ModelSpec) -> dict[str, Any]:
    return {
        "optimizer": spec.optimizer,
        "forward_fn": spec.forward,
        "loss_fn": spec.loss,
        "train_step": spec.train_step,
    }


def sample_of(spec: ModelSpec) -> Any:
    return spec.make_batch if spec.make_batch is not None else spec.sample


def measured_peaks(
    model: nn.Module,
    sample: Any,
    sizes: list[int],
    *,
    mode: str = "train",
    precision: str = "fp32",
    optimizer: Any = None,
    forward_fn: Any = None,
    loss_fn: Any = None,
    train_step: Any = None,
) -> dict[int, int]:
    """The virtual device's measured peak at each size, set up as find_batch_size sets it up."""
    step = StepSpec.build(
        model,
        sample,
        optimizer=optimizer,
        forward_fn=forward_fn,
        loss_fn=loss_fn,
        train_step=train_step,
        mode=mode,
        precision=precision,
    )
    cpu = torch.device("cpu")
    with CountingMeter(cpu) as meter, build_workload(step, cpu) as workload:
        meter.live_bytes(workload)
        return {b: run_trial(workload, meter, b).peak_bytes for b in sizes}


# -- accuracy: the virtual device's peaks and the probe's ceilings --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mlp", {}),
        ("cnn", {}),
        ("transformer", {}),
        ("cnn", {"precision": "bf16"}),  # batch norm's saved statistics: float32 on the CPU
        ("transformer", {"precision": "bf16"}),
        ("cnn", {"mode": "inference"}),
        ("transformer", {"mode": "inference"}),
    ],
)
def test_peak_equals_the_virtual_devices_measured_peak(name: str, options: dict[str, Any]) -> None:
    spec = example(name)
    sizes = [1, 7, 33]
    kw = hooks(spec)
    if options.get("mode") == "inference":
        kw.pop("optimizer")
    expected = measured_peaks(spec.model, sample_of(spec), sizes, **options, **kw)
    est = estimate_batch_size(spec.model, sample_of(spec), batch_sizes=sizes, **options, **kw)
    assert {b: est.peak_bytes(b) for b in sizes} == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "options"),
    [
        (mlp, {}),  # dropout
        (cnn, {"optimizer": "sgd"}),
        (encoder, {"optimizer": "adam", "precision": "fp16"}),  # the model returns its loss
        (gru, {}),
    ],
)
def test_peak_equals_measured_for_test_models(build: Any, options: dict[str, Any]) -> None:
    model, sample = build()
    sizes = [3, 16]
    expected = measured_peaks(model, sample, sizes, **options)
    est = estimate_batch_size(model, sample, batch_sizes=sizes, **options)
    assert {b: est.peak_bytes(b) for b in sizes} == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_ceiling_equals_the_probes(name: str) -> None:
    spec = example(name)
    caps = ["64MiB", "300MiB"]
    est = estimate_batch_size(spec.model, sample_of(spec), memory=caps, **hooks(spec))
    for cap, row in zip(caps, est.capacities, strict=True):
        # The ceiling is the probe's before any timing: the profiler is not needed here.
        probed = find_batch_size(
            spec.model, sample_of(spec), memory=cap, profile=False, **hooks(spec)
        )
        assert row.capacity_bytes == parse_bytes(cap)
        assert row.usable_bytes == probed.usable_bytes
        assert row.ceiling == probed.ceiling
        assert row.peak_bytes is not None and row.peak_bytes <= row.usable_bytes


@pytest.mark.slow
def test_ceiling_with_options_equals_the_probes() -> None:
    model, sample = mlp()
    options: dict[str, Any] = {"memory": "2MiB", "multiple_of": 8, "max_batch_size": 4000}
    est = estimate_batch_size(model, sample, **options)
    assert est.ceiling == find_batch_size(model, sample, **options).ceiling
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # rebuilt over fake params
    est = estimate_batch_size(model, sample, memory="1MiB", optimizer=opt)
    assert est.optimizer == "SGD"
    assert est.ceiling == find_batch_size(model, sample, memory="1MiB", optimizer=opt).ceiling
    assert opt.state == {}


@pytest.mark.slow
def test_make_batch_function() -> None:
    model, _ = mlp()

    def make_batch(batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, 32)

    est = estimate_batch_size(model, make_batch, memory="1MiB", batch_sizes=[5])
    assert est.ceiling == find_batch_size(model, make_batch, memory="1MiB").ceiling
    assert est.peak_bytes(5) == measured_peaks(model, make_batch, [5])[5]


@pytest.mark.slow
def test_first_guess_is_the_probes_ceiling() -> None:
    spec = example("transformer")
    model, sample = spec.model, spec.sample
    step = StepSpec.build(model, sample, **hooks(spec))
    cpu = torch.device("cpu")
    with build_workload(step, cpu) as workload:  # the probe's optimizer, as the probe passes it
        guess, reason = first_guess(
            step.with_optimizer(workload.optimizer),
            64 * MiB,
            start=Grid().start(step.sample_size),
            grid=Grid(),
            target=Target.CPU,
        )
    assert guess == find_batch_size(model, sample, memory="64MiB", **hooks(spec)).ceiling
    assert reason == f"{guess} fits and {guess + 1} does not"


def test_first_guess_without_an_optimizer_steps_without_one() -> None:
    # optimizer="none" leaves the workload without an optimizer: the fake step must not add AdamW.
    model, sample = mlp()
    found = find_batch_size(
        model, sample, optimizer="none", memory="2MiB", profile=False, estimate_first=True
    )
    est = estimate_batch_size(model, sample, optimizer="none", memory="2MiB")
    assert found.optimizer is None and est.optimizer is None
    assert est.ceiling == found.ceiling
    assert found.trials[0].batch_size == found.ceiling  # the first guess was the ceiling
    assert len(found.trials) == 3


# -- what a user reads -------------------------------------------------------------------------


@pytest.mark.slow
def test_several_capacities_and_json() -> None:
    spec = example("cnn")
    est = estimate_batch_size(spec.model, spec.sample, memory="16MiB,64MiB,300MiB", **hooks(spec))
    ceilings = [row.ceiling for row in est.capacities]
    assert all(isinstance(c, int) for c in ceilings)
    assert ceilings == sorted(ceilings) and len(set(ceilings)) == 3
    data = json.loads(json.dumps(est.to_dict()))
    assert data["estimate"] is True
    assert "ceiling" not in data
    assert [row["ceiling"] for row in data["capacities"]] == ceilings
    with pytest.raises(ValueError, match="3 capacities"):
        _ = est.ceiling
    single = estimate_batch_size(spec.model, spec.sample, memory="64MiB", **hooks(spec))
    assert single.to_dict()["ceiling"] == single.ceiling == ceilings[1]
    assert any("nothing was measured" in note for note in single.notes)


def test_memory_model_and_breakdown() -> None:
    spec = example("mlp")
    est = estimate_batch_size(spec.model, spec.sample, memory="300MiB", batch_sizes=[100, 200])
    param_bytes = sum(p.numel() * p.element_size() for p in spec.model.parameters())
    b = est.breakdown
    assert b.parameters_bytes == b.gradients_bytes == param_bytes
    # AdamW: two moments per parameter, and a 4-byte step count per parameter tensor.
    assert b.optimizer_bytes == 2 * param_bytes + 4 * len(list(spec.model.parameters()))
    assert b.buffers_bytes == 0
    assert b.inputs_bytes_per_sample == 3 * 96 * 96 * 4
    mm = est.memory_model
    assert b.inputs_bytes_per_sample + b.activations_bytes_per_sample == mm.bytes_per_sample
    for size in (100, 200):  # the peak is affine here: the model predicts the exact peaks
        assert mm.peak(size) == est.peak_bytes(size)


@pytest.mark.slow
def test_cuda_target_rounds_reserves_and_says_so() -> None:
    spec = example("transformer")
    cap = 2 * 1024 * MiB
    cpu = estimate_batch_size(
        spec.model, spec.sample, memory=cap - CUDA_CONTEXT_BYTES - 256 * MiB, **hooks(spec)
    )
    cuda = estimate_batch_size(
        spec.model, spec.sample, memory=cap, target="cuda", batch_sizes=[3, 8, 1000], **hooks(spec)
    )
    row = cuda.capacities[0]
    assert row.reserved_bytes == CUDA_CONTEXT_BYTES
    assert row.headroom_bytes == default_headroom(cap, virtual=False) == 256 * MiB
    assert row.usable_bytes == cpu.capacities[0].usable_bytes
    assert len(cuda.peaks) == 3 and all(peak % CUDA_ROUNDING == 0 for _, peak in cuda.peaks)
    cpu_ceiling, cuda_ceiling = cpu.ceiling, cuda.ceiling
    assert cpu_ceiling is not None and cuda_ceiling is not None
    assert cuda_ceiling <= cpu_ceiling  # rounding and the foreach optimizer only add bytes
    text = " ".join(cuda.notes)
    for words in ("512 B", "CUDA context", "assumption", "attention kernels", "foreach"):
        assert words in text


def test_capacity_below_the_model_has_no_ceiling() -> None:
    model, sample = mlp()
    est = estimate_batch_size(model, sample, memory=["1KiB", "20KiB", "1MiB"])
    low, small, fine = est.capacities
    assert low.ceiling is None and "alone hold" in low.reason
    assert small.ceiling is None and "batch size 1 does not fit: it needs" in small.reason
    assert fine.ceiling is not None


# -- what cannot run on fake tensors ------------------------------------------------------------


class ReadsItem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y * 2 if y.sum().item() > 0 else y


class MasksByValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y[y > 0]


@pytest.mark.parametrize(
    ("module", "operation", "words"),
    [
        (ReadsItem, "aten._local_scalar_dense", r"\.item\(\)"),
        (MasksByValue, "aten.nonzero", "output shape that depends on tensor values"),
    ],
)
def test_data_dependent_steps_name_the_operation(module: Any, operation: str, words: str) -> None:
    with pytest.raises(EstimateError, match=words) as info:
        estimate_batch_size(module(), torch.randn(2, 4), memory="1MiB")
    assert info.value.operation is not None and info.value.operation.startswith(operation)
    assert operation in str(info.value) and "maxbatch probe" in str(info.value)


def test_first_guess_is_none_where_fake_execution_fails() -> None:
    step = StepSpec.build(ReadsItem(), torch.randn(2, 4), optimizer="none")
    guess, reason = first_guess(step, 1 * MiB, start=2, grid=Grid(), target=Target.CPU)
    assert guess is None
    assert reason.startswith("the step calls aten._local_scalar_dense")
    assert "fake tensors have no values" in reason and "maxbatch probe" not in reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory": "lots"}, "memory='lots'"),
        ({"memory": "0"}, "memory=0"),
        ({"target": "tpu"}, "target='tpu'.*cpu, cuda"),
        ({"multiple_of": 0}, "multiple_of=0"),
        ({"min_batch_size": 8, "max_batch_size": 4}, "larger than max_batch_size"),
        ({"mode": "eval"}, "mode='eval'"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], match: str) -> None:
    model, sample = mlp()
    with pytest.raises(ConfigError, match=match):
        estimate_batch_size(model, sample, **kwargs)


# -- no memory, nothing touched, fast -----------------------------------------------------------


def test_the_users_model_is_untouched_and_no_memory_is_allocated() -> None:
    model, sample = cnn()
    model.eval()
    opt = torch.optim.AdamW(model.parameters())
    before = [t.clone() for t in list(model.parameters()) + list(model.buffers())]
    rng = torch.get_rng_state(), random.getstate()
    host = MemoryCounter(device=torch.device("cpu"))  # sees every real CPU allocation
    with host:
        est = estimate_batch_size(model, sample, memory="64MiB", optimizer=opt, batch_sizes=[10**5])
    host.close()
    assert host.peak_bytes == 0
    peak = est.peak_bytes(10**5)
    assert peak is not None and peak > 3 * 1024**3  # predicted, never allocated
    after = list(model.parameters()) + list(model.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and opt.state == {}
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]


def test_model_larger_than_memory_built_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(32768, 32768) for _ in range(12)))  # 51.5 GB
    assert sum(p.numel() * 4 for p in model.parameters()) > 50e9
    sample = torch.randn(4, 32768)
    # Every real CPU tensor allocated during the estimate (the process's peak RSS would be its
    # lifetime peak, which earlier tests set).
    host = MemoryCounter(device=torch.device("cpu"))
    with host:
        est = estimate_batch_size(model, sample, memory="300GiB,400GiB")
    host.close()
    assert host.peak_bytes == 0
    assert est.breakdown.parameters_bytes > 50e9
    ceilings = [row.ceiling for row in est.capacities]
    assert all(c is not None and c > 1000 for c in ceilings)
    assert all(p.is_meta for p in model.parameters())


def test_bundled_meta_example() -> None:
    spec = example("big_meta")
    assert all(p.is_meta for p in spec.model.parameters())
    est = estimate_batch_size(
        spec.model,
        spec.sample,
        memory="80GiB",
        target="cuda",
        mode="inference",
        forward_fn=spec.forward,
        loss_fn=spec.loss,
    )
    assert est.ceiling is not None and est.ceiling > 50
    assert est.breakdown.parameters_bytes > 24 * 1024**3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_a_prediction_at_any_size_costs_no_memory(name: str) -> None:
    spec = example(name)
    host = MemoryCounter(device=torch.device("cpu"))
    with host:
        est = estimate_batch_size(
            spec.model, sample_of(spec), batch_sizes=[10, 1000, 10**6], **hooks(spec)
        )
    host.close()
    assert est.fake_steps >= 3
    assert host.peak_bytes == 0  # a million samples cost what ten do: nothing is allocated
    small, large = est.peak_bytes(10), est.peak_bytes(10**6)
    assert small is not None and large is not None and large > 10 * small


# -- the command line ---------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    from click.testing import CliRunner

    from maxbatch.cli import main

    return CliRunner().invoke(main, ["estimate", *args])


@pytest.mark.slow
def test_cli_json_has_the_ceiling_for_one_capacity() -> None:
    res = invoke(str(EXAMPLES / "mlp.py"), "--memory", "64MiB", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["estimate"] is True and data["target"] == "cpu"
    spec = example("mlp")
    assert data["ceiling"] == find_batch_size(spec.model, spec.sample, memory="64MiB").ceiling
    assert {"memory_model", "breakdown", "capacities", "notes"} <= data.keys()


@pytest.mark.slow
def test_cli_table_for_several_capacities() -> None:
    res = invoke(
        str(EXAMPLES / "transformer.py"),
        "--memory",
        "16GiB,24GiB,40GiB,80GiB",
        "--target",
        "cuda",
        "--batch-size",
        "64",
    )
    assert res.exit_code == 0, res.output
    assert "not a measurement" in res.stdout
    for cap in ("16.00 GiB", "24.00 GiB", "40.00 GiB", "80.00 GiB"):
        assert cap in res.stdout
    assert "CUDA context" in res.stdout and "attention kernels" in res.stdout
    assert "64: " in res.stdout


def test_cli_step_that_reads_values_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.py"
    path.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.linear = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        y = self.linear(x)\n"
        "        return y if y.max().item() > 0 else -y\n"
        "model = Net()\n"
        "sample = torch.randn(2, 4)\n"
    )
    res = invoke(str(path), "--memory", "1MiB")
    assert res.exit_code == 1
    assert "aten._local_scalar_dense" in res.stderr and "maxbatch probe" in res.stderr


def test_cli_nothing_fits_exits_1() -> None:
    res = invoke(str(EXAMPLES / "mlp.py"), "--memory", "1MiB", "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["ceiling"] is None
