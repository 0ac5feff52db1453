"""The fault matrix: 14 set-ups x 4 faults, and a bit-for-bit record of what a probe may touch.

Each set-up is a model with the state a user has mid-training (optimizer moments, gradients,
moved batch-norm statistics, a scheduler, a GradScaler, an EMA copy...). Each fault is how the
probe ends: normally, with a non-memory error in the step, with Ctrl-C in the middle of a step
(after part of the forward ran), or with a time budget too small for the search. After each,
:func:`capture` must be bit-identical to before, and the tensors users hold the same objects.

Used by ``tests/test_faults.py`` (one parametrized test) and ``benchmarks/reliability.py``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from maxbatch import find_batch_size

CAP = 1_500_000  # bytes of the virtual device: ceilings of 20 to 200 on these models


@dataclasses.dataclass
class Case:
    """One set-up: the model, its sample, the probe's keywords and the objects to compare."""

    model: nn.Module
    sample: Any
    kwargs: dict[str, Any]
    optimizer: torch.optim.Optimizer | None = None
    objects: dict[str, Any] = dataclasses.field(default_factory=dict)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 8))
    return model, torch.randn(4, 32)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)
    )
    sample = torch.randn(4, 3, 8, 8)
    model(sample)  # materialise the lazy layer
    return model, sample


def _trained(model: nn.Module, sample: Any, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    """A user's state mid-training: moments, moved statistics, and live gradients."""
    for _ in range(steps):
        opt.zero_grad()
        out = model(sample) if not isinstance(sample, dict) else model(**sample)["logits"]
        out.float().square().mean().backward()
        opt.step()


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 50)
        self.out.weight = self.emb.weight  # tied weights: one parameter, two modules

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.out(torch.tanh(self.emb(input_ids)))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def _with(opt_cls: type[torch.optim.Optimizer], model: nn.Module, **kw: Any) -> Any:
    return opt_cls([p for p in model.parameters() if p.requires_grad], **kw)


def setup_adamw() -> Case:
    model, x = _mlp()
    opt = _with(torch.optim.AdamW, model)
    _trained(model, x, opt)
    return Case(model, x, {"optimizer": opt}, opt)


def setup_batchnorm_eval() -> Case:
    model, x = _cnn()
    opt = _with(torch.optim.Adam, model, lr=1e-3)
    _trained(model, x, opt)
    model.eval()  # the user's mode, which the probe must give back
    return Case(model, x, {"optimizer": opt}, opt)


def setup_dict_tied() -> Case:
    model = _Encoder()
    ids = torch.randint(0, 50, (4, 6))
    sample = {"input_ids": ids, "labels": ids.roll(1, dims=1)}
    opt = _with(torch.optim.AdamW, model)
    _trained(model, sample, opt)
    return Case(model, sample, {"optimizer": opt}, opt)


def setup_sgd_momentum() -> Case:
    model, x = _mlp()
    opt = _with(torch.optim.SGD, model, lr=0.1, momentum=0.9, nesterov=True)
    _trained(model, x, opt)
    return Case(model, x, {"optimizer": opt}, opt)


def setup_inference() -> Case:
    model, x = _cnn()
    return Case(model, x, {"mode": "inference"})


def setup_bf16() -> Case:
    model, x = _mlp()
    opt = _with(torch.optim.Adam, model)
    _trained(model, x, opt)
    return Case(model, x, {"optimizer": opt, "precision": "bf16"}, opt)


def setup_frozen() -> Case:
    model, x = _mlp()
    model[0].weight.requires_grad_(False)
    opt = _with(torch.optim.Adam, model)
    _trained(model, x, opt)
    return Case(model, x, {"optimizer": opt}, opt)


def setup_optimizer_only_param() -> Case:
    model, x = _mlp()
    scale = nn.Parameter(torch.ones(8))
    opt = torch.optim.Adam([*model.parameters(), scale])
    (model(x) * scale).sum().backward()
    opt.step()

    def forward(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch) * scale

    return Case(model, x, {"optimizer": opt, "forward_fn": forward}, opt, {"scale": scale})


