"""``MaxBatch``: a Lightning callback that sets the batch size maxbatch finds, at fit start.

Add it to the trainer and fit as usual::

    trainer = Trainer(callbacks=[MaxBatch(global_batch=256)])
    trainer.fit(module, datamodule)

At fit start (the model is on its device, ``configure_optimizers`` has run) it probes the
LightningModule's own ``training_step`` with the trainer's optimizer and precision on the trainer's
device, with the worst case of the train dataloader (batches of its largest items, collated by the
loader; the first batch of an iterable data set). Then it sets the batch size where Lightning's own
batch-size finder sets it (the ``batch_size`` attribute of the module or datamodule, or their
``hparams``), makes the trainer load the dataloaders again, and, given ``global_batch``, sets
``trainer.accumulate_grad_batches`` so that each optimizer step still sees ``global_batch`` samples.
maxbatch restores the module's parameters, buffers, gradients and optimizer state afterwards.

Works with ``lightning`` (``lightning.pytorch``) or, when that is not installed, the standalone
``pytorch_lightning`` package.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch.utils.data import DataLoader

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
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import (  # type: ignore[assignment, no-redef, unused-ignore]
            Callback,
            LightningModule,
            Trainer,
        )
        from pytorch_lightning.utilities.parsing import (  # type: ignore[assignment, no-redef, unused-ignore]
            lightning_hasattr,
            lightning_setattr,
        )
    except ImportError as e:
        raise ImportError(
            "maxbatch.integrations.lightning needs Lightning: pip install 'maxbatch[lightning]' "
            "(or pip install lightning)"
        ) from e

__all__ = ["MaxBatch"]


def _to_device(trainer: Trainer, batch: Any) -> Any:
    """The batch as Lightning's epoch loop hands it on: precision, transfer hooks, device."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def probe_accumulation(trainer: Trainer, global_batch: int | None) -> int:
    """Micro-batches per optimizer step in the probe's step: the trainer's, 2 for a global batch.

    Accumulating keeps the previous micro-batch's gradients alive through the next backward; two
    micro-batches reach that state, so a plan of any number of them fits.

    Returns:
        The accumulation steps the probe runs.
    """
    return max(trainer.accumulate_grad_batches, 1 if global_batch is None else 2)


def _train_step(trainer: Trainer, accumulate: int) -> Any:
    """One optimizer step as Lightning's own loop runs it, through the loop's own objects.

    Automatic optimization goes through the epoch loop's ``automatic_optimization.run``:
    ``training_step``, then ``zero_grad`` (so the previous step's gradients live through the
    forward), backward through the precision plugin, the ``optimizer_step`` hook with gradient
    clipping, ``accumulate`` micro-batches per optimizer step as ``accumulate_grad_batches``
    has them. Manual optimization runs the module's own ``training_step`` through
    ``manual_optimization.run``. The loop's progress counters are restored after every trial
    (they are in the probe's ``extra_state``).

    Returns:
        ``train_step(model, batch, optimizer)`` for :func:`~maxbatch.find_batch_size`.
    """
    loop = trainer.fit_loop.epoch_loop

    def step(model: torch.nn.Module, batch: Any, optimizer: torch.optim.Optimizer | None) -> None:
        batch = _to_device(trainer, batch)
        for i in range(accumulate if trainer.lightning_module.automatic_optimization else 1):
            loop.batch_progress.increment_ready()
            loop.batch_progress.increment_started()
            kwargs = loop._build_kwargs(OrderedDict(), batch, i)
            if trainer.lightning_module.automatic_optimization:
                loop.automatic_optimization.run(trainer.optimizers[0], i, kwargs)
            else:
                loop.manual_optimization.run(kwargs)
            loop.batch_progress.increment_processed()
            loop.batch_progress.increment_completed()

    return step


def loop_state(trainer: Trainer) -> list[Any]:
    """The loop's counters that a probe step moves (batches, optimizer steps): restored after.

    Returns:
        Objects with ``state_dict()`` and ``load_state_dict()``.
    """
    loop = trainer.fit_loop.epoch_loop
    return [
        loop.batch_progress,
        loop.automatic_optimization.optim_progress,
        loop.manual_optimization.optim_step_progress,
    ]


