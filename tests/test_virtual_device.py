"""The live-bytes counter: exact counting, a real OutOfMemoryError past the cap, nothing leaked."""

from __future__ import annotations

import gc

import pytest
import torch
from models import mlp

from maxbatch.accounting import MemoryCounter
from maxbatch.batching import make_batch_fn
from maxbatch.oom import is_oom
from maxbatch.trial import Meter, run_trial
from maxbatch.workload import Workload


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
    work = Workload(model, make_batch, torch.device("cpu"), optimizer=opt)
    work.save()
    work.prepare()
    meter = Meter(torch.device("cpu"), counting=True)
    base = meter.live_bytes(work)
    meter.set_usable(base + 200_000)
    for i in range(100):
        trial = run_trial(work, meter, 2000 + i)
        assert trial.oom and not trial.fits
        assert meter.live_bytes(work) == base
    work.reset(final=True)


def test_probe_leaves_no_counter_alive() -> None:
    from maxbatch import find_batch_size

    model, sample = mlp()
    before = {id(o) for o in gc.get_objects() if type(o) is MemoryCounter}
    find_batch_size(model, sample, memory=200_000)
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) is MemoryCounter and id(o) not in before]
    assert alive == []
