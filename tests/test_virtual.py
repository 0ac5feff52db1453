"""maxbatch.virtual_device: a user's capped device, counted as the probe counts, nesting with it."""

from __future__ import annotations

import gc

import pytest
import torch
from models import encoder, mlp

import maxbatch
from maxbatch.devices.accounting import enclosing_counters
from maxbatch.step.oom import is_oom


def _train_steps(model: torch.nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


def test_counts_a_training_loop_and_freezes_the_figures_at_the_end() -> None:
    with maxbatch.virtual_device("1MiB") as dev:
        torch.manual_seed(0)
        model = torch.nn.Linear(100, 100)  # 40 400 bytes of parameters, made inside: counted
        assert dev.live_bytes == 40_400
        x = torch.randn(8, 100)
        _train_steps(model, x)
        live_in_loop = dev.live_bytes
        assert dev.peak_bytes > live_in_loop >= 40_400 + 3_200  # gradients and x live too
        del x
        dev.reset_peak()
        assert dev.peak_bytes == dev.live_bytes
    assert dev.capacity_bytes == 1024**2
    assert dev.live_bytes == dev.peak_bytes  # frozen at the end of the block
    assert enclosing_counters(torch.device("cpu")) == []


def test_past_the_capacity_a_real_oom_and_the_allocation_is_released() -> None:
    kept: list[torch.Tensor] = []
    with pytest.raises(torch.OutOfMemoryError) as info:
        with maxbatch.virtual_device(10_000) as dev:
            for _ in range(5):
                kept.append(torch.zeros(1000))  # 4000 bytes each: the third one does not fit
    assert str(info.value).startswith("DefaultCPUAllocator: can't allocate memory")
    assert is_oom(info.value)
    assert len(kept) == 2
    assert dev.live_bytes == 8000  # the refused 4000 bytes were released before raising
    assert dev.peak_bytes == 8000


def test_track_counts_what_was_built_before_the_block() -> None:
    model, x = mlp()
    opt = torch.optim.AdamW(model.parameters())
    _train_steps(model, x)  # gradients exist, but AdamW's state does not yet
    params = sum(p.numel() * 4 for p in model.parameters())
    with maxbatch.virtual_device("1MiB") as dev:
        dev.track(model, opt)
        assert dev.live_bytes == 2 * params  # parameters and gradients
        opt.step()  # AdamW's two moments (and step counters) are made inside: counted
        assert dev.live_bytes >= 4 * params
        with pytest.raises(maxbatch.ConfigError, match="cannot track a str"):
            dev.track("model")


@pytest.mark.parametrize(
    ("capacity", "memory", "bare"),
    [(500_000, None, 500_000), (500_000, 300_000, 300_000), (300_000, 500_000, 300_000)],
)
def test_the_probe_inside_respects_the_smaller_cap(
    capacity: int, memory: int | None, bare: int
) -> None:
    model, sample = encoder()
    alone = maxbatch.find_batch_size(model, sample, memory=bare, profile=False)
    with maxbatch.virtual_device(capacity) as dev:
        inside = maxbatch.find_batch_size(model, sample, memory=memory, profile=False)
        # the user's cap is back in force after the probe
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(capacity // 4)
    assert inside.ceiling == alone.ceiling
    assert inside.capacity_bytes == bare and inside.virtual
    assert dev.peak_bytes <= capacity  # the probe's trials stayed under the user's device


def test_bytes_the_user_holds_on_the_device_leave_less_room_for_the_probe() -> None:
    model, sample = encoder()
    alone = maxbatch.find_batch_size(model, sample, memory=400_000, profile=False)
    with maxbatch.virtual_device(500_000):
        ballast = torch.zeros(25_000)  # 100 000 bytes the probe cannot use
        inside = maxbatch.find_batch_size(model, sample, profile=False)
        del ballast
    assert inside.capacity_bytes == 400_000
    assert inside.ceiling == alone.ceiling


def test_leaves_no_counter_or_entry_behind_after_an_error() -> None:
    with pytest.raises(ValueError, match="boom"):
        with maxbatch.virtual_device("1MiB"):
            raise ValueError("boom")
    assert enclosing_counters(torch.device("cpu")) == []
    gc.collect()
    x = torch.zeros(10**6)  # 4 MB: nothing caps it any more
    assert x.numel() == 10**6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": "lots"}, "capacity='lots' is not a size"),
        ({"capacity": 0}, "capacity=0 leaves no room"),
        ({"capacity": "1GiB", "round_to": 0}, "round_to=0 must be a positive integer"),
        ({"capacity": "1GiB", "device": "tpu"}, "tpu"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(maxbatch.MaxbatchError, match=match):
        with maxbatch.virtual_device(**kwargs):  # type: ignore[arg-type]
            pass
