"""One step at batch size ``b`` on the user's model (its state is saved by ``snapshot``).

A :class:`Workload` is the runtime form of a :class:`~maxbatch.step.spec.StepSpec` on one device
(:func:`build_workload`), used as a context manager::

    with build_workload(step, device) as workload:  # saved, then prepared (train/eval)
        ...  # trials
    # restored: parameters, buffers, gradients, optimizer state, flags, RNG
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import torch

from maxbatch.devices.device import local_shard
from maxbatch.errors import ConfigError
from maxbatch.settings import Mode, Precision
from maxbatch.step.extrastate import ExtraState
from maxbatch.step.forward import StepHooks, autocast, to_device
from maxbatch.step.loop import Loop
from maxbatch.step.loop import train_step as loop_step
from maxbatch.step.snapshot import Snapshot
from maxbatch.step.spec import ForwardFn, LossFn, StepSpec, TrainStepFn


class Workload:
    """The user's model, batch maker, loss and optimizer, run as one step on one device.

    ``with workload:`` saves its state, prepares the model and restores everything at the end.

    Args:
        model: the model, already on ``device``.
        make_batch: returns a batch of size ``b`` (moved to ``device`` by the workload).
        device: where the step runs.
        mode: training step or inference.
        precision: autocast precision (FP32: none).
        optimizer: the optimizer stepped in train mode, or None for no optimizer step.
        forward_fn: ``forward(model, batch)``; default ``model(batch)`` (``StepHooks.build``).
        loss_fn: ``loss(output, batch)``; default the output's loss (``StepHooks.build``).
        train_step: the user's whole step ``train_step(model, batch, optimizer)``, replacing ours.
        extra_state: more state the step changes, restored after every trial.
        loop: where the loop clears gradients and how many micro-batches it accumulates.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        make_batch: Callable[[int], Any],
        device: torch.device,
        *,
        mode: Mode = Mode.TRAIN,
        precision: Precision = Precision.FP32,
        optimizer: torch.optim.Optimizer | None = None,
        forward_fn: ForwardFn | None = None,
        loss_fn: LossFn | None = None,
        train_step: TrainStepFn | None = None,
        extra_state: ExtraState | None = None,
        loop: Loop | None = None,
    ):
        self.model = model
        self.make_batch = make_batch
        self.device = device
        self.mode = mode
        self.optimizer = optimizer
        #: the forward, the loss and the precision every forward of the step runs with
        self.hooks = StepHooks.build(forward_fn=forward_fn, loss_fn=loss_fn, precision=precision)
        self.train_step = train_step
        self.extra_state = extra_state or ExtraState(items=())
        self.loop = loop or Loop()
        #: what was alive when the forward of the last step :meth:`run` ran began
        self.alive_at_start: tuple[str, ...] = ()
        self._recording = False
        self._snapshot: Snapshot | None = None

    # -- the step -------------------------------------------------------------------------------

    def step(self, batch: Any) -> None:
        """Run one step (one optimizer step of the loop) on a batch already on the device."""
        if self.mode is Mode.INFERENCE:
            with torch.inference_mode(), autocast(self.hooks.precision, self.device):
                self.hooks.forward_fn(self.model, batch)
            return
        if self.train_step is not None:
            self.train_step(self.model, batch, self.optimizer)
            return
        loop_step(self.loop, self.model, self.optimizer, batch, self._micro_step)

    def _micro_step(
        self, batch: Any, weight: float, before_backward: Callable[[], None] | None
    ) -> tuple[Any, torch.Tensor]:
        if self._recording:  # the measured step's forward begins: what the loop kept alive
            self.alive_at_start, self._recording = self.alive(), False
        return self.hooks.forward_backward(
            self.model, batch, device=self.device, weight=weight, before_backward=before_backward
        )

    def run(
        self,
        batch_size: int,
        repeats: int,
        *,
        on_batch: Callable[[Any], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        """Build a batch of ``batch_size`` on the device and run ``repeats`` steps on it.

        ``on_batch(batch)`` is called once the batch is on the device, before the first step;
        ``after_step(i)`` after step ``i`` (from 1). What was alive when the last step's
        forward began (its step, for a user's ``train_step``) is kept in :attr:`alive_at_start`.
        """
        batch = to_device(self.make_batch(batch_size), self.device)
        if on_batch is not None:
            on_batch(batch)
        for i in range(1, repeats + 1):
            if i == repeats:
                self.alive_at_start = self.alive()
                self._recording = True
            self.step(batch)
            self._recording = False
            if after_step is not None:
                after_step(i)

    def alive(self) -> tuple[str, ...]:
        """What the loop's state holds now, in words (parameters, gradients, optimizer state)."""
        held = ["parameters"]
        if any(True for _ in self.model.buffers()):
            held.append("buffers")
        if any(p.grad is not None for p in self.model.parameters()):
            held.append("gradients")
        if self.optimizer is not None and any(self.optimizer.state.values()):
            held.append("optimizer state")
        if self.extra_state.items:
            held.append("extra state")
        return tuple(held)

    # -- state ----------------------------------------------------------------------------------

    def state_tensors(self, *, grads: bool = True) -> Iterator[torch.Tensor]:
        """Every tensor the model and optimizer hold between steps.

        Of a ``DTensor`` (FSDP's sharded parameters, gradients and optimizer state) it is the
        shard this process holds: that is what takes its device's memory.

        Yields:
            Each tensor (of a DTensor, its local shard).
        """
        for t in self._state_tensors(grads):
            yield local_shard(t)

    def _state_tensors(self, grads: bool) -> Iterator[torch.Tensor]:
        for p in self.model.parameters():
            yield p
            if grads and p.grad is not None:
                yield p.grad
        yield from self.model.buffers()
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        yield v
        if self._snapshot is not None:  # parameters held only by the optimizer, extra state
            yield from self._snapshot.tensors()

    def state_bytes(self) -> int:
        """Bytes of parameters, buffers and optimizer state on the device (gradients excluded)."""
        seen: dict[int, int] = {}
        for t in self.state_tensors(grads=False):
            if t.device == self.device or (t.device.type == self.device.type == "cpu"):
                storage = t.untyped_storage()
                seen[storage._cdata] = storage.nbytes()
        return sum(seen.values())

    def save(self) -> None:
        """Copy everything a step changes to host memory (no copy is made on the device).

        The gradients' bytes are freed until the final :meth:`reset`, as a step's
        ``zero_grad(set_to_none=True)`` frees them.
        """
        self._snapshot = Snapshot.take(self.model, self.optimizer, self.extra_state)

    def reset(self, *, final: bool = False) -> None:
        """Put parameters, buffers, optimizer state, extra state and RNG states back as saved.

        Between trials gradients are dropped (every step starts with ``zero_grad``); with
        ``final=True`` gradients (the same objects) and training flags are restored too.

        Raises:
            RuntimeError: called before :meth:`save`.
        """
        if self._snapshot is None:
            raise RuntimeError("Workload.reset() called before save()")
        self._snapshot.restore(final=final)

    def prepare(self) -> None:
        """Set the model's mode for the step (``train()`` or ``eval()``)."""
        self.model.train(self.mode is Mode.TRAIN)

    def __enter__(self) -> Workload:
        self.save()
        try:
            self.prepare()
        except BaseException:
            self.reset(final=True)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.reset(final=True)


def make_optimizer(
    name_or_factory: str | Callable[..., torch.optim.Optimizer] | None,
    model: torch.nn.Module,
) -> torch.optim.Optimizer | None:
    """Build the step's optimizer: ``adamw``, ``adam``, ``sgd``, ``none``, or from a factory."""
    params = [p for p in model.parameters() if p.requires_grad]
    if callable(name_or_factory):
        opt = name_or_factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(
                f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        return opt
    name = "adamw" if name_or_factory is None else str(name_or_factory).lower()
    if name == "none":
        return None
    if not params:
        raise ConfigError("the model has no trainable parameters; use optimizer='none'")
    if name == "adamw":
        return torch.optim.AdamW(params)
    if name == "adam":
        return torch.optim.Adam(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    raise ConfigError(
        f"optimizer={name_or_factory!r} is not valid; choose adamw, adam, sgd or none"
    )


def build_workload(
    step: StepSpec,
    device: torch.device,
    *,
    adopt: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
) -> Workload:
    """The workload of ``step`` on ``device``, with the step's optimizer chosen once.

    In inference mode there is no optimizer. In training, an optimizer instance is used as it is
    (or passed through ``adopt``: the estimate rebuilds it over fake parameters), and anything
    else goes to :func:`make_optimizer` over the model (None: AdamW).

    Returns:
        The workload (not yet saved: use it in a ``with`` block).

    Raises:
        ConfigError: the optimizer cannot be made.
    """
    opt: torch.optim.Optimizer | None = None
    if step.mode is Mode.TRAIN:
        if isinstance(step.optimizer, torch.optim.Optimizer):
            opt = step.optimizer if adopt is None else adopt(step.optimizer)
        else:
            opt = make_optimizer(step.optimizer, step.model)
    return Workload(
        step.model,
        step.make_batch,
        device,
        mode=step.mode,
        precision=step.precision,
        optimizer=opt,
        forward_fn=step.forward_fn,
        loss_fn=step.loss_fn,
        train_step=step.train_step,
        extra_state=step.extra_state,
        loop=step.loop,
    )
