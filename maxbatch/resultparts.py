"""The stage records a :class:`~maxbatch.results.BatchSizeResult` nests: capacity, search, profile.

(And :class:`CachedSearch`: on a cache hit, the stored search apart from this run's.)

Each comes back from the result's flat dict with ``from_dict`` (its fields under their own names);
:class:`FlatNames` lets the result read them by the flat names its JSON keys have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from maxbatch.measured import MemoryModel, MemoryPoint, Skipped, Throughput, Trial


@dataclasses.dataclass(frozen=True, kw_only=True)
class CapacityAnswer:
    """The bytes the probe could use.

    Attributes:
        capacity_bytes: device capacity used by the probe.
        headroom_bytes: margin subtracted from it.
        usable_bytes: capacity minus headroom.
        virtual: True when capacity was a ``memory=`` cap enforced by counting live bytes.
    """

    capacity_bytes: int
    headroom_bytes: int
    usable_bytes: int
    virtual: bool

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CapacityAnswer:
        """The record back from its fields' dict."""
        return cls(**data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchAnswer:
    """What the ceiling search found.

    Attributes:
        ceiling: the largest batch size that fits.
        trials: every probe trial.
        memory_model: the fitted memory model, or None.
        complete: False when the probe stopped early.
        stop_reason: why the probe search ended.
        ceiling_source: ``"measured"`` (trials ran and verified it), or ``"estimated"`` (a
            virtual capacity larger than this machine can hold: the fake-tensor estimate's).
        memory: peak bytes of each size that fit in the probe, by batch size.
        steady_state: the loop state the trials measured (:func:`maxbatch.step.loop.steady_state`):
            ``steps_per_trial``, ``zero_grad``, ``micro_batches``, ``alive_at_start`` (what was
            alive at the start of the measured step), ``leak_check_steps``.
        accumulation_ceiling: the largest micro-batch that fits when accumulating (measured by
            accumulating trials, when a ``global_batch`` needs more than one micro-batch), or
            None when none was measured.
        accumulation_trials: the accumulating trials (two micro-batches per optimizer step).
    """

    ceiling: int
    trials: tuple[Trial, ...]
    memory_model: MemoryModel | None
    complete: bool
    stop_reason: str
    ceiling_source: str = "measured"
    memory: tuple[MemoryPoint, ...] = ()
    steady_state: dict[str, Any] | None = None
    accumulation_ceiling: int | None = None
    accumulation_trials: tuple[Trial, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchAnswer:
        """The record back from its fields' dict (the trials and points as dicts)."""
        mm = data.get("memory_model")
        return cls(
            **{k: v for k, v in data.items() if k not in _NESTED},
            trials=tuple(Trial(**t) for t in data["trials"]),
            accumulation_trials=tuple(Trial(**t) for t in data.get("accumulation_trials", ())),
            memory_model=None if mm is None else MemoryModel(**mm),
            memory=tuple(MemoryPoint(**p) for p in data.get("memory", ())),
        )


_NESTED = ("trials", "accumulation_trials", "memory_model", "memory")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileAnswer:
    """What the profiler timed, and how sure the pick is (empty when it did not run).

    Attributes:
        throughput: the timed sizes.
        stop_reason: why the profiler stopped timing (None when it did not run).
        skipped: the candidate sizes the profiler did not time, and why.
        confidence: how sure the pick is: ``"high"``, ``"medium"`` or ``"low"`` (None without
            the profiler).
        confidence_reason: why, in words.
        seconds: wall time of the profiler, interleaved rounds included (None without it).
        budget_seconds: the profiler's budget, which every timing and round stays within (None
            without the profiler, or when it never needed one).
    """

    throughput: tuple[Throughput, ...] = ()
    stop_reason: str | None = None
    skipped: tuple[Skipped, ...] = ()
    confidence: str | None = None
    confidence_reason: str | None = None
    seconds: float | None = None
    budget_seconds: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileAnswer:
        """The record back from its fields' dict (the points as dicts)."""
        return cls(
            **{k: v for k, v in data.items() if k not in ("throughput", "skipped")},
            throughput=tuple(Throughput(**p) for p in data.get("throughput", ())),
            skipped=tuple(Skipped(**x) for x in data.get("skipped", ())),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachedSearch:
    """For an answer from the result cache: the stored search that found it, apart from this run's.

    Attributes:
        key: the cache entry's key.
        trials: the stored search's trials, with their timings of then.
        seconds: its wall time then.
    """

    key: str
    trials: tuple[Trial, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the search as a JSON-ready dict (the trials as dicts)."""
        return {
            "key": self.key,
            "trials": [t.to_dict() for t in self.trials],
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CachedSearch:
        """The record back from :meth:`to_dict`."""
        trials = tuple(Trial(**t) for t in data["trials"])
        return cls(key=data["key"], trials=trials, seconds=data["seconds"])


class FlatNames:
    """The stage records' fields read by the result's flat names (its JSON keys)."""

    capacity: CapacityAnswer
    search: SearchAnswer
    profile: ProfileAnswer

    @property
    def ceiling(self) -> int:
        """The largest batch size that fits (``search.ceiling``)."""
        return self.search.ceiling

    @property
    def trials(self) -> tuple[Trial, ...]:
        """Every probe trial (``search.trials``)."""
        return self.search.trials

    @property
    def memory_model(self) -> MemoryModel | None:
        """The fitted memory model (``search.memory_model``)."""
        return self.search.memory_model

    @property
    def complete(self) -> bool:
        """False when the probe stopped early (``search.complete``)."""
        return self.search.complete

    @property
    def stop_reason(self) -> str:
        """Why the probe search ended (``search.stop_reason``)."""
        return self.search.stop_reason

    @property
    def ceiling_source(self) -> str:
        """``"measured"`` or ``"estimated"`` (``search.ceiling_source``)."""
        return self.search.ceiling_source

    @property
    def memory(self) -> tuple[MemoryPoint, ...]:
        """Peak bytes of each size that fit (``search.memory``)."""
        return self.search.memory

    @property
    def steady_state(self) -> dict[str, Any] | None:
        """The loop state the trials measured (``search.steady_state``)."""
        return self.search.steady_state

    @property
    def accumulation_ceiling(self) -> int | None:
        """The largest micro-batch when accumulating (``search.accumulation_ceiling``)."""
        return self.search.accumulation_ceiling

    @property
    def accumulation_trials(self) -> tuple[Trial, ...]:
        """The accumulating trials (``search.accumulation_trials``)."""
        return self.search.accumulation_trials

    @property
    def capacity_bytes(self) -> int:
        """Device capacity used by the probe (``capacity.capacity_bytes``)."""
        return self.capacity.capacity_bytes

    @property
    def headroom_bytes(self) -> int:
        """Margin subtracted from it (``capacity.headroom_bytes``)."""
        return self.capacity.headroom_bytes

    @property
    def usable_bytes(self) -> int:
        """Capacity minus headroom (``capacity.usable_bytes``)."""
        return self.capacity.usable_bytes

    @property
    def virtual(self) -> bool:
        """True for a ``memory=`` cap enforced by counting (``capacity.virtual``)."""
        return self.capacity.virtual

    @property
    def throughput(self) -> tuple[Throughput, ...]:
        """The timed sizes (``profile.throughput``)."""
        return self.profile.throughput

    @property
    def profile_stop_reason(self) -> str | None:
        """Why the profiler stopped (``profile.stop_reason``)."""
        return self.profile.stop_reason

    @property
    def profile_skipped(self) -> tuple[Skipped, ...]:
        """The sizes the profiler did not time (``profile.skipped``)."""
        return self.profile.skipped

    @property
    def pick_confidence(self) -> str | None:
        """How sure the pick is (``profile.confidence``)."""
        return self.profile.confidence

    @property
    def pick_confidence_reason(self) -> str | None:
        """Why, in words (``profile.confidence_reason``)."""
        return self.profile.confidence_reason

    @property
    def profile_seconds(self) -> float | None:
        """Wall time of the profiler (``profile.seconds``)."""
        return self.profile.seconds

    @property
    def profile_budget_seconds(self) -> float | None:
        """The profiler's budget (``profile.budget_seconds``)."""
        return self.profile.budget_seconds
