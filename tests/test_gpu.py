"""CUDA paths: real allocator counters and real OOMs. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
from models import cnn, mlp

from maxbatch import find_batch_size
from maxbatch.devices.device import describe, resolve_device

pytestmark = pytest.mark.gpu


def test_describe_cuda() -> None:
    info = describe(resolve_device("cuda"))
    assert info.kind == "cuda" and info.total_bytes >= info.free_bytes > 0
    assert info.capacity_bytes >= info.free_bytes


def test_virtual_cap_on_cuda_is_exact_and_verified() -> None:
    model, sample = cnn()
    model, sample = model.cuda(), sample.cuda()
    result = find_batch_size(model, sample, memory="64MiB")
    fits = {t.batch_size: t.fits for t in result.trials}
    assert fits[result.ceiling] and fits[result.ceiling + 1] is False
    assert result.device == "cuda:0"


def test_real_cuda_oom_is_caught_and_memory_comes_back() -> None:
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = torch.nn.Sequential(
        torch.nn.Linear(4096, 8192), torch.nn.ReLU(), torch.nn.Linear(8192, 4096)
    ).cuda()
    sample = torch.randn(64, 4096, device="cuda")
    params = [p.detach().clone() for p in model.parameters()]
    result = find_batch_size(model, sample, headroom=0, time_budget=120)
    assert any(t.oom for t in result.trials) or not result.complete
    assert all(t.reserved_bytes is not None for t in result.trials)
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    del sample
    assert torch.cuda.memory_allocated() - before == sum(p.numel() * 4 for p in model.parameters())


def test_mlp_on_cuda_with_bf16() -> None:
    model, sample = mlp()
    result = find_batch_size(model.cuda(), sample.cuda(), memory="16MiB", precision="bf16")
    assert result.ceiling > 4


def test_cuda_steps_are_timed_with_events_and_state_is_restored() -> None:
    from maxbatch.profile.timing import time_workload
    from maxbatch.step.batching import make_batch_fn
    from maxbatch.step.workload import Workload, make_optimizer

    model, sample = mlp()
    model, sample = model.cuda(), sample.cuda()
    params = [p.detach().clone() for p in model.parameters()]
    make_batch, _ = make_batch_fn(sample)
    work = Workload(model, make_batch, sample.device, optimizer=make_optimizer("adamw", model))
    with work:
        seconds = time_workload(work, 64)
    assert len(seconds) == 5 and all(s > 0 for s in seconds)
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
