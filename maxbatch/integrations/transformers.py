"""``tune(trainer)``: the Hugging Face Trainer's batch size and accumulation, from maxbatch's probe.

Call it between building the Trainer and training::

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    tune(trainer, global_batch=256)
    trainer.train()

It probes the Trainer's own ``training_step`` (its ``compute_loss``, mixed precision and backward),
with the optimizer and scheduler the Trainer would create (or the ones it was given), the gradient
clipping it applies, and the worst case of its train data set (its largest items, through its data
collator and column removal; the first batch of an iterable data set), on ``args.device``. Then it
sets ``args.per_device_train_batch_size`` and, given ``global_batch``,
``args.gradient_accumulation_steps``, so that ``trainer.train()`` runs at the new size. The model's
state and a given optimizer's and scheduler's are restored; an optimizer and scheduler that the
probe created are dropped, so ``train()`` creates them for the real number of steps.

The callback form, :class:`MaxBatchCallback`, does the same when the Trainer is built with it in
``callbacks=[...]``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, IterableDataset

from maxbatch import BatchSizeResult, ConfigError, find_batch_size
from maxbatch.integrations._common import (
    Plan,
    check_global_batch,
    plan_of,
    probe_data,
    probe_options,
    with_extra_state,
    with_steady_state,
)

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "maxbatch.integrations.transformers needs transformers and accelerate: "
        "pip install 'maxbatch[transformers]'"
    ) from e

__all__ = ["MaxBatchCallback", "tune"]

# Steps of the schedule the probe steps through; the scheduler is dropped after the probe.
_PROBE_SCHEDULE_STEPS = 1000
#: Probes at most, each with the accumulation steps the plan of the one before needs.
_MAX_PROBES = 3


def probe_accumulation(trainer: Trainer, global_batch: int | None) -> int:
    """Micro-batches per optimizer step in the probe's step: the Trainer's, 2 for a global batch.

    Accumulating keeps the previous micro-batch's gradients (and, as the Trainer fetches a whole
    accumulation group before its first forward, the group's batches) alive through the next
    backward; the probe runs that state, so a plan of several micro-batches fits.

    Returns:
        The accumulation steps the probe runs.
    """
    return max(trainer.args.gradient_accumulation_steps, 1 if global_batch is None else 2)


def _copy(batch: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, batch)


def _train_step(trainer: Trainer, scheduler: Any, accumulate: int) -> Any:
    """One optimizer step as the Trainer's loop runs it: its accumulation, clipping, scheduler.

    The loop fetches the ``accumulate`` batches of a step first (they all stay on the device, and
    on the CPU so does the batch accelerate's loader has fetched ahead of them), then
    runs ``training_step`` (forward, its loss, backward) on each, clips (or measures) the gradient
    norm, steps the optimizer and the scheduler, and clears the gradients last.

    Returns:
        ``train_step(model, batch, optimizer)`` for :func:`~maxbatch.find_batch_size`.
    """
    args = trainer.args
    norm = args.max_grad_norm if args.max_grad_norm is not None and args.max_grad_norm > 0 else None

    def step(model: torch.nn.Module, batch: Any, optimizer: torch.optim.Optimizer | None) -> None:
        samples = [batch, *(_copy(batch) for _ in range(accumulate - 1))]
        # Accelerate's loader holds the batch after these, in host memory: the device's on the CPU.
        ahead = _copy(batch) if args.device.type == "cpu" else None
        items = trainer._get_num_items_in_batch(samples, args.device)
        trainer.current_gradient_accumulation_steps = accumulate
        for inputs in samples:
            # training_step: forward and loss under the Trainer's mixed precision, then backward.
            with trainer.accelerator.autocast():
                trainer.training_step(model, inputs, items)
        # Without clipping the loop still measures the norm, for its log.
        trainer.accelerator.clip_grad_norm_(model.parameters(), norm or float("inf"))
        if optimizer is not None:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        model.zero_grad()
        del ahead

    return step


def _probe_data(trainer: Trainer) -> Any:
    """The Trainer's data set (its unused columns removed) with its collator, for the worst case.

    A plain loader over them, not the Trainer's own, whose batches may be sharded over processes.

    Returns:
        A loader over the data set, or the first batch of an iterable one.
    """
    loader = trainer.get_train_dataloader()
    if isinstance(loader.dataset, IterableDataset):
        return probe_data(loader, trainer.args.device)  # no worst case: the first batch
    return DataLoader(loader.dataset, collate_fn=loader.collate_fn)


def _probe(
    trainer: Trainer, global_batch: int | None, options: dict[str, Any], accumulate: int
) -> BatchSizeResult:
    """Run the probe on the Trainer's step; leave its optimizer and scheduler as they were."""
    args, model = trainer.args, trainer.model
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"the Trainer has no model to probe (trainer.model is {model!r})")
    if args.n_gpu > 1:
        raise ConfigError(
            f"tune() probes one device per process, but this Trainer uses DataParallel over "
            f"{args.n_gpu} GPUs; launch with torchrun (one process per GPU) instead"
        )
    data = _probe_data(trainer)
    own_optimizer = trainer.optimizer is None
    if own_optimizer:
        trainer.create_optimizer()
        trainer.create_scheduler(num_training_steps=_PROBE_SCHEDULE_STEPS)
    scheduler = trainer.lr_scheduler
    # The scheduler and fp16's GradScaler step with the optimizer: restored after every trial.
    options = with_extra_state(options, scheduler, getattr(trainer.accelerator, "scaler", None))
    # training_step divides the loss by this; the training loop sets it per accumulation group.
    steps_before = getattr(trainer, "current_gradient_accumulation_steps", None)
    try:
        return find_batch_size(
            model,
            data,
            optimizer=trainer.optimizer,
            train_step=_train_step(trainer, scheduler, accumulate),
            device=args.device,
            global_batch=global_batch,  # over all ranks: find_batch_size splits it
            **options,
        )
    finally:
        if own_optimizer:
            trainer.optimizer, trainer.lr_scheduler = None, None
        if steps_before is not None:
            trainer.current_gradient_accumulation_steps = steps_before
        elif hasattr(trainer, "current_gradient_accumulation_steps"):
            del trainer.current_gradient_accumulation_steps


