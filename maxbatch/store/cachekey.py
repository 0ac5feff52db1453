"""The result cache's key: a hash of everything that changes the answer.

:func:`describe` turns the model's structure, a batch's shapes, the optimizer, the user's step
functions (their code) and the settings (derived from the request's fields by
:func:`maxbatch.run.request.cache_settings`) into plain JSON-ready data; :func:`key_of` hashes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from maxbatch._version import __version__

#: Bump when the entry format or the meaning of a key changes: old entries are then ignored.
FORMAT = 2

#: Optimizer settings that never change memory (only values of the update).
_VALUE_ONLY = {"params", "lr", "initial_lr", "betas", "eps", "weight_decay", "dampening"}


def _code(fn: Any) -> str | None:
    """A user function's identity: its qualified name and a hash of its code."""
    if fn is None:
        return None
    name = getattr(fn, "__qualname__", type(fn).__name__)
    code = getattr(fn, "__code__", None)
    if code is None:
        return str(name)
    digest = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
    return f"{name}:{digest}"


def _tensors(obj: Any) -> list[Any]:
    leaves = tree_flatten(obj)[0]
    return [
        [list(t.shape), str(t.dtype)] if isinstance(t, torch.Tensor) else type(t).__name__
        for t in leaves
    ]


def _optimizer(opt: torch.optim.Optimizer | None) -> Any:
    if opt is None:
        return None
    groups = []
    for group in opt.param_groups:
        kept = {k: v for k, v in group.items() if k not in _VALUE_ONLY}
        if "momentum" in kept:
            kept["momentum"] = bool(kept["momentum"])  # a momentum buffer exists or not
        groups.append({"params": len(group["params"]), **{k: repr(v) for k, v in kept.items()}})
    return {"type": f"{type(opt).__module__}.{type(opt).__qualname__}", "groups": groups}


def describe(
    model: torch.nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer | None,
    functions: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything that keys a result, as plain JSON-ready data.

    Args:
        model: the model probed.
        batch: a batch from the user's data (its shapes and dtypes count, not its values).
        optimizer: the step's optimizer.
        functions: the user's step functions by role (``forward_fn``, ``train_step``...).
        settings: the rest: mode, precision, device, capacity, headroom, search settings.

    Returns:
        The description: modules, parameters, batch, optimizer, step code and settings.
    """
    return {
        "format": FORMAT,
        "modules": [[name, type(m).__qualname__] for name, m in model.named_modules()],
        "parameters": [
            [name, list(p.shape), str(p.dtype), p.requires_grad]
            for name, p in model.named_parameters()
        ],
        "buffers": [[name, list(b.shape), str(b.dtype)] for name, b in model.named_buffers()],
        "batch": _tensors(batch),
        "optimizer": _optimizer(optimizer),
        "functions": {k: _code(v) for k, v in sorted(functions.items())},
        "settings": dict(sorted(settings.items())),
        "torch": torch.__version__,
        "maxbatch": __version__,
    }


def key_of(description: Mapping[str, Any]) -> str:
    """The cache key: a hash of the description."""
    text = json.dumps(description, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
