"""MicroBatcher under the virtual device: the full batch's update, whatever the memory allows."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from torch import nn

import maxbatch
from maxbatch.train.microbatch import MicroStep

CAP = 600_000  # the 64-sample step below needs more; the probe's ceiling here is 50
N = 64


def _setup(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 8)).double()
    x = torch.randn(N, 32, dtype=torch.float64)
    y = torch.randn(N, 8, dtype=torch.float64)
    ids = torch.arange(N)
    return model, (x, y, ids)


def forward(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return model(batch[0])


def mse(output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ((output - batch[1]) ** 2).mean()


def _full_batch_steps(model: nn.Module, batches: list[Any], loss: Any = mse) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss(forward(model, batch), batch).backward()
        opt.step()
    return model


def _close(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-10, atol=0), (p - q).abs().max()


def _batches(batch: tuple[torch.Tensor, ...], steps: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [tuple(t[torch.randperm(N, generator=g)] for t in batch) for _ in range(steps)]


def test_the_full_batch_update_on_a_device_where_the_batch_does_not_fit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, batch = _setup()
    batches = _batches(batch, 4)  # made outside the device, as a loader's host batches
    reference = _full_batch_steps(copy.deepcopy(model), batches)
    with pytest.raises(torch.OutOfMemoryError):  # the global batch cannot fit in one piece
        with maxbatch.virtual_device(CAP) as dev:
            dev.track(model, batch)
            _full_batch_steps(copy.deepcopy(model), batches)

    changes: list[tuple[int, int, str]] = []
    micro: list[MicroStep] = []
    last_ids: list[int] = []
    per_step: dict[int, list[int]] = {}

    def recording_forward(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        last_ids[:] = b[2].tolist()  # plain ints: nothing allocated on the device
        return forward(m, b)

    def on_micro_batch(info: MicroStep) -> None:
        # The hook's contract: a step's sums restart at index 0 (an OOM redoes the step).
        if info.index == 0:
            per_step[info.step] = []
        per_step[info.step].extend(last_ids)
        micro.append(info)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with caplog.at_level(logging.INFO, logger="maxbatch.train.microbatch"):
        with maxbatch.virtual_device(CAP) as dev:
            dev.track(model, batch)
            mb = maxbatch.MicroBatcher(
                model,
                opt,
                micro_batch_size=N,
                loss_fn=mse,
                forward_fn=recording_forward,
                on_change=lambda *change: changes.append(change),
                on_micro_batch=on_micro_batch,
            )
            losses = [mb.step(b) for b in batches]
    _close(model, reference)
    assert mb.micro_batch_size < N and changes == [(N, N // 2, "out of memory")]
    assert "micro-batch size 64 -> 32 (out of memory" in caplog.text
    assert mb.steps == 4 and all(loss.ndim == 0 for loss in losses)
    assert dev.peak_bytes <= CAP
    # every sample exactly once in each step's update
    assert all(sorted(ids) == list(range(N)) for ids in per_step.values()) and len(per_step) == 4
    assert any(m.attempt > 0 for m in micro)  # a step was redone after its OOM
    last = [m for m in micro if m.step == 3]
    assert [m.index for m in last] == [0, 1] and sum(m.weight for m in last) == 1


def test_a_sum_loss_is_not_reweighted() -> None:
    model, batch = _setup(1)

    def sse(output: torch.Tensor, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return ((output - b[1]) ** 2).sum()

    batches = _batches(batch, 2)
    reference = _full_batch_steps(copy.deepcopy(model), batches, loss=sse)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mb = maxbatch.MicroBatcher(
        model, opt, micro_batch_size=10, loss_fn=sse, forward_fn=forward, loss_reduction="sum"
    )
    for b in batches:
        mb.step(b)
    _close(model, reference)


def test_the_memory_model_lowers_to_what_fits_not_to_half() -> None:
    model, batch = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = maxbatch.find_batch_size(
        model, batch, optimizer=opt, forward_fn=forward, loss_fn=mse, memory=CAP, profile=False
    )
    changes: list[tuple[int, int, str]] = []
    batches = _batches(batch, 3)
    with maxbatch.virtual_device(CAP) as dev:
        dev.track(model, batch)
        mb = maxbatch.MicroBatcher.from_result(
            probe,
            model,
            opt,
            micro_batch_size=N,
            loss_fn=mse,
            forward_fn=forward,
            on_change=lambda *change: changes.append(change),
        )
        for b in batches:
            mb.step(b)
    assert changes == [(N, probe.ceiling, "out of memory")] and probe.ceiling > N // 2


def test_growing_again_after_clean_steps() -> None:
    model, batch = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    changes: list[tuple[int, int, str]] = []
    batches = _batches(batch, 5)
    with maxbatch.virtual_device(CAP) as dev:
        dev.track(model, batch)
        mb = maxbatch.MicroBatcher(
            model,
            opt,
            micro_batch_size=N,
            loss_fn=mse,
            forward_fn=forward,
            grow_after=2,
            on_change=lambda *change: changes.append(change),
        )
        for b in batches:
            mb.step(b)
    assert changes[:3] == [
        (N, N // 2, "out of memory"),
        (N // 2, N, "2 clean steps"),
        (N, N // 2, "out of memory"),
    ]


def test_a_failed_attempt_leaves_no_trace_in_the_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.Linear(256, 8)).double()
    x = torch.randn(N, 32, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    with maxbatch.virtual_device(400_000) as dev:
        dev.track(model, x)
        mb = maxbatch.MicroBatcher(model, opt, micro_batch_size=N)
        mb.step(x)
        mb.step(x)
    assert mb.micro_batch_size < N
    # one count per micro-batch that made it into a step, none for the attempts thrown away
    assert int(bn.num_batches_tracked) == 2 * (N // mb.micro_batch_size)


def test_other_errors_propagate_untouched_and_nothing_is_stepped() -> None:
    model, batch = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    error = ValueError("bad batch")

    def broken(m: nn.Module, b: Any) -> torch.Tensor:
        raise error

    mb = maxbatch.MicroBatcher(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=8, forward_fn=broken
    )
    with pytest.raises(ValueError) as info:
        mb.step(batch)
    assert info.value is error and mb.steps == 0 and mb.micro_batch_size == 8
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_one_sample_that_does_not_fit_is_a_typed_error() -> None:
    model, batch = _setup()
    with maxbatch.virtual_device(200_000) as dev:
        dev.track(model, batch)
        mb = maxbatch.MicroBatcher(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            micro_batch_size=2,
            loss_fn=mse,
            forward_fn=forward,
        )
        with pytest.raises(maxbatch.DoesNotFitError, match="a micro-batch of 1 sample"):
            mb.step(batch)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"micro_batch_size": 0}, "micro_batch_size=0 must be a positive integer"),
        ({"micro_batch_size": 4, "grow_after": 0}, "grow_after=0"),
        ({"micro_batch_size": 4, "loss_reduction": "max"}, "loss_reduction='max' is not valid"),
        ({"micro_batch_size": 4, "usable_bytes": 10}, "needs both memory_model and usable"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], match: str) -> None:
    model, _ = _setup()
    with pytest.raises(maxbatch.ConfigError, match=match):
        maxbatch.MicroBatcher(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
