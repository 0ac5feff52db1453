"""One isolated trial: a fresh process that loads the model file and runs one size.

The parent's side, :class:`Children`, writes a request, starts ``python -m maxbatch.run.isotrial
REQUEST`` on a leash (:func:`maxbatch.run.childproc.run_child`: bounded in time, killed with its
process group, dying with the parent) and turns the answer, or the way the child died, into a
:class:`~maxbatch.results.Trial` or an error. The child's side (:func:`_child`) runs
:func:`~maxbatch.find_batch_size` on the freshly loaded file as asked and writes the answer.
The search over these trials is :mod:`maxbatch.run.isolate`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from maxbatch.errors import (
    ConfigError,
    DeviceError,
    DoesNotFitError,
    MaxbatchError,
    ModelFileError,
    WorkloadError,
)
from maxbatch.results import BatchSizeResult, Throughput, Trial
from maxbatch.run.childproc import ChildExit, die_with_parent, run_child, signal_name

_ERRORS: dict[str, type[MaxbatchError]] = {
    "ConfigError": ConfigError,
    "DeviceError": DeviceError,
    "WorkloadError": WorkloadError,
}


class BudgetSpent(Exception):
    """The time budget ran out while a trial's process was still running (it was killed)."""

    def __init__(self, batch_size: int):
        super().__init__(batch_size)
        self.batch_size = batch_size


class Children:
    """Starts the child processes and turns what they report into trials and results."""

    def __init__(
        self,
        model_file: str,
        options: Mapping[str, Any],
        notes: list[str],
        *,
        timeout: float | None,
        deadline: float | None,
    ):
        self.model_file, self.options, self.notes = model_file, dict(options), notes
        self.timeout, self.deadline = timeout, deadline  # deadline: time.monotonic() or None
        self.first: BatchSizeResult | None = None  # a child's whole result: device, capacity
        self.usable: int | None = None

    def _limit(self, budgeted: bool) -> tuple[float | None, bool]:
        """Seconds the next child may run, and whether the time budget is what sets them."""
        if not budgeted or self.deadline is None:
            return self.timeout, False
        left = max(self.deadline - time.monotonic(), 0.1)
        return (
            (left, True) if self.timeout is None or left < self.timeout else (self.timeout, False)
        )

    def child(self, what: str, *, budgeted: bool, **options: Any) -> dict[str, Any]:
        """Run one child with these options on top of the common ones; return its report.

        ``what`` names the child in messages (``the isolated trial at batch size 8``).

        Returns:
            What the child answered (``result``, ``does_not_fit`` or ``error``) and its
            ``seconds``; or ``killed`` (the signal) when the kernel OOM-killed it.

        Raises:
            WorkloadError: it crashed, ran past its timeout, or exited without an answer.
            BudgetSpent: the time budget ran out while it ran (``budgeted``: a search trial).
        """
        with tempfile.TemporaryDirectory(prefix="maxbatch-isolate-") as tmp:
            request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
            request.write_text(
                json.dumps(
                    {
                        "model_file": self.model_file,
                        "answer": str(answer),
                        "parent": os.getpid(),
                        "options": {**self.options, **options},
                    }
                ),
                encoding="utf-8",
            )
            limit, by_budget = self._limit(budgeted)
            argv = [sys.executable, "-m", "maxbatch.run.isotrial", str(request)]
            ended = run_child(argv, timeout=limit)
            if ended.oom_killed:
                return {"killed": -ended.returncode, "seconds": ended.seconds}
            _check_ended(ended, what, limit, by_budget, options.get("max_batch_size"))
            if not answer.exists():
                raise WorkloadError(
                    f"{what} exited with code {ended.returncode} without an answer: "
                    f"{ended.stderr or 'no output'}",
                    batch_size=options.get("max_batch_size"),
                )
            report: dict[str, Any] = json.loads(answer.read_text(encoding="utf-8"))
            return {**report, "seconds": ended.seconds}

    def trial(self, b: int) -> Trial:
        """One isolated trial at ``b``."""
        what = f"the isolated trial at batch size {b}"
        report = self.child(what, budgeted=True, min_batch_size=b, max_batch_size=b, profile=False)
        if "killed" in report:
            self.notes.append(
                f"batch size {b}: the trial's process was killed by SIGKILL while the kernel "
                "recorded an out-of-memory kill: counted as not fitting"
            )
            peak = (
                0 if self.usable is None else self.usable + 1
            )  # it needed more, how much is unknown
            seconds = report["seconds"]
            return Trial(batch_size=b, fits=False, peak_bytes=peak, seconds=seconds, oom=True)
        if "does_not_fit" in report:
            info = report["does_not_fit"]
            self.usable = info["available_bytes"] if self.usable is None else self.usable
            return Trial(
                batch_size=b,
                fits=False,
                peak_bytes=info["needed_bytes"],
                seconds=report["seconds"],
                oom=True,
            )
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


