"""The length axis: the longest length that fits (``find_max_length``), and its verification.

The profile over lengths (:mod:`maxbatch.run.bucketsizes`) verifies its ceilings here too.

Both run real trials at (batch size, length) (:mod:`maxbatch.run.lengthrun`), fit the memory model
over (batch, length) from their per-operator traces (:mod:`maxbatch.search.lengthmodel`), and verify
every answer as the ceiling search does: the answer fits, the next size (or length) does not. Each
prediction is tried first, and every trial that fits sharpens the model for the next one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maxbatch.buckets import LengthResult, LengthTrial
from maxbatch.errors import ConfigError, DoesNotFitError
from maxbatch.grid import positive_int
from maxbatch.run.lengthrun import LengthBatches, Runner, open_runner

#: The largest batch size and length tried when no limit is given.
NO_LIMIT = 1 << 24
#: Trials at one length (or batch size) that follow the model before the search bisects.
FOLLOW_MODEL = 4
#: While nothing has failed, a guess goes at most this many times past what fit (or to 64).
GROWTH = 16


def _next(
    lo: int, hi: int, guess: int | None, *, tried: int, missed: bool, hold: bool = True
) -> int:
    """The next point between ``lo`` (fits) and ``hi`` (does not), in grid units.

    The model's guess when it falls between them; its neighbour above ``lo`` when it says ``lo``
    is the answer (to verify it). Bisection (or doubling while no failure is known) instead when
    there is no guess, when a trial already proved it wrong, after ``FOLLOW_MODEL`` trials, and
    when the guess before failed and this one only creeps below that failure (a model fitted on
    peaks that the failures cannot correct).

    Returns:
        The next point to try, strictly between ``lo`` and ``hi``.
    """
    unbounded = hi > NO_LIMIT
    creeping = missed and not unbounded and guess is not None and guess >= lo + 0.9 * (hi - lo)
    if guess is not None and tried < FOLLOW_MODEL and not creeping:
        if (
            unbounded and hold
        ):  # no failure yet: a wild guess (a huge length) could exhaust the host
            guess = min(guess, max(GROWTH * lo, 64))
        if lo < guess < hi or guess == lo:
            return min(max(guess, lo + 1), hi - 1)
    if unbounded:
        return max(lo + 1, 2 * lo)
    return (lo + hi) // 2


def verify_ceiling(runner: Runner, length: int, *, limit: int) -> int:
    """The largest batch size that fits at ``length``: it fits, the next does not (or the limit).

    Returns:
        The verified ceiling (0: batch size 1 does not fit).
    """
    lo, hi = 0, limit + 1
    for (b, n), fits in runner.seen.items():  # earlier trials at this length bound it
        if n == runner.snap(length):
            lo, hi = (max(lo, b), hi) if fits else (lo, min(hi, b))
    tried, missed = 0, False
    while hi - lo > 1:
        guess = runner.fit.ceiling(length, limit=limit)
        b = _next(lo, hi, guess, tried=tried, missed=missed, hold=False)
        tried += 1
        missed = not runner.run(b, length)
        lo, hi = (lo, b) if missed else (b, hi)
    return lo


def verify_length(runner: Runner, batch_size: int, *, step: int, low: int, limit: int) -> int:
    """The longest multiple of ``step`` that fits at ``batch_size`` (verified like a ceiling).

    Returns:
        The verified length (0: ``low`` does not fit).
    """
    lo, hi = 0, limit // step + 1  # in units of step
    first = max(1, -(-low // step))
    if not runner.run(batch_size, first * step):
        return 0
    lo, tried = first, 0
    if hi > 2 * first and runner.run(batch_size, 2 * first * step):  # a second length: a slope
        lo = 2 * first
    elif hi > 2 * first:
        hi = 2 * first
    missed = False
    while hi - lo > 1:
        guess = runner.fit.max_length(batch_size, step=step, limit=(hi - 1) * step)
        units = _next(lo, hi, None if guess is None else guess // step, tried=tried, missed=missed)
        tried += 1
        missed = not runner.run(batch_size, units * step)
        lo, hi = (lo, units) if missed else (units, hi)
    return lo * step


def find_max_length(
    model: torch.nn.Module,
    make_batch: Any,
    *,
    batch_size: int,
    length_multiple_of: int = 1,
    min_length: int | None = None,
    max_length: int | None = None,
    size_fn: Callable[[Any], int] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: str | torch.device | None = None,
    memory: str | int | None = None,
    headroom: str | int | None = None,
    extra_state: Sequence[Any] = (),
    on_trial: Callable[[LengthTrial], None] | None = None,
    **step: Any,
) -> LengthResult:
    """The longest length whose real step fits at ``batch_size``.

    Args:
        model: the model, on the device to probe.
        make_batch: ``make_batch(batch_size, length)`` returning a batch, or a map-style data set
            whose items have a length (``size_fn``): its longest items up to each length, so the
            search runs from its shortest item to its longest (``longest_item``).
        batch_size: the batch size every trial runs.
        length_multiple_of: only try multiples of this (e.g. 64 for a kernel's tile).
        min_length: the shortest length to try (default: ``length_multiple_of``, or a data
            set's shortest item).
        max_length: the longest length to try (default: no limit).
        size_fn: a data set item's length (default: the elements of its tensors).
        collate_fn: makes a batch of a data set's items (default: ``default_collate``).
        device: as :func:`~maxbatch.find_batch_size`.
        memory: as :func:`~maxbatch.find_batch_size` (the virtual device).
        headroom: as :func:`~maxbatch.find_batch_size`.
        extra_state: as :func:`~maxbatch.find_batch_size`.
        on_trial: called with each :class:`~maxbatch.LengthTrial` as it finishes.
        **step: ``optimizer``, ``loss_fn``, ``forward_fn``, ``train_step``, ``mode`` and
            ``precision``, as :func:`~maxbatch.find_batch_size` takes them.

    Returns:
        A :class:`~maxbatch.LengthResult`: ``max_length`` fits, ``max_length +
        length_multiple_of`` does not (``complete`` False when the limit stopped the search).
        From a data set: its longest item that fits, the next longer batch tried does not
        (``complete`` False when its longest items fit: it holds nothing longer).

    Raises:
        ConfigError: an option is invalid, or no length to try has a batch of the data set.
        DoesNotFitError: the shortest length does not fit at ``batch_size``.
        WorkloadError: the step failed for a reason other than memory.
    """
    started = time.perf_counter()
    positive_int(batch_size, "batch_size")
    positive_int(length_multiple_of, "length_multiple_of")
    batches = LengthBatches(make_batch, size_fn=size_fn, collate_fn=collate_fn)
    low, limit = _lengths_to_try(
        batches.span, step=length_multiple_of, min_length=min_length, max_length=max_length
    )
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
        found = verify_length(runner, batch_size, step=length_multiple_of, low=low, limit=limit)
        if found == 0:
            raise DoesNotFitError(
                f"length {low} does not fit at batch size {batch_size} in "
                f"{runner.usable_bytes} usable bytes; lower the batch size or free memory",
                batch_size=batch_size,
                needed_bytes=max(t.peak_bytes for t in runner.trials),
                available_bytes=runner.usable_bytes,
            )
        end = _end(
            runner,
            batches,
            batch_size=batch_size,
            found=found,
            step=length_multiple_of,
            limit=limit,
        )
    return LengthResult(
        max_length=end.max_length,
        batch_size=batch_size,
        length_multiple_of=length_multiple_of,
        trials=tuple(runner.trials),
        seconds=time.perf_counter() - started,
        device=runner.device,
        usable_bytes=runner.usable_bytes,
        memory_model=runner.fit.model(),
        complete=end.complete,
        notes=end.notes,
        longest_item=None if batches.span is None else batches.span[1],
        longest_item_fits=end.longest_fits,
    )


def _lengths_to_try(
    span: tuple[int, int] | None, *, step: int, min_length: int | None, max_length: int | None
) -> tuple[int, int]:
    """The shortest and the longest length to try: the options', within a data set's items.

    A data set's batch at a length is made of its longest items not longer than it: none below
    its shortest item, and every length past its longest gives the same batch. The search starts
    at the shortest item and ends at the longest (its answer then says the data set ends there).

    Returns:
        The shortest length and the limit.

    Raises:
        ConfigError: an option is invalid, or no length on the grid has a batch of the data set.
    """
    low = step if min_length is None else positive_int(min_length, "min_length")
    limit = NO_LIMIT if max_length is None else positive_int(max_length, "max_length")
    if limit < low:
        raise ConfigError(f"max_length={limit} is below the shortest length to try ({low})")
    if span is None:
        return low, limit
    shortest, longest = span
    for name, value in (("min_length", min_length), ("max_length", max_length)):
        if value is not None and value < shortest:
            raise ConfigError(
                f"{name}={value} is shorter than every item of the data set (the shortest is "
                f"{shortest}): no batch that short can be made of its items"
            )
    low, limit = max(low, shortest), min(limit, longest)
    if -(-low // step) * step > limit:
        raise ConfigError(
            f"no multiple of length_multiple_of={step} lies within the lengths to try "
            f"({max(shortest, min_length or 0)} to {limit}, the data set's items), so no batch of "
            "its items can be tried; lower length_multiple_of, or give "
            "make_batch(batch_size, length) instead of the data set"
        )
    return low, limit


@dataclasses.dataclass(frozen=True, kw_only=True)
class _End:
    """How the search ended: the answer, verified or stopped, the data set's longest items."""

    max_length: int
    complete: bool
    longest_fits: bool | None = None
    notes: tuple[str, ...] = ()


def _end(
    runner: Runner, batches: LengthBatches, *, batch_size: int, found: int, step: int, limit: int
) -> _End:
    """How the search for ``found`` ended: at a failure, at ``limit`` or at the data set's end.

    A data set's batch at a length is its longest items up to it, as long as the longest of
    them: the answer is then the longest batch that fit, the data set's longest item that fits.
    At the data set's end with its longest item off the grid, one more trial runs that item's
    batch: whether the whole data set fits at ``batch_size``.

    Returns:
        The ending.
    """
    stopped = found + step > limit
    stop = f"stopped at max_length={limit}: longer lengths were not tried"
    span = batches.span
    if span is None:
        return _End(max_length=found, complete=not stopped, notes=(stop,) if stopped else ())
    longest = span[1]
    fits: bool | None = None if stopped else False  # not stopped: a shorter batch failed
    if stopped and limit == longest:  # the data set ends here: do its longest items fit?
        fits = found == longest or runner.run(batch_size, longest)
    answer = max(t.length for t in runner.trials if t.fits)
    failed = [t.length for t in runner.trials if not t.fits and t.length > answer]
    notes = [f"{answer} is the data set's longest item that fits at batch size {batch_size}"]
    if failed:
        notes[0] += f"; the next batch tried, {min(failed)} long, does not fit"
    if fits and limit == longest:
        notes.append(
            f"the data set holds nothing longer than {longest}: give "
            "make_batch(batch_size, length) instead of the data set to try longer lengths"
        )
    elif stopped and limit < longest:
        notes.append(stop)
    if not batches.size_fn_given:
        notes.append("lengths are the elements of an item's tensors: size_fn(item) sets them")
    return _End(
        max_length=answer,
        complete=not (stopped and fits is not False),
        longest_fits=fits,
        notes=tuple(notes),
    )
