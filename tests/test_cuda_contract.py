"""Contract tests: every CUDA and NVML path of maxbatch, run on a machine without a GPU.

The stand-ins are ``unittest.mock.create_autospec`` of the real ``torch.cuda`` and ``pynvml``
functions, so a call with a wrong name or wrong arguments fails as it would on a GPU. They answer
with the values and units their documentation promises:

- ``torch.cuda.mem_get_info(device)``: ``(free, total)`` bytes (cudaMemGetInfo);
- ``memory_allocated`` / ``memory_reserved`` / ``max_memory_*``: bytes of the caching allocator,
  the maxima since ``reset_peak_memory_stats``; ``memory_stats()["num_alloc_retries"]``: failed
  cudaMalloc calls that flushed the cache and retried;
- ``Event.elapsed_time(end)``: milliseconds between two recorded events;
- ``get_rng_state_all()``: one ByteTensor per device;
- a CUDA out-of-memory error is ``torch.OutOfMemoryError`` with the allocator's message;
- ``pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)`` takes ``domain:bus:device.function`` in hex,
  and ``nvmlDeviceGetComputeRunningProcesses(handle)`` returns objects with ``pid`` and
  ``usedGpuMemory`` (bytes, or None where the driver cannot say, as under Windows WDDM).

The tests marked ``gpu`` (tests/test_gpu.py) run the same paths on real hardware.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pynvml
import pytest
import torch
from click.testing import CliRunner

from maxbatch import find_batch_size
from maxbatch.cli import main
from maxbatch.devicekinds import CUDA_ROUNDING
from maxbatch.devices.device import (
    CudaPeak,
    CudaTimer,
    default_device,
    describe,
    list_devices,
    resolve_device,
    synchronize,
)
from maxbatch.errors import DeviceError
from maxbatch.search.meter import AllocatorMeter, CountingMeter, meter_for
from maxbatch.search.trial import run_trial
from maxbatch.step.oom import release_memory
from maxbatch.step.workload import Workload

GiB = 1024**3
MiB = 1024**2
CUDA0 = torch.device("cuda", 0)
OTHER_PID = 4242


class ScriptedGpu:
    """Two 80 GiB GPUs whose allocator follows a scripted step's memory curve.

    A step at batch size ``b`` needs ``fixed + b * per_sample`` bytes, plus ``workspace`` above
    ``workspace_from`` samples (a kernel that switches algorithm: the affine model misses it).
    Past the physical free memory the step raises the allocator's out-of-memory error.
    """

    total = 80 * GiB
    free = 70 * GiB
    reserved = 2 * GiB  # held by this process's cache: capacity = free + reserved
    fixed = 4 * GiB
    per_sample = 1 * GiB
    workspace = 20 * GiB
    workspace_from = 41

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.batch = 0
        self.allocated = self.fixed
        self.peak = self.fixed
        self.retries = 0
        self.stream = mock.create_autospec(torch.cuda.Stream, instance=True)
        self.mocks: dict[str, Any] = {}
        answers: dict[str, Callable[..., Any]] = {
            "is_available": lambda: True,
            "device_count": lambda: 2,
            "is_initialized": lambda: True,
            "mem_get_info": lambda device=None: (self.free, self.total),
            "get_device_name": lambda device=None: "NVIDIA H100 80GB HBM3",
            "get_device_properties": self._properties,
            "memory_reserved": lambda device=None: self.reserved,
            "memory_allocated": lambda device=None: self.allocated,
            "max_memory_allocated": lambda device=None: self.peak,
            "max_memory_reserved": lambda device=None: -(-self.peak // (2 * MiB)) * 2 * MiB,
            "reset_peak_memory_stats": self._reset_peak,
            "memory_stats": lambda device=None: {"num_alloc_retries": self.retries},
            "synchronize": lambda device=None: None,
            "empty_cache": lambda: None,
            "current_stream": lambda device=None: self.stream,
            "get_rng_state_all": lambda: [torch.zeros(16, dtype=torch.uint8)] * 2,
            "set_rng_state_all": lambda new_states: None,
            "get_rng_state": lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
            "set_rng_state": lambda new_state, device="cuda": None,
        }
        for name, answer in answers.items():
            self.mocks[name] = mock.create_autospec(getattr(torch.cuda, name), side_effect=answer)
            monkeypatch.setattr(torch.cuda, name, self.mocks[name])
        self.event = mock.create_autospec(torch.cuda.Event)
        self.event.return_value.elapsed_time.side_effect = lambda end: self.milliseconds()
        monkeypatch.setattr(torch.cuda, "Event", self.event)
        nvml: dict[str, Callable[..., Any]] = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetHandleByPciBusId": lambda pciBusId: f"handle {pciBusId}",
            "nvmlDeviceGetComputeRunningProcesses": lambda handle: [
                pynvml.nvmlFriendlyObject({"pid": os.getpid(), "usedGpuMemory": 2 * GiB}),
                pynvml.nvmlFriendlyObject({"pid": OTHER_PID, "usedGpuMemory": 3 * GiB}),
                pynvml.nvmlFriendlyObject({"pid": OTHER_PID + 1, "usedGpuMemory": None}),
            ],
        }
        for name, answer in nvml.items():
            self.mocks[name] = mock.create_autospec(getattr(pynvml, name), side_effect=answer)
            monkeypatch.setattr(pynvml, name, self.mocks[name])

    @staticmethod
    def _properties(device: Any = None) -> types.SimpleNamespace:
        index = torch.device(device).index if isinstance(device, (str, torch.device)) else device
        return types.SimpleNamespace(
            name="NVIDIA H100 80GB HBM3",
            total_memory=80 * GiB,
            pci_domain_id=0,
            pci_bus_id=0x3B + (index or 0),
            pci_device_id=0,
        )

    def _reset_peak(self, device: Any = None) -> None:
        self.peak = self.allocated

    def need(self, b: int) -> int:
        """Bytes the scripted step needs at batch size ``b``."""
        extra = self.workspace if b >= self.workspace_from else 0
        return self.fixed + b * self.per_sample + extra

    def step(self, model: torch.nn.Module, batch: Any, optimizer: Any) -> None:
        """The user's step on the scripted GPU (the batch: its rows, or their number)."""
        self.batch = batch = batch if isinstance(batch, int) else int(batch.shape[0])
        need = self.need(batch)
        if need > self.free + self.reserved:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {need - self.allocated} bytes. GPU 0 has "
                f"a total capacity of 80.00 GiB of which 0 bytes is free."
            )
        if need > 0.9 * (self.free + self.reserved):
            self.retries += 1  # the allocator flushed its cache and retried
        self.peak = max(self.peak, need)

    def milliseconds(self) -> float:
        """The scripted GPU time of one step: 2 ms plus 0.25 ms per sample."""
        return 2.0 + 0.25 * self.batch