def _check_ended(
    ended: ChildExit, what: str, limit: float | None, budget: bool, b: int | None
) -> None:
    """Raise for a child that ran out of time or died of a signal (not an OOM kill).

    Raises:
        BudgetSpent: the time budget's end killed it.
        WorkloadError: its own timeout killed it, or it crashed.
    """
    if ended.timed_out and budget:
        raise BudgetSpent(b or 0)
    if ended.timed_out:
        raise WorkloadError(
            f"{what} did not finish within {limit:g}s (trial_timeout, --trial-timeout): its "
            "process group was killed. A step that hangs (a deadlock, a wait for data that never "
            "comes) ends here; a step that is only slow needs a larger --trial-timeout",
            batch_size=b,
        )
    if ended.signal is not None:
        why = (
            "no out-of-memory kill was recorded by the kernel, so something else killed it"
            if ended.signal == signal.SIGKILL
            else "a crash, not an out-of-memory error"
        )
        raise WorkloadError(
            f"{what} died of {signal_name(ended.signal)} ({why}): {ended.stderr or 'no output'}",
            batch_size=b,
        )


def _raise(error: Mapping[str, Any], model_file: str, b: int) -> None:
    kind, message = error["type"], error["message"]
    if kind == "ModelFileError":
        raise ModelFileError(model_file, message.removeprefix(f"{model_file}: "))
    cls = _ERRORS.get(kind, WorkloadError)
    if cls is WorkloadError:
        raise WorkloadError(f"{message} (in the isolated trial at batch size {b})", batch_size=b)
    raise cls(message)


def final_child(
    children: Children,
    ceiling: int,
    min_batch_size: int | None,
    on_point: Callable[[Throughput], None] | None,
) -> BatchSizeResult:
    """One more child times the sizes up to the ceiling and picks.

    Returns:
        Its result.

    Raises:
        WorkloadError: it was OOM-killed or failed.
    """
    what = f"the process that timed the sizes up to {ceiling}"
    report = children.child(
        what, budgeted=False, min_batch_size=min_batch_size, max_batch_size=ceiling
    )
    if "result" not in report:
        why = (
            "was killed by the kernel's OOM killer"
            if "killed" in report
            else f"failed: {report.get('error') or report.get('does_not_fit')}"
        )
        raise WorkloadError(f"{what} {why}", batch_size=ceiling)
    final = BatchSizeResult.from_dict(report["result"])
    if on_point is not None:
        for point in final.throughput:
            on_point(point)
    if final.ceiling != ceiling:
        children.notes.append(
            f"the timing process verified only up to {final.ceiling} (one process, several "
            "trials: what the isolation avoids)"
        )
    return final


def find_in_file(
    model_spec: Any, options: dict[str, Any], *, on_scan: Callable[[int, int], None] | None = None
) -> BatchSizeResult:
    """:func:`~maxbatch.find_batch_size` on a loaded model file, its hooks as the step's.

    The model is moved to ``options["device"]`` (when given); ``optimizer`` defaults to the
    file's ``optimizer()``, ``extra_state`` to its ``extra_state()``; ``on_scan`` reports the
    scan of its ``dataset``.

    Returns:
        The result.
    """
    from maxbatch.run.finder import find_batch_size

    optimizer = options.pop("optimizer", None)
    device = options.pop("device", None)
    extra_state = options.pop("extra_state", None)
    if device is not None:
        model_spec.model.to(device)
    return find_batch_size(
        model_spec.model,
        model_spec.batch_source(on_scan),
        device=device,
        **model_spec.step_options(optimizer),
        extra_state=model_spec.extra_state_items() if extra_state is None else extra_state,
        **options,
    )


def _child(request_path: str) -> int:
    """The child's side: load the file, run ``find_batch_size`` as asked, write the answer."""
    from maxbatch.run.modelfile import load_model_file

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    die_with_parent(request["parent"])  # a probe killed by SIGKILL leaves no trial running
    answer: dict[str, Any]
    try:
        spec = load_model_file(request["model_file"])
        options = {**request["options"], "estimate_first": False, "distributed": False}
        answer = {"result": find_in_file(spec, options).to_dict()}
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
