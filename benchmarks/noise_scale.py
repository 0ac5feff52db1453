"""The noise scale estimate against the truth, and what it costs.

Problems where ``tr(Σ)`` and ``|G|²`` are known: linear regression with Gaussian inputs and noise
(closed form), and classifiers on a finite data set (exact, from every per-sample gradient with
``torch.func``). For each problem and (small, big) batch pair it prints the estimate, the truth,
the error and the standard error; then how many draws the linear regression needs to be within
10 % for 19 seeds in 20; then the cost of ``noise_scale`` and of ``NoiseScaleTracker`` against
training steps. Timings are this process's CPU time on one thread (``time.process_time``: less
sensitive than wall-clock time to other processes on a shared machine, but still noisy there).

    python benchmarks/noise_scale.py            # about a minute on one core
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import maxbatch


@dataclasses.dataclass
class Problem:
    name: str
    model: nn.Module
    data: Any
    forward: Callable[[nn.Module, Any], torch.Tensor]
    loss: Callable[[torch.Tensor, Any], torch.Tensor]
    trace_cov: float
    grad_sq_norm: float

    @property
    def b_simple(self) -> float:
        return self.trace_cov / self.grad_sq_norm


def _forward(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(batch[0])


def _mse(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - batch[1]).square().mean()


def _cross_entropy(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.cross_entropy(out, batch[1])


def linear_regression(d: int = 10, sigma: float = 1.0, distance: float = 1.0) -> Problem:
    """``y = w*·x + ε``, ``x ~ N(0, I_d)``, ``ε ~ N(0, σ²)``, loss ``½(w·x − y)²``, at ``w* + δ``.

    The per-sample gradient is ``x(x·δ − ε)``: ``G = δ`` and ``Σ = (|δ|² + σ²) I + δδᵀ``
    (Gaussian fourth moments), so ``|G|² = |δ|²`` and ``tr(Σ) = d(|δ|² + σ²) + |δ|²``.
    """
    gen = torch.Generator().manual_seed(d)
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    delta = torch.randn(d, generator=gen, dtype=torch.float64)
    delta *= distance / delta.norm()
    model = nn.Linear(d, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])

    def make_batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(b, d, dtype=torch.float64)
        return x, x @ w_star + sigma * torch.randn(b, dtype=torch.float64)

    dd = distance**2
    return Problem(
        f"linear d={d} sigma={sigma:g} |delta|={distance:g}",
        model,
        make_batch,
        _forward,
        _mse,
        d * (dd + sigma**2) + dd,
        dd,
    )


def exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Any) -> tuple[float, float]:
    """``(tr(Σ), |G|²)`` over the data set ``(x, y)`` from every per-sample gradient.

    ``Σ`` is the population covariance (divided by ``n``): the noise of samples drawn uniformly.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> Any:
        return loss(functional_call(model, p, (xi[None],)), (None, yi[None]))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], 1).double()
    mean = flat.mean(0)
    return float((flat - mean).square().sum(1).mean()), float(mean @ mean)


def classifier(n: int = 1024, features: int = 8, classes: int = 3, hidden: int = 16) -> Problem:
    """A two-layer classifier at its initial weights on a finite, noisy-labelled data set."""
    torch.manual_seed(n + features)
    x = torch.randn(n, features)
    y = (x[:, :classes] + 0.8 * torch.randn(n, classes)).argmax(1)
    model = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    trace, g2 = exact(model, x, y, _cross_entropy)
    name = f"classifier n={n} {features}-{hidden}-{classes}"
    return Problem(name, model, (x, y), _forward, _cross_entropy, trace, g2)


def small_cnn(n: int = 256) -> Problem:
    """A small CNN (no batch norm: its per-sample gradient is not defined) on 8x8 images."""
    torch.manual_seed(n)
    x = torch.randn(n, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)
    )
    trace, g2 = exact(model, x, y, _cross_entropy)
    return Problem(f"cnn n={n}", model, (x, y), _forward, _cross_entropy, trace, g2)


def mlp(n: int = 2048, features: int = 256, width: int = 512, classes: int = 10) -> Problem:
    """A wider MLP (400k parameters) for the costs only: its truth is not computed (nan)."""
    torch.manual_seed(n)
    x = torch.randn(n, features)
    y = torch.randint(0, classes, (n,))
    model = nn.Sequential(
        nn.Linear(features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, classes),
    )
    nan = float("nan")
    return Problem(
        f"mlp {features}-{width}-{width}-{classes}",
        model,
        (x, y),
        _forward,
        _cross_entropy,
        nan,
        nan,
    )


def estimate(problem: Problem, b_small: int, b_big: int, batches: int, seed: int = 0) -> Any:
    return maxbatch.noise_scale(
        problem.model,
        problem.data,
        loss_fn=problem.loss,
        forward_fn=problem.forward,
        batches=batches,
        b_small=b_small,
        b_big=b_big,
        seed=seed,
    )