class MaxBatch(Callback):  # type: ignore[misc, unused-ignore]
    """Set the batch size (and gradient accumulation) that maxbatch finds, at fit start.

    The size set is the pick when its confidence is medium or high, else the ceiling (the log
    says which and why); with ``global_batch``, the micro-batch of the plan over that size.

    Args:
        global_batch: samples per optimizer step across all devices to keep, reached with
            ``accumulate_grad_batches``; None: no accumulation is set.
        batch_arg_name: the attribute that holds the batch size (on the module, the datamodule
            or their ``hparams``), as for Lightning's ``BatchSizeFinder``.
        **options: keyword options of :func:`maxbatch.find_batch_size` (``memory=``,
            ``headroom=``, ``pick=``, ``max_batch_size=``, ``multiple_of=``, ``time_budget=``,
            ...); the model, data, optimizer, step and device come from the trainer.

    Attributes:
        result: the :class:`~maxbatch.results.BatchSizeResult` of the last probe, or None.
        plan: the batch size and accumulation steps set, or None before the probe.

    Raises:
        ConfigError: an option is invalid (at construction), or, at fit start, the batch size is
            not an attribute Lightning can set, the dataloaders were passed to ``fit`` directly
            (so their batch size cannot change), or there are several train dataloaders.
    """

    def __init__(
        self,
        *,
        global_batch: int | None = None,
        batch_arg_name: str = "batch_size",
        **options: Any,
    ) -> None:
        super().__init__()
        self.global_batch = check_global_batch(global_batch)
        self.batch_arg_name = batch_arg_name
        self.options = probe_options(options, "MaxBatch")
        self.result: BatchSizeResult | None = None
        self.plan: Plan | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check, before anything runs, that the batch size can be set for this fit."""
        if stage != "fit":
            return
        if not trainer.fit_loop._data_source.is_module():
            raise ConfigError(
                "MaxBatch cannot change the batch size of dataloaders passed to fit() directly; "
                "build them in the LightningModule's or the LightningDataModule's "
                f"train_dataloader() from its {self.batch_arg_name!r} attribute"
            )
        if not lightning_hasattr(pl_module, self.batch_arg_name):
            raise ConfigError(
                f"MaxBatch found no {self.batch_arg_name!r} on the module, the datamodule or "
                "their hparams; add one and build the train dataloader with it, or set "
                "batch_arg_name"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Probe the module's step, set the batch size and accumulation, reload the loaders."""
        result = self._probe(trainer, pl_module)
        # What the probe's steps logged is not training: the first epoch starts with nothing.
        trainer._logger_connector.reset_results()
        trainer._logger_connector.reset_metrics()
        plan = plan_of(result, self.global_batch)
        lightning_setattr(pl_module, self.batch_arg_name, plan.batch_size)
        if self.global_batch is not None:
            trainer.accumulate_grad_batches = plan.accumulation_steps
        # As Lightning's own finder does: the loops load their dataloaders again, at the new size.
        trainer.fit_loop._combined_loader = None
        trainer.fit_loop.epoch_loop.val_loop._combined_loader = None
        self.result, self.plan = result, plan

    def _probe(self, trainer: Trainer, pl_module: LightningModule) -> BatchSizeResult:
        optimizers = list(trainer.optimizers)
        # More optimizers (manual optimization), a 16-bit GradScaler and the loop's counters:
        # restored after each trial.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        options = with_extra_state(self.options, *optimizers[1:], scaler, *loop_state(trainer))
        device = trainer.strategy.root_device
        loader = trainer.fit_loop._data_source.dataloader()
        if not isinstance(loader, DataLoader):
            raise ConfigError(
                f"MaxBatch probes one train DataLoader; train_dataloader() returned a "
                f"{type(loader).__name__} (several loaders, or a CombinedLoader)"
            )
        data = probe_data(loader, device)
        accumulate, before = (
            probe_accumulation(trainer, self.global_batch),
            trainer.accumulate_grad_batches,
        )
        trainer.accumulate_grad_batches = accumulate  # read by Lightning's own step
        try:
            # The strategy's model: the module itself, or its DDP wrapper, whose gradient buckets
            # are real memory and whose collectives find_batch_size keeps out of the trials.
            result = find_batch_size(
                trainer.strategy.model or pl_module,
                data,
                optimizer=optimizers[0] if optimizers else "none",
                train_step=_train_step(trainer, accumulate),
                device=device,
                global_batch=self.global_batch,  # over all ranks: find_batch_size splits it
                **options,
            )
        finally:
            trainer.accumulate_grad_batches = before
        manual = not pl_module.automatic_optimization
        return with_steady_state(
            result,
            zero_grad=None if manual else "before_backward",
            micro_batches=1 if manual else accumulate,
        )