class OnGpu(torch.Tensor):
    """A batch of ``b`` empty rows standing in for one on the GPU: ``.to(cuda)`` keeps it."""

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is torch.Tensor.to:
            return args[0]
        return super().__torch_function__(func, types, args, kwargs or {})


def rows(b: int) -> torch.Tensor:
    """A batch of ``b`` rows and no bytes, "on the GPU" (fake, as it is, for the estimate)."""
    from torch._subclasses.fake_tensor import FakeTensor

    batch = torch.empty(b, 0)
    return batch if isinstance(batch, FakeTensor) else batch.as_subclass(OnGpu)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> ScriptedGpu:
    return ScriptedGpu(monkeypatch)


# -- device resolution and description ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, "cuda:0"),
        ("cuda", "cuda:0"),
        ("cuda:1", "cuda:1"),
        (torch.device("cuda", 1), "cuda:1"),
    ],
)
def test_cuda_devices_resolve(gpu: ScriptedGpu, spec: Any, expected: str) -> None:
    assert resolve_device(spec) == torch.device(expected)
    assert default_device() == CUDA0


def test_a_missing_cuda_device_is_a_device_error(gpu: ScriptedGpu) -> None:
    with pytest.raises(DeviceError, match=r"'cuda:2': there are only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    gpu.mocks["is_available"].side_effect = lambda: False
    with pytest.raises(DeviceError, match="no CUDA device is available here"):
        resolve_device("cuda")


def test_describe_reads_memory_and_other_processes_from_nvml(gpu: ScriptedGpu) -> None:
    info = describe(torch.device("cuda", 1))
    assert info.device == "cuda:1" and info.kind == "cuda" and info.name == "NVIDIA H100 80GB HBM3"
    assert (info.total_bytes, info.free_bytes, info.process_bytes) == (80 * GiB, 70 * GiB, 2 * GiB)
    assert info.capacity_bytes == 72 * GiB
    # Only the other processes count, and a process whose memory NVML cannot report counts 0.
    assert info.other_processes_bytes == 3 * GiB
    gpu.mocks["mem_get_info"].assert_called_with(1)
    gpu.mocks["nvmlDeviceGetHandleByPciBusId"].assert_called_once_with("00000000:3c:00.0")
    gpu.mocks["nvmlShutdown"].assert_called_once_with()


def test_nvml_failing_means_unknown(gpu: ScriptedGpu) -> None:
    error = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    gpu.mocks["nvmlInit"].side_effect = error
    assert describe(CUDA0).other_processes_bytes is None
    gpu.mocks["nvmlInit"].side_effect = lambda: None
    gpu.mocks["nvmlDeviceGetHandleByPciBusId"].side_effect = error
    assert describe(CUDA0).other_processes_bytes is None
    gpu.mocks["nvmlShutdown"].assert_called_once_with()  # shut down after a failed lookup too


def test_list_devices_has_every_gpu_then_the_cpu(gpu: ScriptedGpu) -> None:
    assert [d.device for d in list_devices()] == ["cuda:0", "cuda:1", "cpu"]
    res = CliRunner().invoke(main, ["devices", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["capacity_bytes"] == 72 * GiB and rows[0]["other_processes_bytes"] == 3 * GiB


# -- counters, timers, cache emptying ------------------------------------------------------------


def test_peak_reserved_and_retries_come_from_the_allocator(gpu: ScriptedGpu) -> None:
    peak = CudaPeak(CUDA0)
    gpu.retries = 5
    peak.start()
    gpu.mocks["reset_peak_memory_stats"].assert_called_once_with(CUDA0)
    gpu.step(torch.nn.Module(), 44, None)  # 68 GiB of 72: near the top, one retry
    assert peak.allocated_bytes() == 4 * GiB
    assert peak.read() == (68 * GiB, 68 * GiB, 1)


def test_cuda_events_time_the_step_in_seconds(gpu: ScriptedGpu) -> None:
    timer = CudaTimer(CUDA0)
    gpu.mocks["current_stream"].assert_called_once_with(CUDA0)
    gpu.event.assert_called_with(enable_timing=True)
    gpu.batch = 8
    timer.start()
    seconds = timer.stop()
    assert seconds == pytest.approx(0.004)  # (2 + 0.25 * 8) ms
    gpu.event.return_value.record.assert_called_with(gpu.stream)
    gpu.event.return_value.synchronize.assert_called_once_with()


@pytest.mark.parametrize("device", [None, CUDA0])
def test_release_memory_synchronizes_and_empties_the_cache(
    gpu: ScriptedGpu, device: torch.device | None
) -> None:
    release_memory(device)
    gpu.mocks["synchronize"].assert_called_once_with(device)
    gpu.mocks["empty_cache"].assert_called_once_with()
    synchronize(CUDA0)
    gpu.mocks["synchronize"].assert_called_with(CUDA0)


def test_memory_cap_on_cuda_counts_like_the_caching_allocator(gpu: ScriptedGpu) -> None:
    meter = meter_for(CUDA0, virtual=True)
    assert isinstance(meter, CountingMeter)
    assert meter.counter.round_to == CUDA_ROUNDING == 512 and meter.counter.device == CUDA0
    assert CountingMeter(torch.device("cpu")).counter.round_to == 1


# -- the CUDA out-of-memory recovery path and whole probes ----------------------------------------


def _workload(gpu: ScriptedGpu) -> Workload:
    # The scripted step needs no bytes on the (absent) GPU, only the batch's rows.
    work = Workload(torch.nn.Module(), rows, CUDA0, train_step=gpu.step)
    work.save()
    work.prepare()
    return work


def test_a_cuda_oom_is_recovered_outside_the_except_block(gpu: ScriptedGpu) -> None:
    work = _workload(gpu)
    meter = meter_for(CUDA0, virtual=False)
    assert isinstance(meter, AllocatorMeter)
    meter.set_usable(68 * GiB)
    trial = run_trial(work, meter, 80)
    assert trial.oom and not trial.fits
    gpu.mocks["empty_cache"].assert_called_once_with()
    gpu.mocks["set_rng_state_all"].assert_called()  # the CUDA generators were restored
    fits = run_trial(work, meter, 30)
    assert fits.fits and fits.peak_bytes == 34 * GiB and fits.reserved_bytes == 34 * GiB
    assert fits.alloc_retries == 0


def test_probe_on_cuda_finds_the_exact_ceiling_through_an_oom(gpu: ScriptedGpu) -> None:
    result = find_batch_size(
        torch.nn.Module(),
        rows,
        device="cuda",
        optimizer="none",
        train_step=gpu.step,
        estimate_first=False,
    )
    # capacity 72 GiB, default headroom 5 %: usable 68.4 GiB; the workspace from 41 samples on
    # moves the ceiling from 64 (the affine prediction) to 44.
    assert result.device == "cuda:0" and result.device_name == "NVIDIA H100 80GB HBM3"
    assert result.capacity_bytes == 72 * GiB and result.headroom_bytes == int(0.05 * 72 * GiB)
    usable = result.usable_bytes
    expected = max(b for b in range(1, 100) if gpu.need(b) <= usable)
    assert result.ceiling == expected == 44
    tried = {t.batch_size: t for t in result.trials}
    assert tried[44].fits and not tried[45].fits
    assert any(t.oom for t in result.trials)
    assert all(t.reserved_bytes is not None and t.alloc_retries is not None for t in result.trials)
    assert gpu.mocks["empty_cache"].call_count >= len(result.trials)
    # Timed with CUDA events: throughput grows with the batch, so the pick is near the ceiling.
    assert result.throughput and gpu.event.return_value.record.called
    for point in result.throughput:
        ms = 2.0 + 0.25 * point.batch_size
        assert point.samples_per_second == pytest.approx(point.batch_size / (ms / 1000))


def test_cli_memory_on_cuda_is_the_virtual_device(gpu: ScriptedGpu, tmp_path: Path) -> None:
    model = tmp_path / "model.py"
    model.write_text(
        "import torch\nmodel = torch.nn.Module()\n"
        "class OnGpu(torch.Tensor):\n"
        "    @classmethod\n"
        "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
        "        if func is torch.Tensor.to:\n            return args[0]\n"
        "        return super().__torch_function__(func, types, args, kwargs or {})\n"
        "def make_batch(batch_size):\n"
        "    return torch.empty(batch_size, 0).as_subclass(OnGpu)\n"
        "def train_step(model, batch, optimizer):\n    return None\n"
    )
    args = ["probe", str(model), "--device", "cuda", "--memory", "1GiB", "--max-batch", "16"]
    res = CliRunner().invoke(main, [*args, "--optimizer", "none", "--no-profile", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["device"] == "cuda:0" and data["virtual"] is True
    assert data["capacity_bytes"] == GiB and data["headroom_bytes"] == 0
    assert data["ceiling"] == 16
    gpu.mocks["reset_peak_memory_stats"].assert_not_called()  # the counter measures, not CUDA


def test_the_first_guess_on_cuda_comes_from_fake_tensors(gpu: ScriptedGpu) -> None:
    # Auto on CUDA: the scripted step raises the CUDA OOM past 48 samples on fake tensors too,
    # so the guess is 48; the real trials then find the exact ceiling below it.
    result = find_batch_size(
        torch.nn.Module(), rows, device="cuda", optimizer="none", train_step=gpu.step
    )
    assert result.trials[0].batch_size == 48 and not result.trials[0].fits
    assert result.ceiling == 44


def test_an_estimate_for_a_cuda_target_needs_no_gpu() -> None:
    from models import mlp

    from maxbatch import estimate_batch_size
    from maxbatch.estimate.estimate import CUDA_CONTEXT_BYTES

    model, sample = mlp()
    est = estimate_batch_size(model, sample, memory="1GiB", target="cuda")
    row = est.capacities[0]
    assert est.target == "cuda" and row.reserved_bytes == CUDA_CONTEXT_BYTES
    assert any("512 B" in note for note in est.notes)


def test_the_first_batch_of_a_loader_leaves_the_cuda_generators_alone(gpu: ScriptedGpu) -> None:
    from maxbatch.integrations._common import first_batch

    loader = torch.utils.data.DataLoader(torch.arange(8.0), batch_size=4, shuffle=True)
    assert first_batch(loader, CUDA0).shape == (4,)
    gpu.mocks["get_rng_state"].assert_called_once_with(CUDA0)
    gpu.mocks["set_rng_state"].assert_called_once()


def test_torchrun_on_cuda_adds_nccl_for_cuda_tensors(
    gpu: ScriptedGpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist

    from maxbatch.run import torchrun

    init = mock.create_autospec(dist.init_process_group, side_effect=lambda *a, **k: None)
    rank = mock.create_autospec(dist.get_rank, side_effect=lambda group=None: 1)
    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "get_rank", rank)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torchrun.init_from_env() == 1
    init.assert_called_once_with("cpu:gloo,cuda:nccl")
    # Each rank probes its own GPU: cuda (or the default device) is cuda:LOCAL_RANK.
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torchrun, "is_distributed", lambda: True)
    assert torchrun.rank_device("cuda") == torchrun.rank_device(None) == "cuda:1"
    assert torchrun.rank_device("cpu") == "cpu"


def test_micro_batches_on_cuda_shrink_after_a_cuda_oom(gpu: ScriptedGpu) -> None:
    from maxbatch import MicroBatcher
    from maxbatch.results import MemoryModel

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def forward(m: torch.nn.Module, part: torch.Tensor) -> torch.Tensor:
        gpu.step(m, part, None)  # 100 samples need 124 GiB: the scripted allocator refuses
        return m(part)

    model_of_memory = MemoryModel(fixed_bytes=4 * GiB, bytes_per_sample=GiB)
    micro = MicroBatcher(
        model,
        opt,
        micro_batch_size=100,
        forward_fn=forward,
        memory_model=model_of_memory,
        usable_bytes=68 * GiB,
    )
    micro.device = CUDA0  # the model "on the GPU"
    micro.step(torch.randn(100, 4))
    # After each scripted CUDA OOM a smaller size (the memory model's 64, then half of it),
    # with the CUDA generators (through the snapshot: every device's) and the cache put back
    # in between.
    assert micro.micro_batch_size < 100 and gpu.need(micro.micro_batch_size) <= 72 * GiB
    gpu.mocks["get_rng_state_all"].assert_called()
    gpu.mocks["set_rng_state_all"].assert_called()
    gpu.mocks["empty_cache"].assert_called()
