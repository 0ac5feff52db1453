"""The options of a run that are not the step: enums, memory, search, profile and advice settings.

Records at the bottom of the house (they import only other bottom modules), so that every wing can
take them: :class:`MemorySettings` (the cap and headroom), :class:`SearchSettings` (grid, budget,
cache), :class:`ProfileSettings` (the throughput profiler and the pick rule),
:class:`AdviceSettings`
(epoch, global batch, learning rate); the enums :class:`Mode`, :class:`Precision`, :class:`Target`,
:class:`PickRule`. The step itself is :class:`maxbatch.step.spec.StepSpec`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any

from maxbatch.errors import ConfigError
from maxbatch.grid import ALL_SIZES, Grid, positive_int, positive_number
from maxbatch.results import Throughput, Trial
from maxbatch.units import parse_bytes

TOLERANCE = 0.02  #: the "within" pick: the smallest size within 2 % of the best throughput


class PickRule(str, enum.Enum):
    """How the batch size is picked from the timed sizes."""

    WITHIN = "within"  # the smallest size within the tolerance of the best throughput
    FASTEST = "fastest"  # the best throughput outright


def check_pick(rule: PickRule | str, tolerance: float) -> PickRule:
    """Validate the pick rule and tolerance at the boundary, before touching the device.

    Returns:
        The rule.

    Raises:
        ConfigError: the rule is not ``"within"`` or ``"fastest"``, or the tolerance is not a
            number in ``[0, 1)``.
    """
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not 0 <= tolerance < 1
    ):
        raise ConfigError(f"tolerance={tolerance!r} must be a number in [0, 1), e.g. 0.02 for 2 %")
    try:
        return PickRule(str(getattr(rule, "value", rule)).lower())
    except ValueError:
        raise ConfigError(f"pick={rule!r} is not valid; choose one of: within, fastest") from None


class Mode(str, enum.Enum):
    """What a step does: a training step or a forward pass in inference mode."""

    TRAIN = "train"
    INFERENCE = "inference"


class Precision(str, enum.Enum):
    """Autocast precision applied around the forward pass and loss."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Target(str, enum.Enum):
    """The platform an estimate is for: the virtual device's counting, or adjusted for CUDA."""

    CPU = "cpu"
    CUDA = "cuda"


def parse_enum(kind: type[enum.Enum], value: Any, name: str) -> Any:
    """Turn a string into a member of ``kind`` or raise a ConfigError naming the choices."""
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        choices = ", ".join(str(m.value) for m in kind)
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {choices}") from None


def _bytes_or_none(value: str | int | None, name: str) -> int | None:
    return None if value is None else parse_bytes(value, name=name)


