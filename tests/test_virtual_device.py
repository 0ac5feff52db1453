"""The live-bytes counter: exact counting, a real OutOfMemoryError past the cap, nothing leaked."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from models import mlp
from torch._subclasses.fake_tensor import FakeTensorMode

from maxbatch.devices.accounting import MemoryCounter
from maxbatch.search.meter import CountingMeter
from maxbatch.search.trial import run_trial
from maxbatch.step.batching import make_batch_fn
from maxbatch.step.oom import is_oom
from maxbatch.step.workload import Workload


def test_counts_storages_once_and_frees() -> None:
    counter = MemoryCounter()
    with counter:
        x = torch.zeros(1000)  # 4000 bytes
        view = x[10:]
        y = x + 1
    assert counter.live_bytes == 8000
    del x
    assert counter.live_bytes == 8000  # the view keeps the storage alive
    del view
    assert counter.live_bytes == 4000
    del y
    gc.collect()
    assert counter.live_bytes == 0
    assert counter.peak_bytes == 8000


def test_rounding_like_the_cuda_allocator() -> None:
    counter = MemoryCounter(round_to=512)
    with counter:
        x = torch.zeros(3)  # 12 bytes -> one 512-byte block
    assert counter.live_bytes == 512
    del x


def test_cap_raises_a_real_oom_that_peers_recognise() -> None:
    counter = MemoryCounter(10_000)
    kept = []
    with pytest.raises(torch.OutOfMemoryError) as info:
        with counter:
            for _ in range(10):
                kept.append(torch.zeros(1000))
    message = str(info.value)
    assert message.startswith("DefaultCPUAllocator: can't allocate memory")
    assert "9.77 KiB" in message and "10000 bytes" in message
    assert isinstance(info.value, RuntimeError) and len(info.value.args) == 1
    assert is_oom(info.value)
    assert len(kept) == 2
    kept.clear()
    gc.collect()
    assert counter.live_bytes == 0


aten = torch.ops.aten

# Every operator the counter skips, with the arguments after the input (a 3 x 4 tensor).
NO_ALLOCATION_CALLS: list[tuple[Any, tuple[Any, ...]]] = [
    (torch.ops.prim.device.default, ()),
    (aten.lift_fresh.default, ()),
    (aten.detach.default, ()),
    (aten.alias.default, ()),
    (aten.view.default, ([4, 3],)),
    (aten.t.default, ()),
    (aten.transpose.int, (0, 1)),
    (aten.permute.default, ([1, 0],)),
    (aten.expand.default, ([2, 3, 4],)),
    (aten.unsqueeze.default, (0,)),
    (aten.squeeze.dim, (0,)),
    (aten.select.int, (0, 1)),
    (aten.slice.Tensor, (0, 1, 3)),
    (aten.as_strided.default, ([2, 2], [4, 1])),
]


def test_the_skipped_operators_are_listed_here() -> None:
    assert {op for op, _ in NO_ALLOCATION_CALLS} == MemoryCounter.NO_ALLOCATION


@pytest.mark.parametrize(("op", "args"), NO_ALLOCATION_CALLS, ids=lambda v: str(v))
def test_skipped_operators_return_a_view_or_no_tensor(op: Any, args: tuple[Any, ...]) -> None:
    x = torch.zeros(3, 4)
    counter = MemoryCounter(0)  # any counted allocation would raise
    with counter:
        out = op(x, *args)
    assert counter.live_bytes == counter.peak_bytes == 0
    if isinstance(out, torch.Tensor):
        assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    else:
        assert out == x.device


@pytest.mark.parametrize(("op", "args"), NO_ALLOCATION_CALLS, ids=lambda v: str(v))
def test_skipped_operators_count_nothing_on_fake_tensors(op: Any, args: tuple[Any, ...]) -> None:
    real = torch.zeros(3, 4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        # lift_fresh turns a real tensor into a fake one with a new storage: it must not count.
        x = real if op is aten.lift_fresh.default else torch.zeros(3, 4)
        counter = MemoryCounter()
        counter.track([x])
        before = counter.live_bytes
        with counter:
            out = op(x, *args)
        assert counter.live_bytes == before
    counter.close()
    del out


def test_counts_only_its_device() -> None:
    counter = MemoryCounter(device=torch.device("meta"))
    with counter:
        a = torch.zeros(100)
        b = torch.zeros(100, device="meta")
    assert counter.live_bytes == 400
    del a, b


def test_hundred_oom_trials_leak_nothing() -> None:
    model, sample = mlp()
    opt = torch.optim.AdamW(model.parameters())
    make_batch, _ = make_batch_fn(sample)
    cpu = torch.device("cpu")
    with (
        Workload(model, make_batch, cpu, optimizer=opt) as work,
        CountingMeter(cpu) as meter,
    ):
        base = meter.live_bytes(work)
        meter.set_usable(base + 200_000)
        for i in range(100):
            trial = run_trial(work, meter, 2000 + i)
            assert trial.oom and not trial.fits
            assert meter.live_bytes(work) == base


def test_probe_leaves_no_counter_alive() -> None:
    from maxbatch import find_batch_size

    model, sample = mlp()
    before = {id(o) for o in gc.get_objects() if type(o) is MemoryCounter}
    find_batch_size(model, sample, memory=200_000)
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) is MemoryCounter and id(o) not in before]
    assert alive == []