def draws_needed(problem: Problem, b_small: int, b_big: int, seeds: int = 20) -> int | None:
    """The fewest draws (of 5, 10, 20, 40, 80) within 10 % of the truth for 19 seeds in 20."""
    for batches in (5, 10, 20, 40, 80):
        errors = [
            abs(estimate(problem, b_small, b_big, batches, seed).b_simple / problem.b_simple - 1)
            for seed in range(seeds)
        ]
        if sum(e <= 0.10 for e in errors) >= 0.95 * seeds:
            return batches
    return None


def _sgd_steps(problem: Problem, batch: Any, steps: int) -> float:
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.0)
    start = time.process_time()
    for _ in range(steps):
        opt.zero_grad()
        problem.loss(problem.forward(problem.model, batch), batch).backward()
        opt.step()
    return (time.process_time() - start) / steps


def cost(problem: Problem, b_small: int, b_big: int, batches: int) -> tuple[float, float]:
    """Seconds of ``noise_scale``, over the seconds of one training step at ``b_big``."""
    seconds = []
    for _ in range(3):
        start = time.process_time()
        estimate(problem, b_small, b_big, batches)
        seconds.append(time.process_time() - start)
    x, y = problem.data if isinstance(problem.data, tuple) else problem.data(b_big)
    big = (x[torch.arange(b_big) % len(x)], y[torch.arange(b_big) % len(y)])
    step = statistics.median(_sgd_steps(problem, big, 20) for _ in range(3))
    return statistics.median(seconds), step


def tracker_overhead(
    problem: Problem, micro: int, k: int, steps: int = 5, every: int = 1
) -> tuple[float, float]:
    """Seconds per optimizer step of an accumulation loop without the tracker, and the median
    ratio with/without over 25 rounds that alternate the two (pairs see the same load)."""
    x, y = problem.data
    batches = [(x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]) for i in range(k)]
    opt = torch.optim.SGD(problem.model.parameters(), lr=0.0)

    def loop(tracker: maxbatch.NoiseScaleTracker | None) -> float:
        start = time.process_time()
        for _ in range(steps):
            for batch in batches:
                (problem.loss(problem.forward(problem.model, batch), batch) / k).backward()
                if tracker is not None:
                    tracker.micro_batch(micro, 1 / k)
            if tracker is not None:
                tracker.step()
            opt.step()
            opt.zero_grad()
        return (time.process_time() - start) / steps

    plain, ratios = [], []
    for _ in range(25):
        plain.append(loop(None))
        with maxbatch.NoiseScaleTracker(problem.model, every=every) as tracker:
            ratios.append(loop(tracker) / plain[-1])
    return statistics.median(plain), statistics.median(ratios)


PAIRS = ((8, 64), (32, 256), (64, 512))


def main() -> None:
    torch.set_num_threads(1)
    problems = [linear_regression(), linear_regression(50, 0.5, 0.3), classifier(), small_cnn()]
    print("estimate against the truth, 20 draws, seed 0 (B_simple; error; standard error)")
    print(f"{'problem':<40} {'pair':>9} {'truth':>9} {'estimate':>9} {'error':>7} {'s.e.':>7}")
    for problem in problems:
        for b_small, b_big in PAIRS:
            ns = estimate(problem, b_small, b_big, 20)
            err = ns.b_simple / problem.b_simple - 1
            print(
                f"{problem.name:<40} {b_small:>4}/{b_big:<4} {problem.b_simple:>9.2f} "
                f"{ns.b_simple:>9.2f} {err:>+7.1%} {ns.std_error / problem.b_simple:>7.1%}"
            )
    print("\ndraws needed for 10 % in 19 seeds of 20 (5, 10, 20, 40 or 80 tried)")
    for problem in problems:
        for b_small, b_big in PAIRS:
            needed = draws_needed(problem, b_small, b_big)
            print(f"{problem.name:<40} {b_small:>4}/{b_big:<4} {needed}")
    print("\ncost: noise_scale (20 draws) against one SGD step at b_big (CPU time, noisy)")
    problems.append(mlp())
    for problem in problems[2:]:
        for b_small, b_big in PAIRS:
            seconds, step = cost(problem, b_small, b_big, 20)
            print(
                f"{problem.name:<40} {b_small:>4}/{b_big:<4} {seconds * 1000:8.1f} ms = "
                f"{seconds / step:5.1f} steps of {step * 1000:.2f} ms "
                f"({seconds / step / 20:.1f} per draw)"
            )
    print("\nNoiseScaleTracker: CPU time per optimizer step of an accumulation loop")
    for problem in problems[2:]:
        for micro, k, every in ((16, 4, 1), (64, 8, 1), (64, 8, 10)):
            plain, ratio = tracker_overhead(
                problem, micro, k, steps=10 if every > 1 else 5, every=every
            )
            print(
                f"{problem.name:<40} {k} x {micro:<4} plain {plain * 1000:7.2f} ms, "
                f"tracked (every={every}) {ratio - 1:+.1%} (median of 25 paired rounds)"
            )


if __name__ == "__main__":
    main()