def setup_scheduler() -> Case:
    model, x = _mlp()
    opt = _with(torch.optim.SGD, model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # never stepped yet
    return Case(model, x, {"optimizer": opt}, opt, {"scheduler": sched})


def setup_tensor_lr() -> Case:
    model, x = _mlp()
    opt = _with(torch.optim.Adam, model, lr=torch.tensor(1e-3))
    _trained(model, x, opt)
    return Case(model, x, {"optimizer": opt}, opt)


def setup_train_step() -> Case:
    model, x = _mlp()
    ema, _ = _mlp()
    opt = _with(torch.optim.SGD, model, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    counter = torch.zeros((), dtype=torch.int64)

    def train_step(m: nn.Module, batch: torch.Tensor, optimizer: Any) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(m(batch).square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        sched.step()
        counter.add_(1)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), m.parameters(), strict=True):
                e.lerp_(p, 0.1)

    train_step(model, x, opt)  # a scale tensor, a scheduler step and an EMA that moved
    objects = {"ema": ema, "scaler": scaler, "scheduler": sched, "counter": counter}
    kwargs = {"optimizer": opt, "train_step": train_step, "extra_state": [ema, sched, counter]}
    return Case(model, x, kwargs, opt, objects)


def setup_make_batch() -> Case:
    model, _ = _mlp()
    opt = _with(torch.optim.Adam, model)
    gen = torch.Generator().manual_seed(3)

    def make_batch(b: int) -> torch.Tensor:
        return torch.randn(b, 32, generator=gen) + torch.randn(b, 32)  # two generators move

    _trained(model, make_batch(4), opt)
    kwargs = {"optimizer": opt, "extra_state": [gen]}
    return Case(model, make_batch, kwargs, opt, {"generator": gen})


def setup_host_rng() -> Case:
    model, x = _mlp()
    opt = _with(torch.optim.Adam, model)

    def forward(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        noise = random.random() + float(np.random.rand())  # Python's and NumPy's generators
        return m(batch) * noise

    return Case(model, x, {"optimizer": opt, "forward_fn": forward}, opt)


def setup_sparse_multiple() -> Case:
    model = nn.Sequential(nn.EmbeddingBag(40, 16, mode="sum"), nn.Linear(16, 4))
    x = torch.randint(0, 40, (8, 5))
    opt = _with(torch.optim.RMSprop, model, lr=1e-3, centered=True)
    _trained(model, x, opt)
    return Case(model, x, {"optimizer": opt, "multiple_of": 8}, opt)


SETUPS: dict[str, Callable[[], Case]] = {
    "adamw": setup_adamw,
    "batchnorm-eval": setup_batchnorm_eval,
    "dict-tied": setup_dict_tied,
    "sgd-momentum": setup_sgd_momentum,
    "inference": setup_inference,
    "bf16": setup_bf16,
    "frozen": setup_frozen,
    "optimizer-only-param": setup_optimizer_only_param,
    "scheduler": setup_scheduler,
    "tensor-lr": setup_tensor_lr,
    "train-step-ema-scaler": setup_train_step,
    "make-batch": setup_make_batch,
    "host-rng": setup_host_rng,
    "rmsprop-multiple": setup_sparse_multiple,
}


# -- the faults -----------------------------------------------------------------------------------

FAULTS = ("success", "error", "interrupt", "budget")
FIRE_AT = 3  # the forward pass the fault fires in: the first step of the second trial


class Boom(Exception):
    """A failure of the user's step that has nothing to do with memory."""


def _last_leaf(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if not list(m.children())][-1]


def run(case: Case, fault: str) -> str:
    """Probe ``case`` with ``fault``; return how it ended: ``answer`` or the exception's name.

    ``error`` and ``interrupt`` fire from a forward hook on the model's last layer: in the middle
    of a step, with the activations of the forward alive and the backward not run.
    """
    kwargs: dict[str, Any] = {"memory": CAP, "profile": fault == "success", **case.kwargs}
    if fault == "budget":
        kwargs["time_budget"] = 1e-9
    handle = None
    if fault in ("error", "interrupt"):
        calls = [0]
        kind: type[BaseException] = Boom if fault == "error" else KeyboardInterrupt

        def fire(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[0] += 1
            if calls[0] == FIRE_AT:
                raise kind("injected in the middle of a step")

        handle = _last_leaf(case.model).register_forward_hook(fire)
    try:
        find_batch_size(case.model, case.sample, **kwargs)
        return "answer"
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the fault matrix records any
        return type(e).__name__
    finally:
        if handle is not None:
            handle.remove()


# -- a record of everything, and its differences ------------------------------------------------


def _tensor(t: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The object's identity and a copy of its values."""
    return id(t), t.detach().clone()


def _value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return _tensor(v)
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    return v


def _optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    index = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    return {
        "state": {index.get(id(p), -1): _value(dict(s)) for p, s in opt.state.items()},
        "groups": [
            {k: [id(p) for p in v] if k == "params" else _value(v) for k, v in g.items()}
            for g in opt.param_groups
        ],
        "attributes": {
            k: v for k, v in vars(opt).items() if isinstance(v, (bool, int, float, str, type(None)))
        },
    }


def _object(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _tensor(obj)
    if isinstance(obj, nn.Module):
        return {"state": _value(obj.state_dict(keep_vars=True)), "training": obj.training}
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, torch.amp.GradScaler):
        return {k: _value(v) for k, v in vars(obj).items() if k != "_per_optimizer_states"}
    return _value(obj.state_dict())


def capture(case: Case) -> dict[str, Any]:
    """Everything a probe may change, with the identity of every tensor users can hold."""
    model, opt = case.model, case.optimizer
    params = list(model.parameters())
    if opt is not None:
        known = {id(p) for p in params}
        params += [p for g in opt.param_groups for p in g["params"] if id(p) not in known]
    return {
        "params": [_tensor(p) for p in params],
        "grads": [None if p.grad is None else _tensor(p.grad) for p in params],
        "buffers": [_tensor(b) for b in model.buffers()],
        "training": [m.training for m in model.modules()],
        "optimizer": None if opt is None else _optimizer(opt),
        "objects": {name: _object(obj) for name, obj in case.objects.items()},
        "rng": [torch.get_rng_state(), random.getstate(), list(np.random.get_state())],
    }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def differences(a: Any, b: Any, path: str = "state") -> list[str]:
    """Where two records differ (an empty list: bit-identical, the same objects)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if _same_bits(a, b) else [path]
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]
