"""A batch size per length bucket: maxbatch's profile against per-bucket doubling and bisection.

One run prints, side by side, what it costs to find the largest batch size of every length bucket
of a long-tailed data set (lengths 8 to 512, most short) for a one-layer transformer language
model with the math attention kernel (memory quadratic in the length), on the virtual device:

- ``maxbatch``: :func:`maxbatch.find_bucket_sizes`: the memory model over (batch, length) fitted
  from the per-operator traces of two small trials, then each bucket's prediction verified (it
  fits, one more does not); the budget is ``2 x buckets + 2`` real trials;
- ``doubling+bisection``: the method NVIDIA NeMo's OOMptimizer describes, written here from that
  description: in every bucket, from batch size 1, double until a step runs out of memory, then
  bisect between the last size that fit and the first that did not.

Both count real trials (each runs the step twice, as every maxbatch trial does) and seconds, and
their ceilings must agree. Then ``benchmarks/_bucket_epochs.py`` trains epochs with the profile:
the bucket sampler against the single worst-case batch size and a hand-set token budget::

    python benchmarks/buckets.py                       # 2000 items, 1 epoch per strategy
    python benchmarks/buckets.py --items 500 --epochs 3
    python benchmarks/buckets.py --no-epochs           # the trial counts only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bucket_epochs as epochs

import maxbatch
from maxbatch.lengthrun import LengthBatches, Runner, open_runner


def make_batch(batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """``batch_size`` sequences of ``length`` tokens, as the epochs' items are."""
    return epochs.at_length(length)(batch_size)


def maxbatch_profile(lengths: Sequence[int], cap: str) -> tuple[maxbatch.BucketProfile, float]:
    """maxbatch's profile over the epochs' buckets, and its seconds."""
    started = time.perf_counter()
    profile = maxbatch.find_bucket_sizes(
        epochs.build_model(),
        make_batch,
        buckets=epochs.UPPERS,
        lengths=lengths,
        memory=cap,
        optimizer="adamw",
    )
    return profile, time.perf_counter() - started


def _doubling_bisection(runner: Runner, length: int) -> int:
    """OOMptimizer's search in one bucket: double from 1 until a failure, then bisect."""
    fit, b = 0, 1
    while runner.run(b, length):
        fit, b = b, 2 * b
    failed = b
    while failed - fit > 1:
        mid = (fit + failed) // 2
        if runner.run(mid, length):
            fit = mid
        else:
            failed = mid
    return fit


def doubling_profile(cap: str) -> tuple[list[int], int, float]:
    """Every bucket's ceiling by doubling and bisection; the ceilings, trials and seconds."""
    started = time.perf_counter()
    with open_runner(
        epochs.build_model(),
        LengthBatches(make_batch),
        device=None,
        memory=cap,
        headroom=None,
        step_options={"optimizer": "adamw"},
    ) as runner:
        ceilings = [_doubling_bisection(runner, n) for n in epochs.UPPERS]
    return ceilings, len(runner.trials), time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="sequences (default 2000)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per strategy (default 1)")
    parser.add_argument("--cap", default=epochs.CAP, help=f"virtual capacity ({epochs.CAP})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-epochs", action="store_true", help="skip the epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = epochs.long_tailed(args.items)
    print(
        f"{len(lengths)} sequences, lengths {min(lengths)} to {max(lengths)} (median "
        f"{statistics.median(lengths):.0f}), buckets {list(epochs.UPPERS)}, cap {args.cap}, "
        f"attention {epochs.ATTENTION}, {args.threads} torch thread(s)"
    )
    profile, seconds = maxbatch_profile(lengths, args.cap)
    ceilings, trials, doubling_seconds = doubling_profile(args.cap)
    ours = [b.ceiling for b in profile.buckets]
    budget = 2 * len(profile.buckets) + 2
    print(f"{'method':<20} {'real trials':>11} {'seconds':>8}  ceilings per bucket")
    print(f"{'maxbatch':<20} {len(profile.trials):>11} {seconds:>8.1f}  {ours}")
    print(f"{'doubling+bisection':<20} {trials:>11} {doubling_seconds:>8.1f}  {ceilings}")
    print(
        f"ceilings agree: {ours == ceilings}; maxbatch's budget 2 x buckets + 2 = {budget}; "
        f"predicted before the trials: {[b.predicted_ceiling for b in profile.buckets]}"
    )
    print(f"lhotse: {profile.to_lhotse()}")
    if not args.no_epochs:
        rows = epochs.compare(profile, lengths, args.cap, epochs=args.epochs)
        for line in epochs.render(rows):
            print(line)
    return 0 if ours == ceilings else 1


if __name__ == "__main__":
    sys.exit(main())
