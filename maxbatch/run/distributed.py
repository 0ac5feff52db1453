"""Agreement across the ranks of a ``torch.distributed`` process group.

Every rank probes its own device, and the ranks agree at every step, so that every rank runs the
same sizes and returns the same answer:

- a trial fits only if it fit on every rank: the trial the search sees is the tightest rank's
  (its margin to its own usable memory, against the smallest usable memory of all ranks);
- the profiler's timings are the slowest rank's (a synchronised step is as slow as it);
- the search's and the profiler's clocks read the latest rank's time.

All of it runs through one exchange (:meth:`Ranks.exchange`): a fixed-size row all-gathered on a
private gloo group. A rank that fails anywhere enters the same exchange with a failure flag, so
whichever exchange its peers are waiting in, they learn of it, collect its message and raise
:class:`RankFailedError`; no rank waits for one that gave up. A rank that dies is reported as a
:class:`DistributedError` when the collective fails, at the latest after the process group's
timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maxbatch.errors import ConfigError, DistributedError, MaxbatchError, RankFailedError
from maxbatch.results import Trial
from maxbatch.run.agreement import (
    DEFAULT_TIMEOUT,
    HEADER,
    WIDTH,
    Kind,
    agreed_trial,
    group_timeout,
    is_distributed,
    quiet_ddp,
    sharded_note,
    trial_row,
)

# is_distributed and sharded_note are read from here too (the agreement's face).
__all__ = ["Ranks", "is_distributed", "join", "sharded_note"]


class Ranks:
    """The ranks taking part in one probe; with one rank every method passes through.

    Make one with :func:`join`; end it with :meth:`share` (this rank failed) or :meth:`done`.
    """

    def __init__(self, group: Any = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT):
        self.group = group
        self.timeout = timeout
        dist = torch.distributed
        self.rank = 0 if group is None else dist.get_rank()
        self.world_size = 1 if group is None else dist.get_world_size()
        self._t0 = time.perf_counter()
        self._closed = False
        self._shared: BaseException | None = None  # this rank's failure, once the peers know

    # -- the exchange ---------------------------------------------------------------------------

    def exchange(
        self, kind: Kind, payload: Sequence[float], error: BaseException | None = None
    ) -> torch.Tensor:
        """All-gather one row per rank: ``(world_size, len(payload))`` float64 payloads.

        Returns:
            The rows, one per rank (alone: this rank's).

        Raises:
            RankFailedError: another rank failed (its message is in this one).
            DistributedError: a rank did not answer (it died or stalled past the timeout), or the
                ranks are out of step.
        """
        row = torch.zeros(WIDTH, dtype=torch.float64)
        row[0], row[1] = kind.value, 1.0 if error is not None else 0.0
        row[HEADER : HEADER + len(payload)] = torch.tensor(list(payload), dtype=torch.float64)
        if self.group is None:
            if error is not None:
                raise error
            return row[None, HEADER : HEADER + len(payload)]
        rows = self._gather(row, kind)
        failed = [r for r in range(self.world_size) if rows[r, 1] > 0]
        if failed:
            message = None if error is None else f"{type(error).__name__}: {error}"
            messages = self._gather_objects(message)
            if error is not None:
                self._shared = error
                raise error  # this rank's own failure, unchanged
            first = failed[0]
            raise RankFailedError(
                f"rank {first} failed: {messages[first]}; every rank stopped", rank=first
            )
        kinds = {float(k) for k in rows[:, 0]}
        if kinds != {kind.value}:
            raise DistributedError(
                f"the ranks are out of step (rank {self.rank} at {kind.name.lower()}, others at "
                f"{sorted(Kind(k).name.lower() for k in kinds if k != kind.value)}); every rank "
                "must call find_batch_size with the same arguments"
            )
        return rows[:, HEADER : HEADER + len(payload)]

    def _gather(self, row: torch.Tensor, kind: Kind) -> torch.Tensor:
        dist = torch.distributed
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        try:
            dist.all_gather(rows, row, group=self.group)
        except RuntimeError as e:  # gloo: a closed connection or the timeout
            raise self._lost(kind.name.lower(), e) from e
        return torch.stack(rows)

    def _gather_objects(self, message: Any) -> list[Any]:
        dist = torch.distributed
        messages: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(messages, message, group=self.group)
        except RuntimeError as e:
            raise self._lost("sharing a failure", e) from e
        return messages

    def _lost(self, where: str, e: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} lost the other ranks while agreeing on {where}: a rank died or "
            f"did not answer within the process group's timeout "
            f"({self.timeout.total_seconds():g} s) ({type(e).__name__}: {e})"
        )

    # -- the end: share a failure, or wait for everyone -----------------------------------------

    def share(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed (they raise :class:`RankFailedError`).

        Only :class:`Exception` is shared: after a ``KeyboardInterrupt`` the peers stop at the
        timeout. Errors the peers know already (their own failures, lost ranks) are not sent.
        """
        try:
            known = isinstance(error, DistributedError) or error is self._shared
            if self.group is not None and isinstance(error, Exception) and not known:
                # The exchange raises ``error`` back (or a lost rank): the caller raises it anyway.
                with contextlib.suppress(Exception):
                    self.exchange(Kind.DONE, (), error)
        finally:
            self.close()

    def done(self) -> None:
        """Wait until every rank finished (a rank that failed meanwhile fails this one too)."""
        try:
            if self.group is not None:
                self.exchange(Kind.DONE, ())
        finally:
            self.close()

    def close(self) -> None:
        """Destroy the private group (idempotent)."""
        if self.group is not None and not self._closed:
            self._closed = True
            with contextlib.suppress(RuntimeError, ValueError):
                torch.distributed.destroy_process_group(self.group)

    # -- agreements -----------------------------------------------------------------------------

    def plan(
        self, capacity: int, headroom: int, usable: int, base: int
    ) -> tuple[int, int, int, int]:
        """The tightest rank's capacity, headroom and usable bytes, and the base against them."""
        rows = self.exchange(Kind.PLAN, (capacity, headroom, usable, base))
        tight = int(torch.argmin(rows[:, 2]))
        low = int(rows[tight, 2])
        agreed_base = int(torch.max(rows[:, 3] - rows[:, 2])) + low
        return int(rows[tight, 0]), int(rows[tight, 1]), low, agreed_base

    def trials(self, run: Callable[[int], Trial], usable: int) -> Callable[[int], Trial]:
        """Wrap the search's ``run(b)``: every rank runs ``b``; the agreed trial comes back.

        ``usable`` is this rank's usable bytes; the agreed trial's ``peak_bytes`` is the
        tightest rank's margin added to the smallest usable bytes, so that it fits exactly when it
        fit on every rank.

        Returns:
            The wrapped ``run`` (``run`` itself alone).
        """
        if self.group is None:
            return run

        def agreed(b: int) -> Trial:
            trial: Trial | None = None
            error: BaseException | None = None
            try:
                trial = run(b)
            except MaxbatchError as e:
                error = e
            if trial is None:
                self.exchange(Kind.TRIAL, (b,) + (0.0,) * 8, error)
                raise AssertionError("unreachable: the exchange raised")  # pragma: no cover
            rows = self.exchange(Kind.TRIAL, trial_row(trial, usable))
            if len(set(rows[:, 0].tolist())) != 1:
                raise DistributedError(
                    f"the ranks ran different batch sizes {sorted(set(rows[:, 0].tolist()))}; "
                    "every rank must call find_batch_size with the same arguments"
                )
            # Each rank's per-operator trace travels too, so that the search predicts from the
            # binding rank's trace on every rank (the same prediction everywhere).
            return agreed_trial(b, rows, self._gather_objects(trial.trace), steps=trial.steps)

        return agreed

    def timings(self, time_step: Callable[[int], Sequence[float]]) -> Callable[[int], list[float]]:
        """Wrap the profiler's ``time_step(b)``: the slowest rank's seconds, replicate by replicate.

        An empty list (the size ran out of memory) on any rank is an empty list on all.

        Returns:
            The wrapped ``time_step``.
        """
        if self.group is None:
            return lambda b: list(time_step(b))

        def agreed(b: int) -> list[float]:
            seconds: Sequence[float] = ()
            error: BaseException | None = None
            try:
                seconds = time_step(b)
            except MaxbatchError as e:
                error = e
            width = WIDTH - HEADER - 2
            if len(seconds) > width:
                raise ConfigError(f"at most {width} timed replicates per size with several ranks")
            padded = [float(b), float(len(seconds)), *seconds] + [0.0] * (width - len(seconds))
            rows = self.exchange(Kind.TIMING, padded, error)
            counts = {int(n) for n in rows[:, 1]}
            if counts != {len(seconds)} or not seconds:
                return []  # out of memory somewhere
            return [float(s) for s in rows[:, 2 : 2 + len(seconds)].max(dim=0).values]

        return agreed

    def clock(self) -> float:
        """Seconds since the ranks joined, read by the latest rank (one reading for all)."""
        elapsed = time.perf_counter() - self._t0
        if self.group is None:
            return elapsed
        return float(self.exchange(Kind.CLOCK, (elapsed,)).max())

    def least(self, value: float | None) -> float | None:
        """The smallest of the ranks' values (None stays None: every rank has None then)."""
        if value is None or self.group is None:
            return value
        return float(self.exchange(Kind.CLOCK, (value,)).min())

    def quiet_step(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """Run a DDP model's trial steps without its collectives (see :func:`quiet_ddp`).

        Returns:
            The context (nothing changes with one rank).
        """
        return contextlib.nullcontext() if self.group is None else quiet_ddp(model)


def join(distributed: bool | None) -> Ranks:
    """The ranks to agree with: all of the initialised group, or this process alone.

    Args:
        distributed: None (auto): agree when a process group with more than one rank is
            initialised; True: require one; False: probe this process alone.

    Returns:
        The ranks (this process alone without a group).

    Raises:
        ConfigError: ``distributed`` is not a bool or None, or True without a process group.
        DistributedError: the agreement's own gloo group cannot be created.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ConfigError(f"distributed={distributed!r} must be True, False or None (auto)")
    if distributed is False or (distributed is None and not is_distributed()):
        return Ranks()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "distributed=True but no torch.distributed process group is initialised; call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment)"
        )
    timeout = group_timeout()
    try:
        group = dist.new_group(backend="gloo", timeout=timeout)
    except RuntimeError as e:
        raise DistributedError(
            f"cannot create the agreement's gloo group on rank {dist.get_rank()}: {e}"
        ) from e
    return Ranks(group, timeout=timeout)
