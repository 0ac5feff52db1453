"""NoiseScaleTracker: the noise scale from the micro-batches a training loop already computes."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from scripts import benchmark_script
from torch import nn

import maxbatch
from maxbatch.errors import ConfigError
from maxbatch.stats.noisestats import two_batch_estimates


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_script("noise_scale") as module:
        yield module


def accumulate(problem, tracker, *, steps: int, micro: int, k: int, seed: int = 0) -> None:
    """An accumulation loop at fixed weights (no optimizer step): a stationary target."""
    x, y = problem.data
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _ in range(k):
            index = torch.randint(len(x), (micro,), generator=gen)
            batch = (x[index], y[index])
            (problem.loss(problem.forward(problem.model, batch), batch) / k).backward()
            tracker.micro_batch(micro, 1 / k)
        tracker.step()
        problem.model.zero_grad()


@pytest.mark.slow
def test_tracks_the_brute_force_noise_scale(bench) -> None:
    problem = bench.classifier()
    with maxbatch.NoiseScaleTracker(problem.model, beta=0.99) as tracker:
        assert tracker.estimate() is None
        accumulate(problem, tracker, steps=300, micro=32, k=4)
        ns = tracker.estimate()
    assert ns is not None and ns.draws == 300 and (ns.b_small, ns.b_big) == (32, 128)
    assert abs(ns.b_simple / problem.b_simple - 1) < 0.10
    assert abs(ns.trace_cov / problem.trace_cov - 1) < 0.10
    assert abs(ns.grad_sq_norm / problem.grad_sq_norm - 1) < 0.10
    assert 0 < ns.std_error < 0.1 * ns.b_simple


def test_one_step_equals_the_two_batch_estimate_of_its_micro_batches(bench) -> None:
    problem = bench.classifier(128)
    x, y = problem.data
    model = problem.model
    grads = []
    for part in range(2):
        model.zero_grad()
        batch = (x[part * 64 : (part + 1) * 64], y[part * 64 : (part + 1) * 64])
        problem.loss(problem.forward(model, batch), batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    model.zero_grad()
    small = float(sum(g @ g for g in grads) / 2)
    mean = (grads[0] + grads[1]) / 2
    g2, trace = two_batch_estimates(small, float(mean @ mean), 64, 128)

    with maxbatch.NoiseScaleTracker(model, beta=0.0) as tracker:
        for part in range(2):
            batch = (x[part * 64 : (part + 1) * 64], y[part * 64 : (part + 1) * 64])
            (problem.loss(problem.forward(model, batch), batch) * 0.5).backward()
            tracker.micro_batch(64, 0.5)
        tracker.step()
        ns = tracker.estimate()
    assert ns is not None
    assert ns.grad_sq_norm == pytest.approx(g2, rel=1e-5)
    assert ns.trace_cov == pytest.approx(trace, rel=1e-5)


def test_closing_removes_the_hooks() -> None:
    model = nn.Linear(4, 1)
    tracker = maxbatch.NoiseScaleTracker(model)
    tracker.close()
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ConfigError, match="no gradient reached"):
        tracker.micro_batch(2)


def test_refuses_one_micro_batch_and_weights_not_proportional_to_sizes() -> None:
    model = nn.Linear(4, 1)
    with maxbatch.NoiseScaleTracker(model) as tracker:
        model(torch.randn(2, 4)).mean().backward()
        tracker.micro_batch(2)
        with pytest.raises(ConfigError, match="two micro-batches or more"):
            tracker.step()
        for size in (2, 6):
            (model(torch.randn(size, 4)).mean() * 0.5).backward()
            tracker.micro_batch(size, 0.5)
        with pytest.raises(ConfigError, match="not proportional"):
            tracker.step()


@pytest.mark.parametrize("beta", [1.0, -0.1, True])
def test_invalid_beta(beta) -> None:
    with pytest.raises(ConfigError, match="beta"):
        maxbatch.NoiseScaleTracker(nn.Linear(2, 1), beta=beta)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_follows_a_micro_batcher(bench, reduction) -> None:
    problem = bench.classifier()
    x, y = problem.data

    def loss(out: torch.Tensor, batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, batch[1], reduction=reduction)

    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.0)  # weights stay put
    with maxbatch.NoiseScaleTracker(problem.model) as tracker:
        batcher = maxbatch.MicroBatcher(
            problem.model,
            optimizer,
            micro_batch_size=32,
            loss_fn=loss,
            forward_fn=problem.forward,
            loss_reduction=reduction,
            on_micro_batch=tracker.on_micro_batch,
        )
        gen = torch.Generator().manual_seed(1)
        for _ in range(300):
            index = torch.randint(len(x), (128,), generator=gen)
            batcher.step((x[index], y[index]))
        ns = tracker.estimate()
    assert ns is not None and ns.draws == 300 and (ns.b_small, ns.b_big) == (32, 128)
    assert abs(ns.b_simple / problem.b_simple - 1) < 0.10
    assert abs(ns.grad_sq_norm / problem.grad_sq_norm - 1) < 0.10


@pytest.mark.slow
def test_follows_a_micro_batcher_through_out_of_memory_restarts(bench) -> None:
    problem = bench.classifier()
    x, y = problem.data
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.0)
    changes = []
    with maxbatch.NoiseScaleTracker(problem.model) as tracker:
        batcher = maxbatch.MicroBatcher(
            problem.model,
            optimizer,
            micro_batch_size=128,
            loss_fn=bench._cross_entropy,
            forward_fn=problem.forward,
            on_micro_batch=tracker.on_micro_batch,
            on_change=lambda old, new, reason: changes.append((old, new)),
        )
        gen = torch.Generator().manual_seed(1)
        with maxbatch.virtual_device("24KiB"):  # 128 and then 64 samples run out of memory
            for _ in range(300):
                index = torch.randint(len(x), (256,), generator=gen)
                batcher.step((x[index], y[index]))
        ns = tracker.estimate()
    assert changes == [(128, 64), (64, 32)]
    assert ns is not None and ns.draws == 300 and (ns.b_small, ns.b_big) == (32, 256)
    assert abs(ns.b_simple / problem.b_simple - 1) < 0.10


@pytest.mark.slow
def test_every_measures_one_step_in_n(bench) -> None:
    problem = bench.classifier()
    with maxbatch.NoiseScaleTracker(problem.model, every=2) as tracker:
        accumulate(problem, tracker, steps=601, micro=32, k=4)
        ns = tracker.estimate()
    assert ns is not None and ns.draws == 301  # steps 0, 2, ..., 600
    assert abs(ns.b_simple / problem.b_simple - 1) < 0.10
