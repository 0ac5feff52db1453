"""What a run is asked to do, packed at the entry into frozen records and validated once.

The entry points (:func:`~maxbatch.find_batch_size`, :func:`~maxbatch.estimate_batch_size`) take
flat keywords, as users expect; their first lines build these records, and every stage after
takes records, never loose options:

- :class:`StepSpec`: the step (model, batch source, optimizer, loss, forward, train step, mode,
  precision), shared by the probe and the estimate;
- the settings of the other stages (memory, search, profile, advice) are records of
  :mod:`maxbatch.settings`, at the bottom of the house.

A new option goes into the record of the stage that reads it, and is checked in its ``build``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from maxbatch.errors import ConfigError
from maxbatch.settings import AdviceSettings, Mode, Precision, parse_enum
from maxbatch.step.batching import make_batch_fn
from maxbatch.step.data import as_batch_source
from maxbatch.step.extrastate import ExtraState
from maxbatch.step.loop import Loop

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
            :class:`~maxbatch.step.data.DataSource` (a data set or loader, scanned).
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
    extra_state: ExtraState = ExtraState(items=())
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
        extra = ExtraState(items=extra_state).with_scalers(train_step)
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


def check_noise_scale(advice: AdviceSettings, step: StepSpec) -> None:
    """Check that the step has what the noise scale needs, when it is asked for.

    Raises:
        ConfigError: the noise scale was asked for in inference mode, or with a
            ``train_step`` and no ``loss_fn``.
    """
    if advice.noise_scale and (
        step.mode is Mode.INFERENCE or (step.train_step is not None and not step.loss_fn)
    ):
        raise ConfigError(
            "noise_scale needs the training loss: not in inference mode, and with a "
            "train_step pass loss_fn too"
        )
