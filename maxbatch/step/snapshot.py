"""A host copy of everything a training step changes, and putting it back in place.

Saved and restored: the values of parameters (the model's and any held only by an optimizer),
gradients, buffers (batch-norm statistics move on every forward), training flags, optimizer state,
param groups (a tensor ``lr`` too) and plain attributes (such as ``_opt_called``, which an LR
scheduler adds), the RNG states (torch, CUDA, Python, NumPy), and the ``extra_state`` items
(:mod:`maxbatch.step.extrastate`). Tensors come back *in place*: the same objects with their saved
values, so references that users hold stay valid. Nothing is copied on the device: a copy there
would take the memory being measured. Ctrl-C and SIGTERM wait until a save or a restore is
done (:func:`~maxbatch.step.interrupt.signals_held`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from maxbatch.devices.accounting import uncounted
from maxbatch.step.extrastate import ExtraSave, ExtraState, TensorSave, host_copy, set_values
from maxbatch.step.interrupt import signals_held


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Run a block and put the RNG states (torch, CUDA, Python, NumPy) back as they were."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradSave:
    """A parameter's gradient: the tensor object the user had, and its values on the host.

    While trials run the parameter has no gradient and the object holds no storage (the bytes
    are free, as after ``zero_grad(set_to_none=True)``); :meth:`restore` gives the object back
    its values and puts it back on the parameter. A sparse gradient cannot be emptied in place:
    it comes back as a new tensor with the saved values.
    """

    param: torch.Tensor
    grad: torch.Tensor | None
    host: torch.Tensor | None

    @classmethod
    def take(cls, param: torch.Tensor) -> GradSave:
        """Copy ``param.grad`` to the host, free its storage and leave the parameter without one."""
        grad = param.grad
        host = None if grad is None else host_copy(grad)
        param.grad = None
        if grad is not None and grad.layout is torch.strided:
            set_values(grad, torch.empty(0, dtype=grad.dtype, device=grad.device))
        return cls(param=param, grad=grad, host=host)

    def restore(self) -> None:
        """Put the saved gradient back on the parameter (the same object where possible)."""
        if self.grad is None or self.host is None:
            self.param.grad = None
            return
        values = self.host.to(self.grad.device, copy=True)
        if self.grad.layout is torch.strided:
            set_values(self.grad, values)
            values = self.grad
        self.param.grad = values


_PLAIN = (bool, int, float, str, type(None))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSave:
    """An optimizer's state, param groups and plain attributes, restored in place."""

    optimizer: torch.optim.Optimizer
    state: dict[Any, dict[str, Any]]
    groups: list[dict[str, Any]]
    attributes: dict[str, Any]

    @classmethod
    def take(cls, optimizer: torch.optim.Optimizer) -> OptimizerSave:
        """Copy the state tensors to the host; keep the group tensors' objects and values."""
        state = {
            key: {k: _save(v) for k, v in entry.items()} for key, entry in optimizer.state.items()
        }
        groups = [
            {k: _save(v) for k, v in group.items() if k != "params"}
            for group in optimizer.param_groups
        ]
        # Plain values only (flags such as an LR scheduler's ``_opt_called``): other attributes
        # hold hooks and bound methods that are not state.
        attributes = {k: v for k, v in vars(optimizer).items() if isinstance(v, _PLAIN)}
        return cls(optimizer=optimizer, state=state, groups=groups, attributes=attributes)

    def restore(self) -> None:
        """Put state, groups and attributes back; drop what the steps added."""
        state = self.optimizer.state
        for key in [k for k in state if k not in self.state]:
            del state[key]
        for key, saved in self.state.items():
            current = state[key]
            for k in [k for k in current if k not in saved]:
                del current[k]
            for k, v in saved.items():
                current[k] = _restored(v)
        groups = self.optimizer.param_groups
        del groups[len(self.groups) :]
        for group, saved in zip(groups, self.groups, strict=True):
            for k in [k for k in group if k != "params" and k not in saved]:
                del group[k]
            for k, v in saved.items():
                group[k] = _restored(v)
        names = vars(self.optimizer)
        for k in [k for k, v in names.items() if isinstance(v, _PLAIN)]:
            if k not in self.attributes:
                delattr(self.optimizer, k)
        for k, v in self.attributes.items():
            setattr(self.optimizer, k, v)