def _apply(trainer: Trainer, plan: Plan, *, accumulate: bool) -> None:
    args = trainer.args
    args.per_device_train_batch_size = plan.batch_size
    if accumulate:
        args.gradient_accumulation_steps = plan.accumulation_steps
    # The Trainer copies the batch size at construction; train() builds its loader from the copy.
    trainer._train_batch_size = args.train_batch_size


def tune(trainer: Trainer, global_batch: int | None = None, **options: Any) -> BatchSizeResult:
    """Probe the Trainer's training step and set its batch size (and accumulation) to train at.

    Args:
        trainer: a ``transformers.Trainer`` with a ``train_dataset``, before ``train()``.
        global_batch: samples per optimizer step across all processes to keep; sets
            ``args.gradient_accumulation_steps`` to reach it. None: the accumulation is left as
            it is.
        **options: keyword options of :func:`maxbatch.find_batch_size` (``memory=``,
            ``headroom=``, ``pick=``, ``max_batch_size=``, ``multiple_of=``, ``time_budget=``,
            ...); the model, data, optimizer, step and device come from the Trainer.

    Returns:
        The :class:`~maxbatch.results.BatchSizeResult`; ``args.per_device_train_batch_size`` is
        its pick when the pick's confidence is medium or high, else its ceiling (the log says
        which), or the micro-batch of the accumulation plan over that size with ``global_batch``.

    Raises:
        ConfigError: an option is invalid, or the Trainer runs DataParallel over several GPUs.
        DoesNotFitError: not even the smallest batch fits.
        WorkloadError: the training step failed for a reason other than memory.
    """
    check_global_batch(global_batch)
    opts = probe_options(options, "tune()")
    accumulate = probe_accumulation(trainer, global_batch)
    for _ in range(_MAX_PROBES):
        result = _probe(trainer, global_batch, opts, accumulate)
        plan = plan_of(result, global_batch)
        # The Trainer holds every batch of an accumulation group on the device: a plan of more
        # micro-batches than the probe ran is probed again with that many.
        if global_batch is None or plan.accumulation_steps <= accumulate:
            break
        accumulate = plan.accumulation_steps
    _apply(trainer, plan, accumulate=global_batch is not None)
    return with_steady_state(result, zero_grad="after_step", micro_batches=accumulate)


def _calling_trainer() -> Trainer | None:
    # The Trainer hands its callbacks no reference to itself, but on_init_end runs inside
    # Trainer.__init__, so the Trainer being built is the nearest ``self`` up the stack.
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class MaxBatchCallback(TrainerCallback):  # type: ignore[misc, unused-ignore]  # Any without it
    """:func:`tune` as a ``TrainerCallback``: pass it in ``Trainer(callbacks=[...])``.

    It tunes when the Trainer is built (``on_init_end``), so ``train()`` runs at the new size.
    Added later (``trainer.add_callback``) it is too late to change the batch size: it warns at
    ``on_train_begin`` and the Trainer trains at its own size; call :func:`tune` then.

    Args:
        global_batch: as for :func:`tune`.
        **options: as for :func:`tune`.

    Attributes:
        result: the :class:`~maxbatch.results.BatchSizeResult`, or None before the probe.
    """

    def __init__(self, *, global_batch: int | None = None, **options: Any) -> None:
        self.global_batch = check_global_batch(global_batch)
        self.options = probe_options(options, "MaxBatchCallback")
        self.result: BatchSizeResult | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Tune the Trainer being built."""
        trainer = _calling_trainer()
        if trainer is None or trainer.train_dataset is None:
            return  # no train data (an evaluation-only Trainer): nothing to tune
        self.result = tune(trainer, self.global_batch, **self.options)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Warn when training starts at a size this callback did not set."""
        if self.result is None:
            warnings.warn(
                "MaxBatchCallback did not tune this Trainer: it tunes when the Trainer is built, "
                "so pass it in Trainer(callbacks=[...]) or call "
                "maxbatch.integrations.transformers.tune(trainer) before train()",
                stacklevel=2,
            )
