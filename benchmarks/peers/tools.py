"""Each tool run as its documentation shows, on a fresh model, on the same virtual device.

Every run builds the workload's model afresh (same seed, same weights), counts the steps it runs
with a forward pre-hook on the model, records each attempt the tool makes (a batch size, and whether
every step at it completed), and times the tool's whole call. Peers run inside one
:class:`maxbatch.devices.accounting.MemoryCounter` capped at the same bytes as maxbatch's
``memory=``; its out-of-memory error (a ``torch.OutOfMemoryError``, a ``RuntimeError`` with one
argument that starts with ``DefaultCPUAllocator: can't allocate memory``) is what their own OOM
checks catch on a CPU. maxbatch runs its own counter (``memory=cap``), which counts the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import itertools
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten, tree_map

import maxbatch
from maxbatch.devices.accounting import MemoryCounter
from maxbatch.step.batching import batch_size_of, make_batch_fn

from .workloads import Spec, adamw, train_step

#: Steps per attempt for every tool: maxbatch's trials run 2 (``maxbatch.search.trial.REPEATS``),
#: Lightning gets ``steps_per_trial=2``, and the function the decorator tools retry runs 2 steps.
STEPS = 2
#: Where Accelerate, torch-max-mem and toma start: they only ever lower the batch size, so they
#: get one start for every workload, a power of two above every ceiling in the benchmark.
START = 4096
#: The Lightning tuner's documented arguments used here (``max_trials`` is its default).
LIGHTNING_MAX_TRIALS = 25

TOOLS = (
    "maxbatch",
    "lightning-binsearch",
    "lightning-power",
    "accelerate",
    "torch-max-mem",
    "toma",
)
#: The module each peer needs, and the pip line that installs all of them.
MODULES = {
    "lightning-binsearch": "lightning",
    "lightning-power": "lightning",
    "accelerate": "accelerate",
    "torch-max-mem": "torch_max_mem",
    "toma": "toma",
}
INSTALL = 'pip install -e ".[bench]"'


def available(tool: str) -> bool:
    """Whether ``tool``'s package is installed."""
    module = MODULES.get(tool)
    return module is None or importlib.util.find_spec(module) is not None


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One batch size a tool ran; ``ok`` when every step at it completed."""

    batch_size: int
    ok: bool


@dataclasses.dataclass(frozen=True)
class ToolRun:
    """What one tool answered and what it cost.

    Attributes:
        tool: the tool's name (one of :data:`TOOLS`).
        answer: the batch size it returned (maxbatch: its ceiling), None after an error.
        attempts: every batch size it ran, in order.
        steps: training steps started (forward calls), failed ones included.
        seconds: wall time of the tool's call (None after an error).
        pick: maxbatch only: ``result.batch_size``, the size it recommends training with.
        error: the exception, in words, when the tool failed.
        probe_steps: maxbatch only: the steps until its last probe trial (before the profiler).
        probe_seconds: maxbatch only: the seconds until its last probe trial.
        timed_sizes: maxbatch only: the sizes its profiler timed to pick.
        fake_steps: forward calls on fake tensors (maxbatch's estimate), not in ``steps``.
    """

    tool: str
    answer: int | None
    attempts: tuple[Attempt, ...]
    steps: int
    seconds: float | None
    pick: int | None = None
    error: str | None = None
    probe_steps: int | None = None
    probe_seconds: float | None = None
    timed_sizes: int | None = None
    fake_steps: int = 0

    @property
    def answer_ran(self) -> bool:
        """Whether the tool itself ran its answer and every step at it completed."""
        return any(a.ok and a.batch_size == self.answer for a in self.attempts)

    @property
    def largest_ok(self) -> int | None:
        """The largest batch size the tool ran successfully."""
        return max((a.batch_size for a in self.attempts if a.ok), default=None)

    def to_dict(self) -> dict[str, Any]:
        """Return the run as a JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["trials"] = len(self.attempts)
        d["answer_ran"] = self.answer_ran
        return d


class Recorder:
    """Counts the model's forward calls and records the attempts a tool makes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.steps = 0
        self.fake_steps = 0
        self.started = time.perf_counter()
        self.attempts: list[Attempt] = []
        #: (steps, seconds) when each maxbatch probe trial ended
        self.trial_marks: list[tuple[int, float]] = []
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        # maxbatch's estimate runs the step on fake tensors: no data, no compute, not a step.
        if any(isinstance(t, FakeTensor) for t in tree_flatten((args, kwargs))[0]):
            self.fake_steps += 1
        else:
            self.steps += 1

    def trial_ended(self, trial: Any) -> None:
        """maxbatch's ``on_trial``: note the steps and time so far."""
        self.trial_marks.append((self.steps, time.perf_counter() - self.started))

    def begin(self, batch_size: int) -> None:
        """An attempt at ``batch_size`` starts."""
        self.attempts.append(Attempt(batch_size, ok=False))

    def done(self) -> None:
        """The current attempt ran all its steps."""
        self.attempts[-1] = dataclasses.replace(self.attempts[-1], ok=True)

    def call(self, tool: str, fn: Callable[[], Any]) -> ToolRun:
        """Time ``fn()``, the tool's whole call, and return its run; an exception is recorded.

        A peer that gives up (torch-max-mem's ``MemoryError``, toma's assertion at batch size 0)
        is a result of the benchmark, so its message is kept with the attempts made until then.
        """
        error = None
        self.started = time.perf_counter()
        try:
            answer = fn()
        except Exception as exc:  # noqa: BLE001 - recorded as the tool's result, never hidden
            answer, error = None, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - self.started
        extra: dict[str, Any] = {}
        if isinstance(answer, maxbatch.BatchSizeResult):
            attempts = tuple(Attempt(t.batch_size, t.fits) for t in answer.trials)
            probe_steps, probe_seconds = self.trial_marks[-1]
            extra = {
                "pick": answer.batch_size,
                "probe_steps": probe_steps,
                "probe_seconds": probe_seconds,
                "timed_sizes": len(answer.throughput),
            }
            answer = answer.ceiling
        else:
            attempts = tuple(self.attempts)
        return ToolRun(
            tool,
            answer,
            attempts,
            self.steps,
            seconds,
            error=error,
            fake_steps=self.fake_steps,
            **extra,
        )

    def close(self) -> None:
        """Remove the hook from the model."""
        self._handle.remove()


@contextlib.contextmanager
def virtual_device(model: torch.nn.Module, cap_bytes: int) -> Iterator[MemoryCounter]:
    """Count live CPU tensor bytes (the model's included) and raise an OOM past ``cap_bytes``."""
    counter = MemoryCounter(cap_bytes, device=torch.device("cpu"))
    counter.track(itertools.chain(model.parameters(), model.buffers()))
    try:
        with counter:
            yield counter
    finally:
        counter.close()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the peers' info logs and warnings (CPU-only hints, dataloader workers)."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def run_maxbatch(spec: Spec, cap_bytes: int) -> ToolRun:
    """``maxbatch.find_batch_size(..., memory=cap)`` with its defaults; the answer: its ceiling.

    Its defaults include the throughput profiler, whose steps and time count in the run;
    ``probe_steps`` and ``probe_seconds`` hold the search for the ceiling alone.
    """
    model, sample = spec.build()
    rec = Recorder(model)
    try:
        return rec.call(
            "maxbatch",
            lambda: maxbatch.find_batch_size(
                model,
                sample,
                optimizer="adamw",
                memory=cap_bytes,
                loss_fn=spec.loss,
                forward_fn=spec.forward,
                on_trial=rec.trial_ended,
            ),
        )
    finally:
        rec.close()


# -- The decorator tools: the user's training function, retried at smaller sizes ---------------


def _decorate(tool: str, train: Callable[..., int]) -> Callable[..., int]:
    """Wrap ``train(batch_size, model, optimizer)`` as ``tool``'s documentation shows.

    The wrapped function is called as ``wrapped(model, optimizer)``.
    """
    if tool == "accelerate":
        from accelerate.utils import find_executable_batch_size

        return find_executable_batch_size(train, starting_batch_size=START)  # type: ignore[no-any-return]
    if tool == "toma":
        from toma import toma

        return toma.batch(train, initial_batchsize=START)  # type: ignore[no-any-return]
    if tool == "torch-max-mem":
        from torch_max_mem import maximize_memory_utilization

        # torch-max-mem finds the parameter by name; the user passes the largest sensible size.
        def train_tmm(model: torch.nn.Module, optimizer: Any, batch_size: int) -> int:
            return train(batch_size, model, optimizer)

        wrapped = maximize_memory_utilization()(train_tmm)
        return functools.partial(wrapped, batch_size=START)
    raise ValueError(f"not a decorator tool: {tool!r}")


def run_decorated(tool: str, spec: Spec, cap_bytes: int) -> ToolRun:
    """Accelerate, torch-max-mem or toma around a function that trains ``STEPS`` steps."""
    model, sample = spec.build()
    make_batch, _ = make_batch_fn(sample)
    rec = Recorder(model)

    def train(batch_size: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        rec.begin(batch_size)
        batch = make_batch(batch_size)
        for _ in range(STEPS):
            train_step(spec, model, optimizer, batch)
        rec.done()
        return batch_size

    try:
        with virtual_device(model, cap_bytes), _quiet():
            return rec.call(tool, lambda: _decorate(tool, train)(model, adamw(model.parameters())))
    finally:
        rec.close()


# -- Lightning: a LightningModule, a Trainer, Tuner.scale_batch_size --------------------------


class Rows(torch.utils.data.Dataset[Any]):
    """Row ``i % n`` of the sample batch, as many rows as asked: batches like maxbatch's."""

    def __init__(self, sample: Any, length: int = 2**20) -> None:
        n = batch_size_of(sample)

        def row(i: int) -> Any:
            return tree_map(
                lambda t: t[i] if isinstance(t, torch.Tensor) and t.dim() else t, sample
            )

        self.rows = [row(i) for i in range(n)]  # views, made outside the virtual device
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.rows[index % len(self.rows)]


@functools.cache
def _lightning_module() -> type:
    import lightning.pytorch as pl

    class Module(pl.LightningModule):  # type: ignore[misc]
        """The workload as a LightningModule whose ``batch_size`` the tuner scales."""

        def __init__(self, spec: Spec, model: torch.nn.Module, sample: Any, rec: Recorder) -> None:
            super().__init__()
            self.spec, self.model, self.rec = spec, model, rec
            self.rows = Rows(sample)
            self.batch_size = batch_size_of(sample)

        def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
            return torch.utils.data.DataLoader(self.rows, batch_size=self.batch_size)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.spec.loss(self.spec.forward(self.model, batch), batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return adamw(self.model.parameters())

        def on_train_start(self) -> None:
            self.rec.begin(self.batch_size)

        def on_train_end(self) -> None:
            self.rec.done()

    return Module


def run_lightning(mode: str, spec: Spec, cap_bytes: int) -> ToolRun:
    """``Tuner(trainer).scale_batch_size(module, mode=mode, init_val=<sample size>)``."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    model, sample = spec.build()
    rec = Recorder(model)
    module = _lightning_module()(spec, model, sample, rec)

    def tune(root: str) -> int | None:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,  # the tuner saves and restores a checkpoint here
        )
        return Tuner(trainer).scale_batch_size(  # type: ignore[no-any-return]
            module,
            mode=mode,
            init_val=batch_size_of(sample),
            max_trials=LIGHTNING_MAX_TRIALS,
            steps_per_trial=STEPS,
        )

    try:
        with tempfile.TemporaryDirectory() as root, virtual_device(model, cap_bytes), _quiet():
            return rec.call(f"lightning-{mode}", lambda: tune(root))
    finally:
        rec.close()


def run_tool(tool: str, spec: Spec, cap_bytes: int) -> ToolRun:
    """Run ``tool`` on a fresh model of ``spec`` on a virtual device of ``cap_bytes``."""
    if tool == "maxbatch":
        return run_maxbatch(spec, cap_bytes)
    if tool.startswith("lightning-"):
        return run_lightning(tool.removeprefix("lightning-"), spec, cap_bytes)
    if tool in MODULES:
        return run_decorated(tool, spec, cap_bytes)
    raise ValueError(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")
