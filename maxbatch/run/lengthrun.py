"""Real trials at a batch size *and* a length: the batches, the workload, the counted trials.

A :class:`LengthBatches` turns ``make_batch(batch_size, length)`` (or a data set whose items have
a length) into the one-argument batch maker the workload takes, at the length set before each
trial. :func:`open_runner` opens the workload on the device as the ceiling search does (state saved
and restored, the capacity planned once) and yields a :class:`Runner` whose ``run(b, length)`` is
one real trial, fed to the memory model over (batch, length).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.data import DataLoader, default_collate

from maxbatch.buckets import LengthTrial
from maxbatch.devices.capacity import enclosing_room, is_virtual, probe_capacity
from maxbatch.devices.device import describe
from maxbatch.errors import ConfigError
from maxbatch.run.finder import _device
from maxbatch.search.lengthmodel import LengthFit, Point
from maxbatch.search.meter import meter_for
from maxbatch.search.trial import run_trial
from maxbatch.settings import MemorySettings
from maxbatch.step.data import item_size
from maxbatch.step.oom import release_memory
from maxbatch.step.spec import StepSpec
from maxbatch.step.workload import build_workload

log = logging.getLogger(__name__)

MakeBatch2 = Callable[[int, int], Any]


def takes_length(make_batch: Callable[..., Any]) -> bool:
    """Whether ``make_batch`` can be called as ``make_batch(batch_size, length)``."""
    try:
        inspect.signature(make_batch).bind(1, 1)
    except TypeError:
        return False
    except ValueError:
        return True  # no signature to inspect: trust it until it is called
    return True


class LengthBatches:
    """``make_batch(batch_size)`` at the length last set (``.length``), for the workload.

    Args:
        source: ``make_batch(batch_size, length)``, or a map-style data set (or a ``DataLoader``
            over one) whose items have a length: the batch of ``b`` at ``length`` is made of the
            longest items not longer than ``length`` (repeating when fewer), collated.
        size_fn: an item's length (default: the elements of its tensors).
        collate_fn: makes a batch of items (default: the loader's, else ``default_collate``).
    """

    def __init__(
        self,
        source: Any,
        *,
        size_fn: Callable[[Any], int] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ):
        self.length = 1
        self.lengths: list[int] | None = None
        self.size_fn_given = size_fn is not None
        self._make: MakeBatch2 | None = None
        self._sorted: list[int] | None = None
        if isinstance(source, DataLoader):
            collate_fn = collate_fn or source.collate_fn
            source = source.dataset
        if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            self.dataset = source
            self.collate_fn = collate_fn or default_collate
            known = [item_size(source, i, size_fn) for i in range(len(source))]
            if not known:
                raise ConfigError("the data set is empty: there is no batch to build")
            self.lengths = known
            self._sorted = sorted(set(known))
            self._order = sorted(range(len(known)), key=lambda i: -known[i])
        elif callable(source):
            if not takes_length(source):
                raise ConfigError(
                    "make_batch must take the batch size and the length: "
                    "def make_batch(batch_size, length)"
                )
            self._make = source
        else:
            raise ConfigError(
                f"expected make_batch(batch_size, length) or a map-style data set, got "
                f"{type(source).__name__}"
            )

    def snap(self, length: int) -> int:
        """The true length of the batch at ``length``.

        Returns:
            A data set's longest item up to ``length``; for ``make_batch`` (or a data set with no
            item that short), ``length`` itself.
        """
        if self._sorted is None:
            return length
        at = bisect.bisect_right(self._sorted, length)
        return self._sorted[at - 1] if at else length

    @property
    def span(self) -> tuple[int, int] | None:
        """A data set's shortest and longest item (None for ``make_batch``).

        A batch at length ``L`` is made of items not longer than ``L``: none can be made below the
        shortest, and every length past the longest gives the same batch, the longest items.
        """
        return None if self._sorted is None else (self._sorted[0], self._sorted[-1])

    def __call__(self, batch_size: int) -> Any:
        """A batch of ``batch_size`` at the current length."""
        if self._make is not None:
            return self._make(batch_size, self.length)
        assert self.lengths is not None
        pool = [i for i in self._order if self.lengths[i] <= self.length]
        if not pool:
            raise ConfigError(
                f"no item of the data set is as short as length {self.length} (the shortest "
                f"is {min(self.lengths)}): no batch that short can be made of its items"
            )
        chosen = [pool[k % len(pool)] for k in range(batch_size)]
        with _disable_current_modes():  # read the items as host data, outside the counter
            items = [self.dataset[i] for i in chosen]
        return self.collate_fn(items)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runner:
    """Runs real trials at (batch size, length) and fits the memory model over them."""

    run_one: Callable[[int, int], tuple[LengthTrial, Point | None]]
    snap: Callable[[int], int] = int
    fit: LengthFit
    device: str
    usable_bytes: int
    on_trial: Callable[[LengthTrial], None] | None = None
    trials: list[LengthTrial] = dataclasses.field(default_factory=list)
    seen: dict[tuple[int, int], bool] = dataclasses.field(default_factory=dict)

    def run(self, batch_size: int, length: int) -> bool:
        """One real trial (or the answer of the same trial run before): does it fit?

        A data set's batch at ``length`` is as long as its longest item up to it: the trial
        runs, and is recorded, at that true length (``snap``).

        Returns:
            Whether the step fit.
        """
        length = self.snap(length)
        known = self.seen.get((batch_size, length))
        if known is not None:
            return known
        trial, point = self.run_one(batch_size, length)
        log.info(
            "trial %d: batch %d at length %d %s",
            len(self.trials) + 1,
            batch_size,
            length,
            "fits" if trial.fits else "does not fit",
        )
        self.trials.append(trial)
        self.seen[(batch_size, length)] = trial.fits
        if point is not None:
            self.fit.add(point)
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial.fits


@contextlib.contextmanager
def open_runner(
    model: torch.nn.Module,
    batches: LengthBatches,
    *,
    device: str | torch.device | None,
    memory: str | int | None,
    headroom: str | int | None,
    step_options: dict[str, Any],
    extra_state: Sequence[Any] = (),
    on_trial: Callable[[LengthTrial], None] | None = None,
) -> Iterator[Runner]:
    """Open the workload on the device (state saved, restored on leaving) and plan the capacity.

    Yields:
        The runner.
    """
    limits = MemorySettings.build(memory=memory, headroom=headroom)
    step = StepSpec.build(model, batches, extra_state=extra_state, **step_options)
    dev = _device(model, device)
    info = describe(dev)
    virtual = is_virtual(dev, limits)
    meter = meter_for(dev, virtual=virtual)
    try:
        with meter, build_workload(step, dev) as workload:
            base = meter.live_bytes(workload)
            with enclosing_room(dev, workload.state_tensors()) as room:
                capacity = probe_capacity(info, limits, base, room)
                meter.set_usable(capacity.usable_bytes)

                def run_one(batch_size: int, length: int) -> tuple[LengthTrial, Point | None]:
                    batches.length = length
                    t = run_trial(workload, meter, batch_size)
                    trial = LengthTrial(
                        batch_size=batch_size,
                        length=length,
                        fits=t.fits,
                        peak_bytes=t.peak_bytes,
                        seconds=t.seconds,
                    )
                    keep = t.fits or t.trace is not None
                    point = (
                        Point(
                            batch_size=batch_size,
                            length=length,
                            peak_bytes=t.peak_bytes,
                            trace=t.trace,
                        )
                        if keep
                        else None
                    )
                    return trial, point

                yield Runner(
                    run_one=run_one,
                    snap=batches.snap,
                    fit=LengthFit(capacity.usable_bytes),
                    device=info.device,
                    usable_bytes=capacity.usable_bytes,
                    on_trial=on_trial,
                )
    finally:
        release_memory(dev, full=True)
