"""The workload on fake tensors, its trials run and counted as the virtual device runs them.

Under ``FakeTensorMode`` nothing is computed and nothing is allocated, whatever the batch size. The
virtual device's own counter (:class:`~maxbatch.devices.accounting.MemoryCounter`) counts the fake
tensors' storages (meta storages know their size in bytes, and their weakref finalizers fire when
they are freed), and the probe's own trial (:func:`~maxbatch.search.trial.run_trial`) and search
(:func:`~maxbatch.search.probe.search`) run on them. So on the CPU a fake trial's peak is the
virtual device's measured peak, byte for byte, and the fake search's ceiling is the probe's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from maxbatch.devicekinds import kind_of
from maxbatch.errors import DoesNotFitError, EstimateError, WorkloadError
from maxbatch.estimate.fakecopy import CPU, fake_like, fake_model, fake_optimizer, like_cuda
from maxbatch.grid import Grid
from maxbatch.results import Trial
from maxbatch.search.meter import CountingMeter
from maxbatch.search.probe import search
from maxbatch.search.trial import run_trial
from maxbatch.settings import SearchSettings, Target
from maxbatch.step.batching import make_batch_fn, map_tensors
from maxbatch.step.extrastate import ExtraState
from maxbatch.step.spec import StepSpec
from maxbatch.step.workload import Workload, build_workload
from maxbatch.units import format_bytes

_BATCH_NORM = torch.ops.aten.native_batch_norm.default
_SDPA = torch.nn.functional.scaled_dot_product_attention
_REDUCED = (torch.bfloat16, torch.float16)
_NOT_FAKEABLE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)


def _why(error: Exception) -> str:
    if isinstance(error, DataDependentOutputException):
        return (
            "reads a tensor's value into Python (.item(), .tolist(), bool(t), int(t), `if t:`), "
            "and fake tensors have no values"
        )
    if isinstance(error, DynamicOutputShapeException):
        return (
            "has an output shape that depends on tensor values (nonzero, boolean-mask indexing, "
            "unique, masked_select), which fake tensors cannot know"
        )
    return "has no fake (meta) implementation in this torch version"


class _CpuBatchNorm(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Batch norm whose saved statistics have the CPU kernel's dtype.

    The meta kernel saves them in the input's dtype; the CPU kernel saves them in float32 when a
    bfloat16 or float16 input meets float32 parameters (autocast), as the probe counts them. Above
    the fake mode and below the counter, so the counter sees the CPU kernel's outputs.
    """

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is not _BATCH_NORM or args[0].dtype not in _REDUCED:
            return out
        params = [t for t in args[1:5] if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float32 for t in params):
            return (out[0], out[1].float(), out[2].float())
        return out


