"""Isolated trials: each trial of a model file runs in a fresh process.

No allocator cache, cuDNN autotuning or fragmentation from an earlier trial helps or hurts the
next one, which makes the ceiling the most faithful on CUDA; and on a CPU without ``memory=``, a
trial that wakes the kernel's OOM killer kills its own process, not the probe: a child killed by
a signal counts as "does not fit" at that size, with a note.

The parent runs the same search (:func:`maxbatch.probe.search`) over ``run(b)``, where each
``run(b)`` starts ``python -m maxbatch.isolate REQUEST`` and the child runs
:func:`~maxbatch.find_batch_size` on the freshly loaded file at exactly ``b``
(``min_batch_size = max_batch_size = b``). At the end one more child times the sizes up to the
ceiling and picks (when profiling or advice was asked for). The parent never touches the device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from maxbatch.distributed import is_distributed
from maxbatch.errors import (
    ConfigError,
    DeviceError,
    DoesNotFitError,
    MaxbatchError,
    ModelFileError,
    WorkloadError,
)
from maxbatch.grid import Grid
from maxbatch.probe import fit_memory_model, search
from maxbatch.results import UNTIMED_REASON, BatchSizeResult, MemoryPoint, Throughput, Trial

#: The options a child takes as they are (JSON-ready); the rest are the parent's own.
CHILD_OPTIONS = frozenset(
    {
        "device",
        "memory",
        "headroom",
        "mode",
        "precision",
        "optimizer",
        "multiple_of",
        "profile",
        "pick",
        "tolerance",
        "dataset_size",
        "global_batch",
        "base_batch",
        "base_lr",
    }
)
_ERRORS: dict[str, type[MaxbatchError]] = {
    "ConfigError": ConfigError,
    "DeviceError": DeviceError,
    "WorkloadError": WorkloadError,
}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _Children:
    """Starts the child processes and turns what they report into trials and results."""

    def __init__(self, model_file: str, options: Mapping[str, Any], notes: list[str]):
        self.model_file, self.options, self.notes = model_file, dict(options), notes
        self.first: BatchSizeResult | None = None  # a child's whole result: device, capacity
        self.usable: int | None = None

    def child(self, **options: Any) -> dict[str, Any]:
        """Run one child with these options on top of the common ones; return its report."""
        with tempfile.TemporaryDirectory(prefix="maxbatch-isolate-") as tmp:
            request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
            request.write_text(
                json.dumps(
                    {
                        "model_file": self.model_file,
                        "answer": str(answer),
                        "options": {**self.options, **options},
                    }
                ),
                encoding="utf-8",
            )
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "maxbatch.isolate", str(request)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
            )
            seconds = time.perf_counter() - started
            if proc.returncode < 0:
                return {"killed": -proc.returncode, "seconds": seconds}
            if not answer.exists():
                tail = proc.stderr.strip().splitlines()[-3:]
                raise WorkloadError(
                    f"the isolated trial's process exited with code {proc.returncode} without an "
                    f"answer: {' | '.join(tail) or 'no output'}"
                )
            report: dict[str, Any] = json.loads(answer.read_text(encoding="utf-8"))
            return {**report, "seconds": seconds}

    def trial(self, b: int) -> Trial:
        """One isolated trial at ``b``."""
        report = self.child(min_batch_size=b, max_batch_size=b, profile=False)
        if "killed" in report:
            name = _signal_name(report["killed"])
            self.notes.append(
                f"batch size {b}: the trial's process was killed by {name}, counted as not "
                "fitting (the kernel's OOM killer sends SIGKILL when the host runs out of memory)"
            )
            peak = (
                0 if self.usable is None else self.usable + 1
            )  # it needed more, how much is unknown
            return Trial(b, False, peak, report["seconds"], oom=True)
        if "does_not_fit" in report:
            info = report["does_not_fit"]
            self.usable = info["available_bytes"] if self.usable is None else self.usable
            return Trial(b, False, info["needed_bytes"], report["seconds"], oom=True)
        if "error" in report:
            _raise(report["error"], self.model_file, b)
        result = BatchSizeResult.from_dict(report["result"])
        if not result.trials:  # answered without running (a capacity beyond this machine)
            raise ConfigError(
                f"the isolated trial at batch size {b} ran no step: {'; '.join(result.notes)}"
            )
        if self.first is None:
            self.first, self.usable = result, result.usable_bytes
        # What a trial cost here: its whole process, as for the trials that did not fit.
        return dataclasses.replace(result.trials[0], seconds=report["seconds"])


def _raise(error: Mapping[str, Any], model_file: str, b: int) -> None:
    kind, message = error["type"], error["message"]
    if kind == "ModelFileError":
        raise ModelFileError(model_file, message.removeprefix(f"{model_file}: "))
    cls = _ERRORS.get(kind, WorkloadError)
    if cls is WorkloadError:
        raise WorkloadError(f"{message} (in the isolated trial at batch size {b})", batch_size=b)
    raise cls(message)


def probe_isolated(
    model_file: str,
    *,
    start: int,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    time_budget: float | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    on_point: Callable[[Throughput], None] | None = None,
    **options: Any,
) -> BatchSizeResult:
    """Find the ceiling of a model file with every trial in a fresh process, then pick.

    Args:
        model_file: the model file (see the design's model.py conventions).
        start: the first size (the sample's own batch size).
        min_batch_size: the smallest size to try.
        max_batch_size: the largest size to try.
        multiple_of: only multiples of this.
        time_budget: seconds for the search (the final profiling child is not counted).
        on_trial: called with each trial as its child finishes.
        on_point: called with each timed size once the profiling child finished.
        **options: :func:`~maxbatch.find_batch_size` options from :data:`CHILD_OPTIONS`.

    Returns:
        The result, as :func:`~maxbatch.find_batch_size` gives it.

    Raises:
        ConfigError: an option cannot be passed to a child.
        DoesNotFitError: the smallest size does not fit (or its process was killed).
        WorkloadError: a child failed for a reason other than memory.
    """
    started = time.perf_counter()
    unknown = sorted(set(options) - CHILD_OPTIONS)
    if unknown:
        raise ConfigError(
            f"isolated trials cannot take {', '.join(unknown)}: a child process loads the model "
            f"file itself; options it takes: {', '.join(sorted(CHILD_OPTIONS))}"
        )
    notes: list[str] = ["isolated: every trial ran in a fresh process that loaded the model file"]
    children = _Children(model_file, {**options, "multiple_of": multiple_of}, notes)
    done: dict[int, Trial] = {}

    def run(b: int) -> Trial:
        if b not in done:
            done[b] = children.trial(b)
        return done[b]

    # The search needs the usable bytes before its first trial: take them from the first child
    # that reports them, halving as the search would after a killed one.
    grid = Grid.build(
        min_batch_size=min_batch_size, max_batch_size=max_batch_size, multiple_of=multiple_of
    )
    lower = grid.lower
    b = grid.snap_down(start)
    killed: list[Trial] = []
    while True:
        trial = run(b)
        if children.usable is not None:
            break
        killed.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if b == lower:
            raise DoesNotFitError(
                f"batch size {b} does not fit: its isolated process was killed by the system",
                batch_size=b,
                needed_bytes=trial.peak_bytes,
                available_bytes=0,
            )
        b = grid.snap_down(b / 2)
    outcome = search(
        run,
        start=b,
        usable_bytes=children.usable,
        base_bytes=(children.first.trials[0].state_bytes or 0) if children.first else 0,
        grid=grid,
        time_budget=time_budget,
        on_trial=on_trial,
    )
    again = {t.batch_size for t in outcome.trials}
    trials = (*(t for t in killed if t.batch_size not in again), *outcome.trials)
    final = children.first
    want_answer = options.get("profile", True) or any(
        options.get(k) is not None for k in ("dataset_size", "global_batch", "base_batch")
    )
    if want_answer:
        report = children.child(min_batch_size=min_batch_size, max_batch_size=outcome.ceiling)
        if "result" not in report:
            why = (
                f"was killed by {_signal_name(report['killed'])}"
                if "killed" in report
                else f"failed: {report.get('error') or report.get('does_not_fit')}"
            )
            raise WorkloadError(f"the process that timed the sizes up to {outcome.ceiling} {why}")
        final = BatchSizeResult.from_dict(report["result"])
        if on_point is not None:
            for point in final.throughput:
                on_point(point)
        if final.ceiling != outcome.ceiling:
            notes.append(
                f"the timing process verified only up to {final.ceiling} (one process, several "
                "trials: what the isolation avoids)"
            )
    assert final is not None
    fits = sorted((t.batch_size, t.peak_bytes) for t in trials if t.fits)
    if not want_answer:
        final = dataclasses.replace(
            final,
            batch_size=outcome.ceiling,
            pick_reason=UNTIMED_REASON,
            throughput=(),
        )
    return dataclasses.replace(
        final,
        ceiling=outcome.ceiling,
        trials=trials,
        memory_model=fit_memory_model(trials),
        complete=outcome.complete,
        stop_reason=outcome.stop_reason,
        notes=(*notes, *(n for n in final.notes if n not in notes)),
        seconds=time.perf_counter() - started,
        memory=tuple(MemoryPoint(s, p) for s, p in fits),
    )


def probe_file(
    model_file: str | os.PathLike[str], *, isolate: bool = False, **options: Any
) -> BatchSizeResult:
    """Probe a model file (see the design's model.py conventions) as ``maxbatch probe`` does.

    Args:
        model_file: the file: ``model`` or ``build_model()``, ``sample`` or ``make_batch`` or
            ``dataset``, and the optional hooks.
        isolate: run every trial in a fresh process that loads the file (:func:`probe_isolated`);
            the options must then be plain values (see :data:`CHILD_OPTIONS`), plus
            ``min_batch_size``, ``max_batch_size``, ``time_budget``, ``on_trial`` and
            ``on_point``.
        **options: :func:`~maxbatch.find_batch_size` options; ``optimizer`` defaults to the
            file's ``optimizer()``.

    Returns:
        The result.

    Raises:
        ModelFileError: the file does not load or follow the conventions.
        ConfigError: ``isolate=True`` under an initialised ``torch.distributed`` group.
        MaxbatchError: as :func:`~maxbatch.find_batch_size`.
    """
    from maxbatch.batching import make_batch_fn
    from maxbatch.modelfile import load_model_file

    path = os.fspath(model_file)
    if isolate and is_distributed():
        raise ConfigError(
            "isolated trials do not combine with torch.distributed: run without --isolate under "
            "torchrun (the ranks then agree in one process each)"
        )
    spec = load_model_file(path)  # checked here, in this process, before any child starts
    if not isolate:
        return _find_in_file(spec, options)
    sample_size = None if spec.sample is None else make_batch_fn(spec.sample)[1]
    lower = options.get("min_batch_size") or 1
    start = max(lower, sample_size if sample_size is not None else 2)
    return probe_isolated(path, start=start, **options)


def _find_in_file(spec: Any, options: dict[str, Any]) -> BatchSizeResult:
    from maxbatch.finder import find_batch_size

    optimizer = options.pop("optimizer", None)
    device = options.pop("device", None)
    if device is not None:
        spec.model.to(device)
    return find_batch_size(
        spec.model,
        spec.batch_source(),
        device=device,
        optimizer=optimizer if optimizer is not None else spec.optimizer,
        loss_fn=spec.loss,
        forward_fn=spec.forward,
        train_step=spec.train_step,
        extra_state=spec.extra_state_items(),
        **options,
    )


def _child(request_path: str) -> int:
    """The child's side: load the file, run ``find_batch_size`` as asked, write the answer."""
    from maxbatch.modelfile import load_model_file

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    answer: dict[str, Any]
    try:
        spec = load_model_file(request["model_file"])
        options = {**request["options"], "estimate_first": False, "distributed": False}
        answer = {"result": _find_in_file(spec, options).to_dict()}
    except DoesNotFitError as e:
        answer = {
            "does_not_fit": {"needed_bytes": e.needed_bytes, "available_bytes": e.available_bytes}
        }
    except MaxbatchError as e:
        answer = {"error": {"type": type(e).__name__, "message": str(e)}}
    tmp = Path(request["answer"] + ".tmp")
    tmp.write_text(json.dumps(answer), encoding="utf-8")
    os.replace(tmp, request["answer"])
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
