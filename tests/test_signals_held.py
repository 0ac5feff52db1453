"""Ctrl-C and SIGTERM in the middle of the save or the final restore: held, delivered after.

The signal is real: an ``extra_state`` object sends it to this very process from inside its
``state_dict()`` (the save) or its ``load_state_dict()`` (the final restore: the one that runs
with the user's gradients already back), so it lands at a known point of the critical section.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import torch

from maxbatch import find_batch_size
from maxbatch.step.interrupt import Terminated, signals_held, stop_signals


@pytest.fixture(autouse=True)
def _ctrl_c_raises() -> Any:
    # A shell starts a background job with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give these tests the interactive default, whoever started pytest.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


class Tripwire:
    """An extra-state object that sends ``signum`` to this process at a chosen moment."""

    def __init__(self, model: torch.nn.Module, signum: int, when: str):
        self.model, self.signum, self.when, self.sent = model, signum, when, 0
        self.value = 0

    def _send(self) -> None:
        self.sent += 1
        # To this thread (the main one), not to the process: a process-directed signal may be
        # taken by another thread a test left running, and handled only after the held section.
        signal.raise_signal(self.signum)

    def state_dict(self) -> dict[str, Any]:
        if self.when == "save" and not self.sent:
            self._send()
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        final = any(p.grad is not None for p in self.model.parameters())  # grads come back first
        if self.when == "final restore" and final and not self.sent:
            self._send()
        self.value = state["value"]


def user_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model in eval mode with gradients: what an interrupted save or restore would break."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)
    )
    model(torch.randn(8, 16)).sum().backward()
    model.eval()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    values = {n: g.clone() for n, g in grads.items()}
    return model, grads, values


def assert_whole(model: torch.nn.Module, grads: dict[str, Any], values: dict[str, Any]) -> None:
    assert not any(m.training for m in model.modules())  # eval() as the user left it
    for name, p in model.named_parameters():
        assert p.grad is grads[name]  # the same gradient object...
        assert torch.equal(p.grad, values[name])  # ...with its values


@pytest.mark.parametrize("when", ["save", "final restore"])
def test_ctrl_c_inside_the_save_or_the_final_restore_waits_until_it_is_done(when: str) -> None:
    model, grads, values = user_model()
    wire = Tripwire(model, signal.SIGINT, when)
    with pytest.raises(KeyboardInterrupt):
        find_batch_size(
            model,
            torch.randn(4, 16),
            memory="4MiB",
            optimizer="adam",
            profile=False,
            extra_state=[wire],
            max_batch_size=64,
        )
    assert wire.sent == 1
    assert_whole(model, grads, values)


@pytest.mark.parametrize("when", ["save", "final restore"])
def test_sigterm_there_is_delivered_as_terminated_after_the_restore(when: str) -> None:
    model, grads, values = user_model()
    wire = Tripwire(model, signal.SIGTERM, when)
    with pytest.raises(Terminated), stop_signals():
        find_batch_size(
            model,
            torch.randn(4, 16),
            memory="4MiB",
            optimizer="sgd",
            profile=False,
            extra_state=[wire],
            max_batch_size=64,
        )
    assert wire.sent == 1
    assert_whole(model, grads, values)


def test_held_signals_come_once_each_after_the_block_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held() as held:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"] and held == [signal.SIGINT, signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before
