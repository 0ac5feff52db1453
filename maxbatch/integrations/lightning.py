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

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from maxbatch import BatchSizeResult, ConfigError, WorkloadError, find_batch_size
from maxbatch.integrations._common import (
    Plan,
    check_global_batch,
    plan_of,
    probe_data,
    probe_options,
    with_extra_state,
)

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import (  # type: ignore[assignment, no-redef]
            Callback,
            LightningModule,
            Trainer,
        )
        from pytorch_lightning.utilities.parsing import (  # type: ignore[assignment, no-redef]
            lightning_hasattr,
            lightning_setattr,
        )
    except ImportError as e:
        raise ImportError(
            "maxbatch.integrations.lightning needs Lightning: pip install 'maxbatch[lightning]' "
            "(or pip install lightning)"
        ) from e

__all__ = ["MaxBatch"]


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss a ``training_step`` returned: a tensor, a dict's ``"loss"``, or None (skip)."""
    if output is None or isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else None
    if isinstance(loss, torch.Tensor):
        return loss
    raise WorkloadError(
        "training_step must return a loss tensor, a dict with a 'loss' tensor, or None; "
        f"got {type(output).__name__}"
    )


def _train_step(trainer: Trainer, pl_module: LightningModule) -> Any:
    """The step Lightning runs per batch: transfer hooks, ``training_step``, backward, step."""
    strategy = trainer.strategy

    def training_step(batch: Any) -> Any:
        # Named as Lightning's loop names it, so that ``self.log`` in the step is allowed.
        before, pl_module._current_fx_name = pl_module._current_fx_name, "training_step"
        try:
            return strategy.training_step(batch, 0)
        finally:
            pl_module._current_fx_name = before

    def step(model: torch.nn.Module, batch: Any, optimizer: torch.optim.Optimizer | None) -> None:
        batch = strategy.batch_to_device(batch)  # runs the module's batch-transfer hooks
        if not pl_module.automatic_optimization:
            training_step(batch)  # the module's own backward and optimizer steps
            return
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss = _loss_of(training_step(batch))
        if loss is None:  # Lightning skips the backward and the step for this batch
            return
        strategy.backward(loss, optimizer)
        if optimizer is not None:
            optimizer.step()

    return step


class MaxBatch(Callback):  # type: ignore[misc]
    """Set the batch size (and gradient accumulation) that maxbatch finds, at fit start.

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
        optimizers = list(trainer.optimizers)
        # More optimizers (manual optimization) and a 16-bit GradScaler: restored after each trial.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        options = with_extra_state(self.options, *optimizers[1:], scaler)
        device = trainer.strategy.root_device
        loader = trainer.fit_loop._data_source.dataloader()
        if not isinstance(loader, DataLoader):
            raise ConfigError(
                f"MaxBatch probes one train DataLoader; train_dataloader() returned a "
                f"{type(loader).__name__} (several loaders, or a CombinedLoader)"
            )
        data = probe_data(loader, device)
        # The strategy's model: the module itself, or its DDP wrapper, whose gradient buckets are
        # real memory and whose collectives find_batch_size keeps out of the trials.
        result = find_batch_size(
            trainer.strategy.model or pl_module,
            data,
            optimizer=optimizers[0] if optimizers else "none",
            train_step=_train_step(trainer, pl_module),
            device=device,
            global_batch=self.global_batch,  # over all ranks: find_batch_size splits it
            **options,
        )
        # What the probe's steps logged is not training: the first epoch starts with nothing.
        trainer._logger_connector.reset_results()
        trainer._logger_connector.reset_metrics()
        plan = plan_of(result)
        lightning_setattr(pl_module, self.batch_arg_name, plan.batch_size)
        if self.global_batch is not None:
            trainer.accumulate_grad_batches = plan.accumulation_steps
        # As Lightning's own finder does: the loops load their dataloaders again, at the new size.
        trainer.fit_loop._combined_loader = None
        trainer.fit_loop.epoch_loop.val_loop._combined_loader = None
        self.result, self.plan = result, plan