class _MaskedAttention(TorchFunctionMode):
    """Records attention given a mask: a path the real step may skip by the mask's values.

    Libraries skip an attention mask that masks nothing (transformers checks ``mask.all()``), a
    check on values that fake tensors cannot make: they build the mask and pass it, so the fake
    step keeps a batch x heads x length x length mask the real step never builds. Watched at the
    Python call, before attention decomposes into kernels that no longer say it was attention.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, None] = {}  # operations, in the order first seen

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            if mask is not None:
                self.seen["torch.nn.functional.scaled_dot_product_attention(attn_mask=...)"] = None
        return func(*args, **kwargs)

    def note(self) -> str | None:
        """Name the operations, or None when no attention kernel got a mask."""
        if not self.seen:
            return None
        ops = ", ".join(self.seen)
        return (
            f"the fake step passed an attention mask to {ops}: where the real step decides by "
            "the mask's values (transformers skips an all-ones mask), fake tensors have none to "
            "check, so the estimate counts the mask and what attention keeps for it; if your "
            "batches mask nothing, the probe's ceiling can be higher"
        )


def _not_fakeable(cause: Exception) -> dict[str, str]:
    """The keywords of the :class:`EstimateError` naming the operation fake tensors cannot run."""
    op = str(getattr(cause, "func", "an operation"))
    return {
        "message": f"the step cannot run on fake tensors: {op} {_why(cause)}; estimates need a "
        "step whose shapes do not depend on tensor values. Use `maxbatch probe` (or "
        "find_batch_size) to measure on a real device instead",
        "operation": op,
        "reason": f"the step calls {op}, which {_why(cause)}",
    }


def storage_bytes(tensors: Iterable[Any], round_to: int) -> int:
    """Bytes of the distinct storages of ``tensors``, each rounded up to ``round_to``."""
    sizes = {
        t.untyped_storage()._cdata: t.untyped_storage().nbytes()
        for t in tensors
        if isinstance(t, torch.Tensor)
    }
    return sum(-(-n // round_to) * round_to for n in sizes.values())


class FakeStep:
    """The workload on fake tensors, its trials run and counted as the virtual device runs them."""

    def __init__(self, workload: Workload, target: Target, sample_size: int | None):
        self.workload = workload
        self.target = target
        self.sample_size = sample_size
        self.round_to = kind_of(target.value).rounding
        # Fake tensors' storages are on the meta device: count every storage, not only the CPU's.
        self.meter = CountingMeter(
            CPU, round_to=self.round_to, label="estimated", every_device=True
        )
        self.base = 0
        self.exact: dict[int, Trial] = {}  # trials that ran to the end: their peak is exact
        self.refused: dict[tuple[int, int], Trial] = {}  # out of memory at that usable size
        self.steps = 0
        self.value_paths: _MaskedAttention | None = None  # set by fake_step

    def value_note(self) -> str | None:
        """A path taken by values the fake step cannot see, named, or None."""
        return None if self.value_paths is None else self.value_paths.note()

    def trial(self, batch_size: int, usable: int | None) -> Trial:
        """The virtual device's trial at ``batch_size`` with ``usable`` bytes (None: no cap)."""
        known = self.exact.get(batch_size)
        if known is not None and (usable is None or known.peak_bytes <= usable):
            return known
        if usable is not None and (batch_size, usable) in self.refused:
            return self.refused[batch_size, usable]
        self.meter.set_usable(usable)
        trial = run_trial(self.workload, self.meter, batch_size)
        self.steps += 1
        if trial.oom:
            assert usable is not None
            self.refused[batch_size, usable] = trial
        else:
            self.exact[batch_size] = dataclasses.replace(trial, fits=True)
        return trial

    def peak(self, batch_size: int) -> int:
        """The exact peak bytes of a trial at ``batch_size``."""
        return self.trial(batch_size, None).peak_bytes

    def ceiling(self, usable: int, *, start: int, grid: Grid) -> tuple[int | None, str]:
        """The probe's search over fake trials: the ceiling for ``usable`` bytes and why."""
        if usable <= self.base:
            return None, (
                f"the model and its state alone hold {format_bytes(self.base)}, more than the "
                f"usable {format_bytes(usable)}"
            )
        try:
            outcome = search(
                lambda b: self.trial(b, usable),
                start=start,
                usable_bytes=usable,
                base_bytes=self.base,
                settings=SearchSettings(grid=grid),
            )
        except DoesNotFitError as e:
            # A fake step costs nothing: say what the smallest size needs, not where it stopped.
            return None, (
                f"batch size {e.batch_size} does not fit: it needs "
                f"{format_bytes(self.peak(e.batch_size))}, {format_bytes(usable)} are usable"
            )
        return outcome.ceiling, outcome.stop_reason

    def input_bytes(self, batch_size: int) -> int:
        """Bytes of a batch of ``batch_size`` as the step receives it."""
        batch = self.workload.make_batch(batch_size)
        return storage_bytes(tree_flatten(batch)[0], self.round_to)

    def state(self, batch_size: int) -> dict[str, int]:
        """Bytes of parameters, buffers, gradients and optimizer state after one fake step."""
        w, r = self.workload, self.round_to
        w.run(batch_size, 1)
        grads = [p.grad for p in w.model.parameters() if p.grad is not None]
        opt = (
            []
            if w.optimizer is None
            else [v for s in w.optimizer.state.values() for v in s.values()]
        )
        state = {
            "parameters_bytes": storage_bytes(w.model.parameters(), r),
            "buffers_bytes": storage_bytes(w.model.buffers(), r),
            "gradients_bytes": storage_bytes(grads, r),
            "optimizer_bytes": storage_bytes(opt, r),
        }
        w.reset()
        return state


@contextlib.contextmanager
def fake_step(step: StepSpec, target: Target) -> Iterator[FakeStep]:
    """Build the fake workload of ``step``; inside, every tensor operation runs on fake tensors.

    The optimizer is chosen as the probe chooses it (an instance is rebuilt over the fake
    parameters); for a CUDA target it takes the foreach implementation, as torch does there.

    Yields:
        The fake step, saved and prepared; restored on leaving.

    Raises:
        EstimateError: the step cannot run on fake tensors.
        WorkloadError: the step failed for a reason fake tensors do not explain.
    """
    # Fallback kernels would run ops without a meta kernel on real zeros: real memory.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, allow_fallback_kernels=False)
    # The counter, entered for each trial, sits above the batch-norm fix, which sits above the
    # fake mode: it counts the storages the CPU's kernels would make.
    masked = _MaskedAttention()
    with fake_mode, _CpuBatchNorm(), masked:  # type: ignore[no-untyped-call]
        model_copy, memo = fake_model(step.model)
        if step.sample_size is None:
            make_batch = step.sample  # make_batch(b) runs under the fake mode: its tensors are fake
        else:
            make_batch, _ = make_batch_fn(map_tensors(step.sample, fake_like))
        workload = build_workload(
            dataclasses.replace(
                step, model=model_copy, make_batch=make_batch, extra_state=ExtraState(items=())
            ),
            CPU,
            adopt=lambda opt: fake_optimizer(opt, memo),
        )
        if workload.optimizer is not None and target is Target.CUDA:
            like_cuda(workload.optimizer)
        fake = FakeStep(workload, target, step.sample_size)
        fake.value_paths = masked
        try:
            with fake.meter, workload:
                fake.base = fake.meter.live_bytes(workload)
                yield fake
        except (WorkloadError, *_NOT_FAKEABLE) as e:
            # The fake mode's own error, or the trial's WorkloadError chained to it.
            cause = e.__cause__ if isinstance(e, WorkloadError) else e
            if not isinstance(cause, _NOT_FAKEABLE):
                raise
            raise EstimateError(**_not_fakeable(cause)) from cause
