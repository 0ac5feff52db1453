"""The reference answers: the true ceiling by brute force, and throughput over a sweep of sizes.

The ceiling is scanned with maxbatch's own trial (``Workload`` + ``CountingMeter`` +
``run_trial``, through :func:`.workbench.virtual_device`), at the same cap, so "fits" means the
same thing as for every tool: the step, run twice, never has more live bytes than the cap.
Throughput is timed outside any counter, with no counting overhead.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Iterable
from typing import Any

from maxbatch.errors import DoesNotFitError
from maxbatch.step.batching import batch_size_of, make_batch_fn

from .workbench import Workbench, virtual_device
from .workloads import Spec, adamw, train_step

WARMUP = 2  #: untimed steps per size (the first creates AdamW's state)
REPLICATES = 5  #: timed steps per size; their median counts
ALIGN = 8  #: sizes near the ceiling in the sweep are multiples of this
NEAR = 0.25  #: "near the ceiling": within this fraction below it
MAX_NEAR = 6  #: at most this many multiples of ``ALIGN`` near the ceiling


@dataclasses.dataclass(frozen=True)
class Truth:
    """The largest batch size that fits, found by scanning.

    Attributes:
        ceiling: the largest size that fit (``ceiling + 1`` did not).
        stride: the coarse scan ran every ``stride``-th size from the sample's size up.
        trials: trials the scan ran (coarse, exact and the fresh check).
        verified: a fresh virtual device confirmed ``ceiling`` fits and ``ceiling + 1`` does not.
        seconds: wall time of the scan.
    """

    ceiling: int
    stride: int
    trials: int
    verified: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the truth as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _bench(spec: Spec) -> Workbench:
    model, sample = spec.build()
    return Workbench(
        spec.name, model, sample, optimizer=adamw, forward_fn=spec.forward, loss_fn=spec.loss
    )


def brute_force(spec: Spec, cap_bytes: int) -> Truth:
    """Scan batch sizes for the ceiling at ``cap_bytes``.

    Doubling from the sample's size only sets the stride (about the square root of the ceiling,
    a power of two); the scan then tries every ``stride``-th size from the sample's size up to the
    first that does not fit, then every size after the last that fit, up to the first that does
    not. A fresh virtual device finally runs the ceiling and the size above it again.

    Raises:
        DoesNotFitError: the sample's own batch size does not fit.
    """
    t0 = time.perf_counter()
    bench = _bench(spec)
    start = batch_size_of(bench.sample)
    count = 0
    with virtual_device(bench, cap_bytes) as run:

        def fits(b: int) -> bool:
            nonlocal count
            count += 1
            return run(b).fits

        first = run(start)
        count += 1
        if not first.fits:
            raise DoesNotFitError(
                f"{spec.name}: the sample's batch size {start} does not fit in {cap_bytes} bytes",
                batch_size=start,
                needed_bytes=first.peak_bytes,
                available_bytes=cap_bytes,
            )
        top = start
        while fits(2 * top):
            top *= 2
        stride = 2 ** max(0, round(math.log2(math.sqrt(2 * top))))
        last = start
        b = start + stride
        while fits(b):
            last, b = b, b + stride
        b = last + 1
        while fits(b):
            last, b = b, b + 1
    with virtual_device(_bench(spec), cap_bytes) as run:
        verified = run(last).fits and not run(last + 1).fits
    return Truth(last, stride, count + 2, verified, time.perf_counter() - t0)


def sweep_sizes(ceiling: int, sample_size: int, extra: Iterable[int | None] = ()) -> list[int]:
    """The sizes whose throughput is compared: no size above ``ceiling``.

    Powers of two from the sample's size, up to ``MAX_NEAR`` multiples of ``ALIGN`` in the top
    ``NEAR`` of the range, the ceiling itself, and the ``extra`` sizes (the tools' answers).
    """
    sizes = {ceiling}
    p = 1
    while p <= ceiling:
        if p >= sample_size:
            sizes.add(p)
        p *= 2
    top = ceiling // ALIGN * ALIGN
    low = max(ALIGN, math.ceil((1 - NEAR) * ceiling))
    near = list(range(top, low - 1, -ALIGN))
    if len(near) > MAX_NEAR:  # spread over the band, the largest multiple always in
        near = [near[round(i * (len(near) - 1) / (MAX_NEAR - 1))] for i in range(MAX_NEAR)]
    sizes.update(near)
    sizes.update(b for b in extra if b is not None and 1 <= b <= ceiling)
    return sorted(sizes)


@dataclasses.dataclass(frozen=True)
class Speed:
    """Samples per second of the training step at one batch size."""

    batch_size: int
    samples_per_second: float
    median_seconds: float
    iqr_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the point as a JSON-ready dict."""
        return dataclasses.asdict(self)


def throughput(spec: Spec, sizes: Iterable[int]) -> dict[int, Speed]:
    """Time the step at each size: ``WARMUP`` untimed steps, then ``REPLICATES`` timed ones.

    The timed steps run in rounds, one step per size per round (ascending, then descending), so
    that a slow spell of a shared machine hits every size alike instead of a few. One fresh model
    and AdamW serve all sizes; no virtual device (nothing is counted).
    """
    model, sample = spec.build()
    model.train()
    make_batch, _ = make_batch_fn(sample)
    optimizer = adamw(model.parameters())
    batches = {b: make_batch(b) for b in sorted(set(sizes))}
    for batch in batches.values():
        for _ in range(WARMUP):
            train_step(spec, model, optimizer, batch)
    times: dict[int, list[float]] = {b: [] for b in batches}
    order = list(batches)
    for _ in range(REPLICATES):
        for b in order:
            t0 = time.perf_counter()
            train_step(spec, model, optimizer, batches[b])
            times[b].append(time.perf_counter() - t0)
        order.reverse()
    out = {}
    for b, seconds in times.items():
        q = statistics.quantiles(seconds, n=4)
        median = statistics.median(seconds)
        out[b] = Speed(b, b / median, median, q[2] - q[0])
    return out