def _capacities(memory: str | int | Sequence[str | int] | None) -> list[int]:
    """The estimate's capacities: one size, a list of sizes, or ``"16GiB,24GiB"``."""
    if memory is None:
        return []
    items = memory.split(",") if isinstance(memory, str) else memory
    if isinstance(items, (int, float)):
        items = [items]
    sizes = [parse_bytes(item, name="memory") for item in items]
    if any(s == 0 for s in sizes):
        raise ConfigError("memory=0 leaves no room for anything; give a size such as 24GiB")
    return sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemorySettings:
    """The memory a probe may use, or the capacities an estimate predicts for.

    Attributes:
        memory_bytes: the virtual device's capacity (``memory=``), or None for the real device.
        headroom_bytes: bytes kept free below the capacity, or None for the device kind's default.
        capacities_bytes: the estimate's capacities, in order (``memory="16GiB,24GiB"``); a probe
            takes one, ``memory_bytes``.
    """

    memory_bytes: int | None = None
    headroom_bytes: int | None = None
    capacities_bytes: tuple[int, ...] = ()

    @classmethod
    def build(
        cls,
        *,
        memory: str | int | Sequence[str | int] | None,
        headroom: str | int | None,
        several: bool = False,
    ) -> MemorySettings:
        """Parse ``memory`` and ``headroom`` (``"24GiB"``, bytes).

        Args:
            memory: the capacity; with ``several``, a list of them or ``"16GiB,24GiB"``.
            headroom: the bytes kept free below each capacity.
            several: the estimate's capacities (``capacities_bytes``) rather than the probe's one.

        Returns:
            The settings.

        Raises:
            ConfigError: a size cannot be parsed, or one is 0.
        """
        room = _bytes_or_none(headroom, "headroom")
        if several:
            caps = tuple(_capacities(memory))
            return cls(headroom_bytes=room, capacities_bytes=caps)
        if isinstance(memory, Sequence) and not isinstance(memory, str):
            raise ConfigError(f"memory={memory!r} must be one size such as 300MiB")
        cap = _bytes_or_none(memory, "memory")
        if cap == 0:
            raise ConfigError("memory=0 leaves no room for anything; give a size such as 300MiB")
        return cls(memory_bytes=cap, headroom_bytes=room)

    @property
    def virtual(self) -> bool:
        """True when the capacity is a cap enforced by counting live bytes."""
        return self.memory_bytes is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """How the ceiling is searched.

    Attributes:
        grid: the sizes that may be tried.
        time_budget: seconds for the probe and the profiler together, or None.
        estimate_first: start from the fake step's guess: True, False, None (auto: CUDA only).
        on_trial: called with each trial as it finishes.
        cache: look the answer up in the result cache (checked by two trials) and store it.
        trust_cache: use a cached answer without the check.
        max_trials: trials after which the search stops with the best verified size, or None.
    """

    grid: Grid = ALL_SIZES
    time_budget: float | None = None
    max_trials: int | None = None
    estimate_first: bool | None = None
    on_trial: Callable[[Trial], None] | None = None
    cache: bool = False
    trust_cache: bool = False

    def __post_init__(self) -> None:
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(
                f"time_budget={self.time_budget!r} must be a positive number of seconds"
            )
        if self.max_trials is not None:
            positive_int(self.max_trials, "max_trials")
        if self.estimate_first is not None and not isinstance(self.estimate_first, bool):
            raise ConfigError(
                f"estimate_first={self.estimate_first!r} must be True, False or None (auto)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileSettings:
    """Whether and how throughput is timed, and how the batch size is picked.

    Attributes:
        enabled: time the step below the ceiling (False: the pick is the ceiling).
        rule: the pick rule.
        tolerance: the share of the best throughput the ``within`` rule may give up.
        on_point: called with each timed size.
    """

    enabled: bool = True
    rule: PickRule = PickRule.WITHIN
    tolerance: float = TOLERANCE
    on_point: Callable[[Throughput], None] | None = None

    @classmethod
    def build(
        cls,
        *,
        enabled: bool,
        pick: str | PickRule,
        tolerance: float,
        on_point: Callable[[Throughput], None] | None,
    ) -> ProfileSettings:
        """Validate the pick rule and tolerance.

        Returns:
            The settings.

        Raises:
            ConfigError: the rule or the tolerance is invalid.
        """
        rule = check_pick(pick, tolerance)
        return cls(enabled=enabled, rule=rule, tolerance=tolerance, on_point=on_point)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdviceSettings:
    """What the advice is computed from (all optional).

    Attributes:
        dataset_size: samples per epoch.
        global_batch: the batch per optimizer step wanted.
        base_batch: the batch size ``base_lr`` was tuned at.
        base_lr: a tuned learning rate.
        noise_scale: measure the gradient noise scale; the advice suggests a global batch near
            the critical batch.
    """

    dataset_size: int | None = None
    global_batch: int | None = None
    base_batch: int | None = None
    base_lr: float | None = None
    noise_scale: bool = False

    def __post_init__(self) -> None:
        for name in ("dataset_size", "global_batch", "base_batch"):
            if (value := getattr(self, name)) is not None:
                positive_int(value, name)
        if self.base_lr is not None:
            positive_number(self.base_lr, "base_lr")
        if (self.base_batch is None) != (self.base_lr is None):
            raise ConfigError("scaling a learning rate needs both base_batch and base_lr")

    @property
    def wanted(self) -> bool:
        """True when any advice was asked for."""
        return self.noise_scale or any(v is not None for v in self.keywords().values())

    def keywords(self) -> dict[str, Any]:
        """The settings as the keywords of ``advice_for`` (no noise scale)."""
        return {
            "dataset_size": self.dataset_size,
            "global_batch": self.global_batch,
            "base_batch": self.base_batch,
            "base_lr": self.base_lr,
        }
