"""What a run is asked to do, packed at the entry into frozen records and validated once.

The entry points (:func:`~maxbatch.find_batch_size`, :func:`~maxbatch.estimate_batch_size`) take
flat keywords, as users expect; their first lines build these records, and every stage after
takes records, never loose options:

- :class:`StepSpec`: the step (model, batch source, optimizer, loss, forward, train step, mode,
  precision), shared by the probe and the estimate;
- :class:`MemorySettings`: the memory cap and the headroom;
- :class:`SearchSettings`: the grid of sizes, the time budget, the first guess, progress;
- :class:`ProfileSettings`: the throughput profiler and the pick rule;
- :class:`AdviceSettings`: what the advice needs (epoch, global batch, learning rate).

A new option goes into the record of the stage that reads it, and is checked in its ``build``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maxbatch.batching import make_batch_fn
from maxbatch.data import as_batch_source
from maxbatch.errors import ConfigError
from maxbatch.extrastate import ExtraState
from maxbatch.grid import ALL_SIZES, Grid, positive_int
from maxbatch.loop import Loop
from maxbatch.pick import TOLERANCE, PickRule, check_pick
from maxbatch.results import Throughput, Trial
from maxbatch.units import parse_bytes


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


ForwardFn = Callable[[torch.nn.Module, Any], Any]
LossFn = Callable[[Any, Any], torch.Tensor]
TrainStepFn = Callable[[torch.nn.Module, Any, "torch.optim.Optimizer | None"], Any]
OptimizerArg = torch.optim.Optimizer | str | Callable[..., torch.optim.Optimizer] | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSpec:
    """The training (or inference) step whose batch size is sought.

    Attributes:
        model: the user's model (never copied here).
        sample: the batch source: a batch, ``make_batch(batch_size)``, or a
            :class:`~maxbatch.data.DataSource` (a data set or loader, scanned).
        make_batch: a batch of any size from it.
        sample_size: the sample's batch size, or None for a user's ``make_batch``.
        optimizer: an optimizer, a factory, a name, or None (AdamW in training).
        loss_fn: ``loss_fn(output, batch)``, or None for the default loss.
        forward_fn: ``forward_fn(model, batch)``, or None for the default call.
        train_step: the user's whole step, or None.
        mode: training or inference.
        precision: the autocast precision (FP32: none).
        extra_state: more state the step changes, restored after every trial.
        loop: the loop's order (where it clears gradients, micro-batches per optimizer step).
    """

    model: torch.nn.Module
    sample: Any
    make_batch: Callable[[int], Any]
    sample_size: int | None
    optimizer: OptimizerArg = None
    loss_fn: LossFn | None = None
    forward_fn: ForwardFn | None = None
    train_step: TrainStepFn | None = None
    mode: Mode = Mode.TRAIN
    precision: Precision = Precision.FP32
    extra_state: ExtraState = ExtraState(())
    loop: Loop = Loop()

    @classmethod
    def build(
        cls,
        model: Any,
        sample: Any,
        *,
        optimizer: OptimizerArg = None,
        loss_fn: LossFn | None = None,
        forward_fn: ForwardFn | None = None,
        train_step: TrainStepFn | None = None,
        mode: str | Mode = "train",
        precision: str | Precision | None = None,
        extra_state: Sequence[Any] = (),
        loop: Loop | None = None,
    ) -> StepSpec:
        """Validate the public keywords of the step (see :func:`~maxbatch.find_batch_size`).

        Returns:
            The step, validated.

        Raises:
            ConfigError: the model is not a module, the mode or precision is unknown, an
                ``extra_state`` item cannot be saved, or a ``train_step`` has a loop order.
            WorkloadError: the sample has no batch dimension.
        """
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        run_mode: Mode = parse_enum(Mode, mode, "mode")
        prec: Precision = parse_enum(Precision, precision or "fp32", "precision")
        loop = loop or Loop()
        if train_step is not None and (loop.zero_grad, loop.accumulate) != (
            Loop().zero_grad,
            1,
        ):
            raise ConfigError(
                "train_step runs your whole step in your own order: zero_grad and accumulate "
                "describe maxbatch's step; leave them out, or pass loss_fn instead of train_step"
            )
        extra = ExtraState(extra_state).with_scalers(train_step)
        sample = as_batch_source(sample)  # a data set or loader: its worst case, scanned now
        make_batch, sample_size = make_batch_fn(sample)
        return cls(
            model=model,
            sample=sample,
            make_batch=make_batch,
            sample_size=sample_size,
            optimizer=optimizer,
            loss_fn=loss_fn,
            forward_fn=forward_fn,
            train_step=train_step,
            mode=run_mode,
            precision=prec,
            extra_state=extra,
            loop=loop,
        )

    def with_optimizer(self, optimizer: torch.optim.Optimizer | None) -> StepSpec:
        """This step with the optimizer a workload chose for it (None: ``"none"``)."""
        return dataclasses.replace(self, optimizer="none" if optimizer is None else optimizer)

    @property
    def precision_name(self) -> str | None:
        """The precision as results report it: None for FP32."""
        return None if self.precision is Precision.FP32 else self.precision.value


def _bytes_or_none(value: str | int | None, name: str) -> int | None:
    return None if value is None else parse_bytes(value, name=name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemorySettings:
    """The memory a probe may use.

    Attributes:
        memory_bytes: the virtual device's capacity (``memory=``), or None for the real device.
        headroom_bytes: bytes kept free below the capacity, or None for the device kind's default.
    """

    memory_bytes: int | None = None
    headroom_bytes: int | None = None

    @classmethod
    def build(cls, *, memory: str | int | None, headroom: str | int | None) -> MemorySettings:
        """Parse ``memory`` and ``headroom`` (``"24GiB"``, bytes).

        Returns:
            The settings.

        Raises:
            ConfigError: a size cannot be parsed, or ``memory`` is 0.
        """
        cap = _bytes_or_none(memory, "memory")
        if cap == 0:
            raise ConfigError("memory=0 leaves no room for anything; give a size such as 300MiB")
        return cls(memory_bytes=cap, headroom_bytes=_bytes_or_none(headroom, "headroom"))

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
    """

    grid: Grid = ALL_SIZES
    time_budget: float | None = None
    estimate_first: bool | None = None
    on_trial: Callable[[Trial], None] | None = None
    cache: bool = False
    trust_cache: bool = False

    def __post_init__(self) -> None:
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(
                f"time_budget={self.time_budget!r} must be a positive number of seconds"
            )
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
        lr = self.base_lr
        if lr is not None and (isinstance(lr, bool) or not float(lr) > 0):
            raise ConfigError(f"base_lr={lr!r} must be a positive number")
        if (self.base_batch is None) != (lr is None):
            raise ConfigError("scaling a learning rate needs both base_batch and base_lr")

    @property
    def wanted(self) -> bool:
        """True when any advice was asked for."""
        return self.noise_scale or any(v is not None for v in self.keywords().values())

    def keywords(self) -> dict[str, Any]:
        """The settings as the keywords of :func:`~maxbatch.advise.advice_for` (no noise scale)."""
        return {
            "dataset_size": self.dataset_size,
            "global_batch": self.global_batch,
            "base_batch": self.base_batch,
            "base_lr": self.base_lr,
        }

    def check_step(self, step: StepSpec) -> None:
        """Check that the step has what the noise scale needs, when it is asked for.

        Raises:
            ConfigError: the noise scale was asked for in inference mode, or with a
                ``train_step`` and no ``loss_fn``.
        """
        if self.noise_scale and (
            step.mode is Mode.INFERENCE or (step.train_step is not None and not step.loss_fn)
        ):
            raise ConfigError(
                "noise_scale needs the training loss: not in inference mode, and with a "
                "train_step pass loss_fn too"
            )
