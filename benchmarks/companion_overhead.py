"""Per-step overhead of maxbatch's training companions against a plain training loop.

The same training step (forward, the file's loss, backward, optimizer step) on each bundled
example, measured side by side in alternating rounds:

- ``plain``: the step as a training loop runs it;
- ``virtual_device``: the same step inside ``maxbatch.virtual_device(capacity)`` (every storage
  counted, no cap hit);
- ``MicroBatcher``: ``MicroBatcher.step(batch)`` with the whole batch in one micro-batch (no OOM):
  what the slicing, the loss weighting, the saved buffers and RNG state and the out-of-memory guard
  cost when nothing goes wrong.

Run from the repository root::

    python benchmarks/companion_overhead.py            # 3 examples, 7 rounds of 10 steps each
    python benchmarks/companion_overhead.py --rounds 3 --steps 5 --models mlp
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import maxbatch
from maxbatch.run.modelfile import load_model_file
from maxbatch.step.batching import batch_size_of, make_batch_fn
from maxbatch.step.forward import to_device
from maxbatch.step.workload import Workload, make_optimizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = ("mlp", "cnn", "transformer")
#: The virtual device is far larger than any step here: its bookkeeping is measured, not its cap.
CAPACITY = "64GiB"

#: A variant: from the workload and its batch, the context each round runs in and the step.
Runner = tuple[Callable[[], contextlib.AbstractContextManager[Any]], Callable[[], None]]
Variant = Callable[[Workload, Any], Runner]


def _plain(work: Workload, batch: Any) -> Runner:
    return contextlib.nullcontext, lambda: work.step(batch)


def _virtual(work: Workload, batch: Any) -> Runner:
    # Entered once per round, as a user wraps an epoch; the model counted as on the device.
    @contextlib.contextmanager
    def device() -> Iterator[None]:
        with maxbatch.virtual_device(CAPACITY) as dev:
            dev.track(work.model, work.optimizer)
            yield

    return device, lambda: work.step(batch)


def _micro(work: Workload, batch: Any) -> Runner:
    # The whole batch in one micro-batch: no OOM, so what is measured is the guard's cost.
    assert work.optimizer is not None
    mb = maxbatch.MicroBatcher(
        work.model,
        work.optimizer,
        micro_batch_size=batch_size_of(batch),
        loss_fn=work.hooks.loss_fn,
        forward_fn=work.hooks.forward_fn,
    )
    return contextlib.nullcontext, lambda: mb.step(batch)


VARIANTS: dict[str, Variant] = {
    "plain": _plain,
    "virtual_device": _virtual,
    "MicroBatcher": _micro,
}


def load(name: str) -> tuple[Workload, Any]:
    """The example's workload (its forward, loss and optimizer) and one batch of its sample."""
    spec = load_model_file(EXAMPLES / f"{name}.py")
    opt = make_optimizer(spec.optimizer, spec.model)
    make_batch, size = make_batch_fn(spec.sample if spec.make_batch is None else spec.make_batch)
    work = Workload(
        spec.model,
        make_batch,
        torch.device("cpu"),
        optimizer=opt,
        forward_fn=spec.forward,
        loss_fn=spec.loss,
        train_step=spec.train_step,
    )
    return work, to_device(make_batch(size or 32), work.device)


def measure(name: str, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of every variant, one median per round, the variants interleaved."""
    work, batch = load(name)
    with work:  # saved and prepared; restored at the end
        steppers = {v: make(work, batch) for v, make in VARIANTS.items()}
        for context, step in steppers.values():  # warm-up: optimizer state, allocator, kernels
            with context():
                step()
        times: dict[str, list[float]] = {v: [] for v in steppers}
        for r in range(rounds):
            order = list(steppers) if r % 2 == 0 else list(reversed(steppers))
            for v in order:
                context, step = steppers[v]
                per_step = []
                with context():
                    for _ in range(steps):
                        start = time.perf_counter()
                        step()
                        per_step.append(time.perf_counter() - start)
                times[v].append(statistics.median(per_step))
    return times


def render(name: str, times: dict[str, list[float]]) -> list[str]:
    """One line per variant: median ms per step, spread over the rounds, overhead vs plain."""
    base = statistics.median(times["plain"])
    lines = []
    for v, ts in times.items():
        med = statistics.median(ts)
        spread = (max(ts) - min(ts)) / med * 100 if med else 0.0
        over = (
            ""
            if v == "plain"
            else f"{(med / base - 1) * 100:+7.1f} %  {(med - base) * 1e3:+.3f} ms"
        )
        lines.append(f"{name:<12} {v:<15} {med * 1000:9.3f} ms  ±{spread:5.1f} %  {over}")
    return lines


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated examples")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per variant")
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    with _threads(args.threads):
        print(f"{'model':<12} {'variant':<15} {'per step':>12}  {'spread':>8}  overhead vs plain")
        for name in args.models.split(","):
            for line in render(name, measure(name, args.rounds, args.steps)):
                print(line)
    print(
        "per step: the median over rounds of each round's median step; spread: (max - min) / "
        "median over rounds. Timings on a shared CPU are noisy: compare the columns, not runs."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
