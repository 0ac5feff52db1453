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
import dataclasses
import datetime
import enum
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from maxbatch.errors import ConfigError, DistributedError, MaxbatchError, RankFailedError
from maxbatch.memtrace import MemoryTrace
from maxbatch.results import Trial

#: Timeout of the agreement's collectives when the default group does not say its own.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class _Kind(float, enum.Enum):
    """What an exchange is about: peers must be at the same kind of exchange."""

    PLAN = 1.0
    TRIAL = 2.0
    TIMING = 3.0
    CLOCK = 4.0
    DONE = 5.0


#: Row layout: kind, failed, then the payload.
_HEADER = 2
_WIDTH = 16


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is initialised."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _group_timeout() -> datetime.timedelta:
    """The default group's own timeout (``init_process_group(timeout=...)``), if it says one."""
    dist = torch.distributed
    try:
        group = dist.distributed_c10d._get_default_group()
        backend = group._get_backend(torch.device("cpu"))
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, datetime.timedelta) else DEFAULT_TIMEOUT


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
        self, kind: _Kind, payload: Sequence[float], error: BaseException | None = None
    ) -> torch.Tensor:
        """All-gather one row per rank: ``(world_size, len(payload))`` float64 payloads.

        Returns:
            The rows, one per rank (alone: this rank's).

        Raises:
            RankFailedError: another rank failed (its message is in this one).
            DistributedError: a rank did not answer (it died or stalled past the timeout), or the
                ranks are out of step.
        """
        row = torch.zeros(_WIDTH, dtype=torch.float64)
        row[0], row[1] = kind.value, 1.0 if error is not None else 0.0
        row[_HEADER : _HEADER + len(payload)] = torch.tensor(list(payload), dtype=torch.float64)
        if self.group is None:
            if error is not None:
                raise error
            return row[None, _HEADER : _HEADER + len(payload)]
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
                f"{sorted(_Kind(k).name.lower() for k in kinds if k != kind.value)}); every rank "
                "must call find_batch_size with the same arguments"
            )
        return rows[:, _HEADER : _HEADER + len(payload)]

    def _gather(self, row: torch.Tensor, kind: _Kind) -> torch.Tensor:
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
                    self.exchange(_Kind.DONE, (), error)
        finally:
            self.close()

    def done(self) -> None:
        """Wait until every rank finished (a rank that failed meanwhile fails this one too)."""
        try:
            if self.group is not None:
                self.exchange(_Kind.DONE, ())
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
        rows = self.exchange(_Kind.PLAN, (capacity, headroom, usable, base))
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
                self.exchange(_Kind.TRIAL, (b,) + (0.0,) * 8, error)
                raise AssertionError("unreachable: the exchange raised")  # pragma: no cover
            rows = self.exchange(_Kind.TRIAL, _trial_row(trial, usable))
            if len(set(rows[:, 0].tolist())) != 1:
                raise DistributedError(
                    f"the ranks ran different batch sizes {sorted(set(rows[:, 0].tolist()))}; "
                    "every rank must call find_batch_size with the same arguments"
                )
            # Each rank's per-operator trace travels too, so that the search predicts from the
            # binding rank's trace on every rank (the same prediction everywhere).
            return _agreed_trial(b, rows, self._gather_objects(trial.trace), steps=trial.steps)

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
            width = _WIDTH - _HEADER - 2
            if len(seconds) > width:
                raise ConfigError(f"at most {width} timed replicates per size with several ranks")
            padded = [float(b), float(len(seconds)), *seconds] + [0.0] * (width - len(seconds))
            rows = self.exchange(_Kind.TIMING, padded, error)
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
        return float(self.exchange(_Kind.CLOCK, (elapsed,)).max())

    def least(self, value: float | None) -> float | None:
        """The smallest of the ranks' values (None stays None: every rank has None then)."""
        if value is None or self.group is None:
            return value
        return float(self.exchange(_Kind.CLOCK, (value,)).min())

    @contextlib.contextmanager
    def quiet_step(self, model: torch.nn.Module) -> Iterator[None]:
        """Run a DDP model's trial steps without its collectives; restored afterwards.

        During a trial one rank can run out of memory while the others go on: a gradient
        all-reduce or buffer broadcast inside the step would then wait for it forever. Under
        ``no_sync()`` (and without the buffer broadcast) the step's memory is the same (DDP's
        gradient buckets were allocated when it was built) and no rank waits for another.
        """
        ddp = torch.nn.parallel.DistributedDataParallel
        if self.group is None or not isinstance(model, ddp):
            yield
            return
        buffers = model.forward_sync_buffers
        model.forward_sync_buffers = False
        try:
            with model.no_sync():
                yield
        finally:
            model.forward_sync_buffers = buffers


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a ``DTensor`` this process holds (its storage reports the global size)."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def sharded_note(model: torch.nn.Module) -> str | None:
    """What to know about a model with ``DTensor`` parameters (FSDP2), or None without them."""
    if not any(local_shard(p) is not p for p in model.parameters()):
        return None
    return (
        "FSDP (DTensor) parameters: each rank's shard is counted, but the probe does not put "
        "them back exactly (a trial that runs out of memory inside FSDP's forward leaves the "
        "modules unsharded); probe before loading weights, or rebuild the model afterwards"
    )


def _trial_row(trial: Trial, usable: int) -> tuple[float, ...]:
    def maybe(value: int | None) -> float:
        return -1.0 if value is None else float(value)

    return (
        float(trial.batch_size),
        float(trial.fits),
        float(trial.oom),
        float(trial.peak_bytes - usable),
        float(usable),
        trial.seconds,
        maybe(trial.state_bytes),
        maybe(trial.reserved_bytes),
        maybe(trial.alloc_retries),
    )


def _agreed_trial(
    b: int, rows: torch.Tensor, traces: Sequence[MemoryTrace | None] = (), *, steps: int = 2
) -> Trial:
    """The trial every rank agrees on: it fits where it fit on all, at the tightest margin.

    The trace is the binding rank's (the largest peak over its usable bytes), its live bytes
    moved by the same margin, so that a trace prediction against the smallest usable bytes is
    the binding rank's own.

    Returns:
        The agreed trial.
    """

    def most(column: int) -> int | None:
        value = int(rows[:, column].max())
        return None if value < 0 else value

    low = int(rows[:, 4].min())
    binding = int(torch.argmax(rows[:, 3]))
    trace = traces[binding] if binding < len(traces) else None
    if trace is not None:
        shift = low - int(rows[binding, 4])
        trace = dataclasses.replace(trace, live=tuple(v + shift for v in trace.live))
    return Trial(
        batch_size=b,
        fits=bool(rows[:, 1].min() > 0),
        peak_bytes=int(rows[:, 3].max()) + low,
        seconds=float(rows[:, 5].max()),
        oom=bool(rows[:, 2].max() > 0),
        reserved_bytes=most(7),
        alloc_retries=most(8),
        state_bytes=most(6),
        trace=trace,
        steps=steps,  # this rank's (the profiler's cost prediction divides its seconds by it)
    )


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
    timeout = _group_timeout()
    try:
        group = dist.new_group(backend="gloo", timeout=timeout)
    except RuntimeError as e:
        raise DistributedError(
            f"cannot create the agreement's gloo group on rank {dist.get_rank()}: {e}"
        ) from e
    return Ranks(group, timeout=timeout)
