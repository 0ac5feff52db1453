"""The user's model, optimizer and sample copied onto fake tensors, the real ones untouched.

A fake tensor (``FakeTensorMode``) has a shape, strides, a dtype and a meta storage that knows its
size in bytes, but no data: so a copy of a model of any size costs nothing, and a model built
under ``torch.device("meta")`` copies too. Every function here runs under the fake mode.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any

import torch

from maxbatch.errors import ConfigError, EstimateError

CPU = torch.device("cpu")


def fake_like(t: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor with the shape, strides, dtype and grad flag of ``t`` (under the mode)."""
    fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=CPU)
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(fake, requires_grad=t.requires_grad)
    return fake.requires_grad_(t.requires_grad) if t.is_leaf else fake


def fake_model(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[int, Any]]:
    """A copy of ``model`` whose tensors are fake, and the memo from real tensor ids to fakes.

    Returns:
        The fake copy and the memo.

    Raises:
        EstimateError: the model cannot be deep-copied (it holds a lock, a file, a process...).
    """
    memo: dict[int, Any] = {}
    tensors = itertools.chain(
        model.parameters(),
        model.buffers(),
        (v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)),
    )
    for t in tensors:
        if id(t) not in memo:
            memo[id(t)] = fake_like(t)
    try:
        # deepcopy takes every tensor in the memo as already copied: no real tensor is cloned.
        return copy.deepcopy(model, memo), memo
    except Exception as e:
        reason = f"the model cannot be deep-copied onto fake tensors ({type(e).__name__}: {e})"
        raise EstimateError(
            f"{reason}; use `maxbatch probe` to measure it on a real device", reason=reason
        ) from e


def fake_optimizer(optimizer: torch.optim.Optimizer, memo: dict[int, Any]) -> torch.optim.Optimizer:
    """The same optimizer class and hyperparameters over the fake parameters in ``memo``.

    Returns:
        The optimizer over the fake parameters (its state is not copied).

    Raises:
        ConfigError: the optimizer holds tensors that are not the model's parameters, or its
            class cannot be rebuilt from its param groups.
    """
    try:
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [memo[id(p)] for p in g["params"]],
            }
            for g in optimizer.param_groups
        ]
    except KeyError:
        raise ConfigError(
            "the optimizer holds tensors that are not the model's parameters; pass a factory "
            "such as optimizer=lambda params: torch.optim.AdamW(params)"
        ) from None
    cls: Any = type(optimizer)
    # Group values override the defaults; some classes need their defaults passed again.
    for kwargs in ({}, optimizer.defaults):
        with contextlib.suppress(TypeError):
            rebuilt: torch.optim.Optimizer = cls(groups, **kwargs)
            return rebuilt
    raise ConfigError(
        f"{cls.__name__} cannot be rebuilt over fake parameters from its param groups; pass a "
        "factory such as optimizer=lambda params: MyOptimizer(params, lr=...)"
    )


def like_cuda(optimizer: torch.optim.Optimizer) -> None:
    """Use the foreach implementation where torch's default on CUDA parameters would."""
    for g in optimizer.param_groups:
        tensor_lr = isinstance(g.get("lr"), torch.Tensor) and not g.get("capturable")
        chosen = g.get("fused") or g.get("differentiable") or tensor_lr
        if "foreach" in g and g["foreach"] is None and not chosen:
            g["foreach"] = True
