"""``find_bucket_sizes``: the largest batch size at every length bucket, a profile over lengths.

The memory model over (batch, length) (:mod:`maxbatch.run.lengthrun`) predicts each bucket's
ceiling; :func:`maxbatch.run.lengths.verify_ceiling` verifies it with real trials.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maxbatch.buckets import Bucket, BucketProfile, LengthTrial
from maxbatch.errors import DoesNotFitError
from maxbatch.grid import positive_int
from maxbatch.run.lengthrun import LengthBatches, Runner, open_runner
from maxbatch.run.lengths import NO_LIMIT, verify_ceiling
from maxbatch.search.bucketbins import bins_from_lengths, check_bins, histogram, shares
from maxbatch.search.lengthorders import second_size


def find_bucket_sizes(
    model: torch.nn.Module,
    data: Any,
    *,
    buckets: int | Sequence[int] = 8,
    lengths: Sequence[int] | None = None,
    size_fn: Callable[[Any], int] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    max_batch_size: int | None = None,
    device: str | torch.device | None = None,
    memory: str | int | None = None,
    headroom: str | int | None = None,
    extra_state: Sequence[Any] = (),
    on_trial: Callable[[LengthTrial], None] | None = None,
    **step: Any,
) -> BucketProfile:
    """The largest batch size at every length bucket: a profile over lengths.

    The memory model over (batch, length) is fitted from two small trials, then each bucket's
    ceiling is predicted and verified at the bucket's longest length (it fits; one more does
    not), longest bucket first; every trial that fits refines the model. When the predictions
    hold this takes ``2 * buckets + 2`` real trials.

    Args:
        model: the model, on the device to probe.
        data: a map-style data set (or a ``DataLoader`` over one) whose items have a length
            (``size_fn``), or ``make_batch(batch_size, length)``.
        buckets: a number of buckets (cut from the data set's lengths so that each holds about the
            same total length, as lhotse estimates its bins), or their upper lengths.
        lengths: the data set's lengths when ``data`` is ``make_batch`` (for the bins and shares).
        size_fn: a data set item's length (default: the elements of its tensors).
        collate_fn: makes a batch of a data set's items (default: ``default_collate``).
        max_batch_size: the largest batch size to try (default: no limit).
        device: as :func:`~maxbatch.find_batch_size`.
        memory: as :func:`~maxbatch.find_batch_size` (the virtual device).
        headroom: as :func:`~maxbatch.find_batch_size`.
        extra_state: as :func:`~maxbatch.find_batch_size`.
        on_trial: called with each :class:`~maxbatch.LengthTrial` as it finishes.
        **step: ``optimizer``, ``loss_fn``, ``forward_fn``, ``train_step``, ``mode`` and
            ``precision``, as :func:`~maxbatch.find_batch_size` takes them.

    Returns:
        A :class:`~maxbatch.BucketProfile`.

    Raises:
        ConfigError: an option is invalid, or ``buckets`` is a number without lengths.
        DoesNotFitError: batch size 1 does not fit at the longest bucket's length.
        WorkloadError: the step failed for a reason other than memory.
    """
    started = time.perf_counter()
    batches = LengthBatches(data, size_fn=size_fn, collate_fn=collate_fn)
    known = list(batches.lengths if batches.lengths is not None else (lengths or ()))
    bins = bins_from_lengths(known, buckets) if isinstance(buckets, int) else check_bins(buckets)
    limit = NO_LIMIT if max_batch_size is None else positive_int(max_batch_size, "max_batch_size")
    with open_runner(
        model,
        batches,
        device=device,
        memory=memory,
        headroom=headroom,
        step_options=step,
        extra_state=extra_state,
        on_trial=on_trial,
    ) as runner:
        ceilings, predicted = _profile(runner, bins, limit)
    rows = shares(known, bins)
    longer = sum(1 for n in known if n > bins[-1])
    notes = (
        (f"{longer} items are longer than the last bucket ({bins[-1]}): no batch size for them",)
        if longer
        else ()
    )
    return BucketProfile(
        buckets=tuple(
            Bucket(
                max_length=upper,
                ceiling=ceilings[upper],
                min_length=low,
                items=items,
                share=items / len(known) if known else 0.0,
                predicted_ceiling=predicted[upper],
            )
            for upper, (low, items) in zip(bins, rows, strict=True)
        ),
        memory_model=runner.fit.model(),
        trials=tuple(runner.trials),
        seconds=time.perf_counter() - started,
        device=runner.device,
        usable_bytes=runner.usable_bytes,
        histogram=histogram(known),
        notes=notes,
    )


def _profile(
    runner: Runner, bins: Sequence[int], limit: int
) -> tuple[dict[int, int], dict[int, int | None]]:
    """Fit from two small trials, then predict and verify each bucket, longest first.

    Returns:
        Each bin's verified ceiling and what the model predicted before its trials.

    Raises:
        DoesNotFitError: batch size 1 does not fit at the longest length.
    """
    longest, shortest = bins[-1], bins[0]
    # Batch size 2, not 1: at 1 some operators skip their copies (a transpose of a dimension of
    # 1), so its trace does not line up with the others'.
    first = 2 if limit >= 2 and runner.run(2, longest) else 1
    if first == 1 and not runner.run(1, longest):
        raise DoesNotFitError(
            f"batch size 1 does not fit at length {longest} in {runner.usable_bytes} usable "
            "bytes; use a shorter last bucket (`--find length` says how long fits)",
            batch_size=1,
            needed_bytes=runner.trials[-1].peak_bytes,
            available_bytes=runner.usable_bytes,
        )
    if shortest != longest:
        runner.run(second_size(first, shortest / longest, limit), shortest)
    ceilings: dict[int, int] = {}
    predicted: dict[int, int | None] = {}
    # The longest, then the shortest (a trial there already fixes its line), then the rest.
    for upper in dict.fromkeys([longest, shortest, *reversed(bins)]):
        predicted[upper] = runner.fit.ceiling(upper, limit=limit)
        ceilings[upper] = verify_ceiling(runner, upper, limit=limit)
    return ceilings, predicted