def _save(value: Any) -> Any:
    return TensorSave.take(value) if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _restored(saved: Any) -> Any:
    """The value to put back: the saved tensor object with its values, or a copy of the value."""
    if isinstance(saved, TensorSave):
        return saved.restore()
    return copy.deepcopy(saved)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Snapshot:
    """The saved state of one model, its optimizer and the extra state (see the module doc)."""

    params: list[TensorSave]
    grads: list[GradSave]
    buffers: list[TensorSave]
    training: list[tuple[torch.nn.Module, bool]]
    optimizers: list[OptimizerSave]
    extra: ExtraSave
    rng: dict[str, Any]

    @classmethod
    def take(
        cls,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: ExtraState | None = None,
    ) -> Snapshot:
        """Copy the state to host memory and free the gradients (trials start without them).

        The copies are host memory even on the CPU: a virtual device the probe runs in does not
        count them.

        Returns:
            The snapshot.
        """
        with uncounted(), signals_held() as interrupted:
            saved = extra if extra is not None else ExtraState(items=())
            snapshot = cls._take(model, optimizer, saved)
            if interrupted:  # Ctrl-C during the save: undo it (the gradients) before it arrives
                snapshot.restore(final=True)
        return snapshot

    @classmethod
    def of_buffers(cls, model: torch.nn.Module) -> Snapshot:
        """Only the buffers and the RNG states: what a step that is redone must put back.

        ``MicroBatcher`` redoes a step after an out-of-memory error: its gradients are thrown
        away and its parameters not yet stepped, but batch-norm statistics moved and the RNGs
        (torch, CUDA, Python, NumPy) advanced. :meth:`restore` puts those back.

        Returns:
            The snapshot (its other parts empty).
        """
        with uncounted(), signals_held():
            return cls(
                params=[],
                grads=[],
                buffers=[TensorSave.take(b) for b in _unique(model.buffers())],
                training=[],
                optimizers=[],
                extra=ExtraState(items=()).take(),
                rng=_rng_state(),
            )

    @classmethod
    def _take(
        cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, extra: ExtraState
    ) -> Snapshot:
        modules = [model, *extra.modules]
        optimizers = ([] if optimizer is None else [optimizer]) + list(extra.optimizers)
        params = _unique(
            [
                *(p for m in modules for p in m.parameters()),
                *(p for o in optimizers for g in o.param_groups for p in g["params"]),
            ]
        )
        buffers = _unique(b for m in modules for b in m.buffers())
        return cls(
            params=[TensorSave.take(p) for p in params],
            grads=[GradSave.take(p) for p in params],
            buffers=[TensorSave.take(b) for b in buffers],
            training=[(sub, sub.training) for m in modules for sub in m.modules()],
            optimizers=[OptimizerSave.take(o) for o in optimizers],
            extra=extra.take(),
            rng=_rng_state(),
        )

    def tensors(self) -> Iterator[torch.Tensor]:
        """The saved parameters and buffers, and the extra state's tensors (live state)."""
        yield from (s.tensor for s in self.params)
        yield from (s.tensor for s in self.buffers)
        yield from self.extra.tensors()

    def restore(self, *, final: bool = False) -> None:
        """Put the saved state back in place.

        Gradients are dropped; with ``final=True`` the saved gradients (the same objects) and
        training flags come back too. Everything else is restored every time. SIGINT and
        SIGTERM are held until it is done (:func:`~maxbatch.step.interrupt.signals_held`).
        """
        with signals_held():
            self._restore(final)

    def _restore(self, final: bool) -> None:
        for saved in [*self.params, *self.buffers]:
            saved.restore()
        for grad in self.grads:
            if final:
                grad.restore()
            else:
                grad.param.grad = None
        for opt in self.optimizers:
            opt.restore()
        self.extra.restore()
        if final:
            for module, flag in self.training:
                module.training = flag
        _set_rng_state(self.rng)
