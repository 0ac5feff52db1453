"""A host copy of everything a training step changes, and putting it back in place.

Parameters, gradients, buffers (batch-norm statistics move on every forward), training flags,
optimizer state and param groups, and the RNG states (torch, CUDA, Python, NumPy). Nothing is
copied on the device: a copy there would take the memory being measured.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from typing import Any

import numpy as np
import torch

from maxbatch.accounting import uncounted


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


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


@dataclasses.dataclass
class Snapshot:
    """The saved state of one model and its optimizer (see the module doc)."""

    params: list[tuple[torch.nn.Parameter, torch.Tensor]]
    grads: list[tuple[torch.nn.Parameter, torch.Tensor | None]]
    buffers: list[tuple[torch.Tensor, torch.Tensor]]
    training: list[tuple[torch.nn.Module, bool]]
    opt_state: dict[Any, dict[str, Any]]
    opt_groups: list[dict[str, Any]]
    rng: dict[str, Any]

    @classmethod
    def take(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Snapshot:
        """Copy the state of ``model`` and ``optimizer`` to host memory.

        The copies are host memory even on the CPU: a virtual device the probe runs in does not
        count them.
        """
        with uncounted():
            return cls._take(model, optimizer)

    @classmethod
    def _take(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Snapshot:
        params = [(p, _host_copy(p)) for p in model.parameters()]
        grads = [(p, None if p.grad is None else _host_copy(p.grad)) for p in model.parameters()]
        buffers = [(b, _host_copy(b)) for b in model.buffers()]
        training = [(m, m.training) for m in model.modules()]
        opt_state: dict[Any, dict[str, Any]] = {}
        groups: list[dict[str, Any]] = []
        if optimizer is not None:
            for key, state in optimizer.state.items():
                opt_state[key] = {
                    k: (v.device, _host_copy(v))
                    if isinstance(v, torch.Tensor)
                    else copy.deepcopy(v)
                    for k, v in state.items()
                }
            groups = [
                {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                for g in optimizer.param_groups
            ]
        return cls(params, grads, buffers, training, opt_state, groups, _rng_state())

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        final: bool = False,
    ) -> None:
        """Put the saved state back in place (in the same tensors where shapes allow).

        Gradients are dropped; with ``final=True`` the saved gradients and training flags come
        back too. The RNG states are restored every time.
        """
        with torch.no_grad():
            for p, saved in self.params:
                p.copy_(saved)
            for b, saved in self.buffers:
                b.copy_(saved)
            for p, saved_grad in self.grads:
                p.grad = None
                if final and saved_grad is not None:
                    p.grad = saved_grad.to(p.device)
        if optimizer is not None:
            self._restore_optimizer(optimizer)
        if final:
            for module, flag in self.training:
                module.training = flag
        _set_rng_state(self.rng)

    def _restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        state = optimizer.state
        for key in [k for k in state if k not in self.opt_state]:
            del state[key]
        with torch.no_grad():
            for key, saved in self.opt_state.items():
                current = state[key]
                for k in [k for k in current if k not in saved]:
                    del current[k]
                for k, v in saved.items():
                    if not isinstance(v, tuple):
                        current[k] = copy.deepcopy(v)
                        continue
                    dev, host = v
                    cur = current.get(k)
                    if (
                        isinstance(cur, torch.Tensor)
                        and cur.shape == host.shape
                        and (cur.dtype == host.dtype and cur.device == dev)
                    ):
                        cur.copy_(host)
                    else:
                        current[k] = host.to(dev, copy=True)
        for group, saved_group in zip(optimizer.param_groups, self.opt_groups, strict=True):
            group.update(copy.deepcopy(saved_group))
