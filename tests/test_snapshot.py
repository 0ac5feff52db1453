"""State that the probe must give back in place: the cases of issue 11."""

from __future__ import annotations

import pytest
import torch
from models import mlp

from maxbatch import ConfigError, find_batch_size

CAP = 200_000  # the MLP's ceiling is about 100 under this cap: a handful of trials


def _grads(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in model.parameters()]


def test_gradients_and_a_tensor_lr_come_back_as_the_same_objects() -> None:
    model, sample = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    model(sample).sum().backward()
    opt.step()
    grads, lr = _grads(model), opt.param_groups[0]["lr"]
    values = [g.clone() for g in grads if g is not None]
    find_batch_size(model, sample, optimizer=opt, memory=CAP, profile=False)
    assert all(a is b for a, b in zip(_grads(model), grads, strict=True))
    assert all(torch.equal(g, v) for g, v in zip(grads, values, strict=True))  # type: ignore[arg-type]
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)


def test_a_parameter_held_only_by_the_optimizer_is_restored() -> None:
    model, sample = mlp()
    scale = torch.nn.Parameter(torch.ones(8))
    opt = torch.optim.SGD([*model.parameters(), scale], lr=0.1)

    def forward(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch) * scale

    find_batch_size(model, sample, optimizer=opt, forward_fn=forward, memory=CAP, profile=False)
    assert torch.equal(scale, torch.ones(8)) and scale.grad is None


def test_an_lr_scheduler_sees_no_optimizer_step() -> None:
    model, sample = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    before = dict(vars(opt))
    find_batch_size(model, sample, optimizer=opt, memory=CAP, profile=False)
    assert vars(opt).keys() == before.keys()  # no `_opt_called`
    assert not hasattr(opt, "_opt_called")


def _ema_step(ema: torch.nn.Module, scaler: torch.amp.GradScaler, counter: torch.Tensor):
    def train_step(model: torch.nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(model(batch).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        counter.add_(1)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 0.5)

    return train_step


def test_extra_state_and_a_grad_scaler_the_step_uses() -> None:
    model, sample = mlp()
    ema, _ = mlp()
    ema_before = [p.detach().clone() for p in ema.parameters()]
    # growth_interval=1: the scale doubles on every step (65536 -> 67108864 after ten).
    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    counter = torch.zeros(())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    gen = torch.Generator().manual_seed(7)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(7))
    ema_step = _ema_step(ema, scaler, counter)

    def step(model: torch.nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        ema_step(model, batch + torch.rand(batch.shape, generator=gen), opt)
        sched.step()

    find_batch_size(
        model,
        sample,
        optimizer=opt,
        train_step=step,
        memory=CAP,
        profile=False,
        extra_state=[ema, counter, sched, gen],
    )
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), ema_before, strict=True))
    assert counter.item() == 0
    assert scaler._scale is None  # never used before: as it was, not a scale of 1
    assert scaler.get_scale() == 65536.0
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 0.1
    assert torch.equal(torch.rand(3, generator=gen), expected)


def test_a_used_grad_scaler_keeps_its_scale_tensor() -> None:
    model, sample = mlp()
    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = _ema_step(mlp()[0], scaler, torch.zeros(()))
    step(model, sample, opt)
    scale = scaler._scale
    assert scale is not None
    value = scale.item()
    find_batch_size(model, sample, optimizer=opt, train_step=step, memory=CAP, profile=False)
    assert scaler._scale is scale and scale.item() == value


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (torch.zeros(3), "extra_state must be a list of objects, got Tensor"),
        ([1.5], r"extra_state\[0\] has type float"),
        ([torch.zeros(1), "ema"], r"extra_state\[1\] has type str"),
    ],
)
def test_bad_extra_state_is_rejected_before_any_trial(extra: object, match: str) -> None:
    model, sample = mlp()
    calls: list[object] = []
    with pytest.raises(ConfigError, match=match):
        find_batch_size(model, sample, memory=CAP, on_trial=calls.append, extra_state=extra)  # type: ignore[arg-type]
    assert calls == []


@pytest.mark.parametrize("code", [0, 3, None])
def test_sys_exit_in_the_step_is_a_failure_of_the_step(code: int | None) -> None:
    from maxbatch import WorkloadError

    model, sample = mlp()
    before = [p.detach().clone() for p in model.parameters()]

    def train_step(m: torch.nn.Module, batch: torch.Tensor, opt: object) -> None:
        m(batch).sum().backward()
        raise SystemExit(code)

    with pytest.raises(WorkloadError, match=r"SystemExit\(.*\): the step called sys.exit\(\)"):
        find_batch_size(model, sample, train_step=train_step, memory=CAP)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
