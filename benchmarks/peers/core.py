"""One row of the benchmark: a workload at a cap, the truth, every tool, throughput at answers."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from maxbatch.step.batching import batch_size_of
from maxbatch.units import format_bytes, parse_bytes

from .tools import ToolRun, run_tool
from .truth import Speed, Truth, brute_force, sweep_sizes, throughput
from .workloads import Spec


@dataclasses.dataclass(frozen=True)
class Row:
    """A workload at one cap: the true ceiling, each tool's run, and the throughput sweep.

    Attributes:
        workload: the workload's name.
        cap: the cap as given (e.g. ``"8MiB"``).
        cap_bytes: the cap in bytes.
        truth: the brute-force ceiling.
        runs: one run per tool, maxbatch first.
        speeds: throughput at every size of the sweep (none above the true ceiling).
    """

    workload: str
    cap: str
    cap_bytes: int
    truth: Truth
    runs: tuple[ToolRun, ...]
    speeds: tuple[Speed, ...]

    @property
    def best(self) -> Speed:
        """The fastest size of the sweep."""
        return max(self.speeds, key=lambda s: s.samples_per_second)

    def relative_speed(self, batch_size: int | None) -> float | None:
        """Throughput at ``batch_size`` over the best of the sweep; None if not in the sweep."""
        for s in self.speeds:
            if s.batch_size == batch_size:
                return s.samples_per_second / self.best.samples_per_second
        return None

    def run(self, tool: str) -> ToolRun | None:
        """The run of ``tool``, if it was run."""
        return next((r for r in self.runs if r.tool == tool), None)

    def metrics(self, run: ToolRun) -> dict[str, Any]:
        """The measured figures of one tool in this row (ratios against maxbatch's run)."""
        mine = self.run("maxbatch")
        true = self.truth.ceiling
        ok = run.error is None and run.answer is not None

        def ratio(value: float | None, base: float | None) -> float | None:
            return value / base if ok and value is not None and base else None

        return {
            "tool": run.tool,
            "answer": run.answer,
            "answer_over_true": run.answer / true if ok and run.answer is not None else None,
            "answer_ran": run.answer_ran,
            "fits": ok and run.answer is not None and run.answer <= true,
            "trials": len(run.attempts),
            "steps": run.steps,
            "steps_vs_maxbatch": ratio(run.steps, mine.steps if mine else None),
            "seconds": run.seconds,
            "time_vs_maxbatch": ratio(run.seconds, mine.seconds if mine else None),
            "steps_vs_maxbatch_probe": ratio(run.steps, mine.probe_steps if mine else None),
            "time_vs_maxbatch_probe": ratio(run.seconds, mine.probe_seconds if mine else None),
            "throughput_vs_best": self.relative_speed(run.answer),
            "pick": run.pick,
            "pick_throughput_vs_best": self.relative_speed(run.pick),
            "note": note(run, true, self.relative_speed(run.pick)),
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the row as a JSON-ready dict, each tool's figures included."""
        return {
            "workload": self.workload,
            "cap": self.cap,
            "cap_bytes": self.cap_bytes,
            "truth": self.truth.to_dict(),
            "best": self.best.to_dict(),
            "tools": [{**self.metrics(r), "run": r.to_dict()} for r in self.runs],
            "speeds": [s.to_dict() for s in self.speeds],
        }


def note(run: ToolRun, true: int, pick_speed: float | None = None) -> str:
    """What a reader should know about a tool's answer, in a few words."""
    if run.error is not None:
        return f"failed: {run.error[:80]}"
    parts = []
    if run.answer is not None and run.answer > true:
        parts.append(f"{run.answer} does not fit")
    if not run.answer_ran:
        parts.append(f"never ran its answer (largest that ran: {run.largest_ok})")
    if run.pick is not None:
        speed = "" if pick_speed is None else f" ({pick_speed:.2f} of best)"
        parts.append(f"pick {run.pick}{speed}")
    if run.probe_steps is not None and run.probe_seconds is not None:
        parts.append(
            f"probe {run.probe_steps} steps {run.probe_seconds:.2f} s, "
            f"profiler {run.timed_sizes} sizes"
        )
    return "; ".join(parts)


def measure(
    spec: Spec,
    cap: str,
    tools: Sequence[str],
    *,
    on_tool: Callable[[ToolRun], None] | None = None,
) -> Row:
    """Measure ``spec`` at ``cap``: the truth, then each tool in order, then the throughputs.

    The whole sweep is timed afresh for each row, its sizes interleaved, so that the sizes it
    compares were timed under the same load.
    """
    cap_bytes = parse_bytes(cap, name="cap")
    truth = brute_force(spec, cap_bytes)
    runs = []
    for tool in tools:
        runs.append(run_tool(tool, spec, cap_bytes))
        if on_tool is not None:
            on_tool(runs[-1])
    sample_size = batch_size_of(spec.build()[1])
    answers = [r.answer for r in runs] + [r.pick for r in runs]
    sizes = sweep_sizes(truth.ceiling, sample_size, answers)
    speeds = throughput(spec, sizes)
    return Row(
        spec.name,
        cap if isinstance(cap, str) else format_bytes(cap_bytes),
        cap_bytes,
        truth,
        tuple(runs),
        tuple(speeds[b] for b in sizes),
    )


def summarize(rows: Iterable[Row], tools: Sequence[str]) -> list[dict[str, Any]]:
    """Per tool, over all rows: accuracy, defects, cost, and throughput at the answer."""
    rows = list(rows)
    out = []
    for tool in tools:
        pairs = [(row, row.metrics(r)) for row in rows if (r := row.run(tool)) is not None]
        ms = [m for _, m in pairs]
        good = [m for m in ms if m["answer_over_true"] is not None]

        def values(key: str, among: list[dict[str, Any]] = good) -> list[float]:
            return [m[key] for m in among if m[key] is not None]

        def median(key: str) -> float | None:
            v = values(key)
            return statistics.median(v) if v else None

        acc = values("answer_over_true")
        out.append(
            {
                "tool": tool,
                "rows": len(ms),
                "errors": len(ms) - len(good),
                "exact": sum(m["answer"] == row.truth.ceiling for row, m in pairs),
                "answer_over_true_median": median("answer_over_true"),
                "answer_over_true_min": min(acc) if acc else None,
                "answer_over_true_max": max(acc) if acc else None,
                "untested_answers": sum(not m["answer_ran"] for m in good),
                "answers_that_do_not_fit": sum(not m["fits"] for m in good),
                "trials": sum(m["trials"] for m in ms),
                "steps": sum(m["steps"] for m in ms),
                "seconds": sum(values("seconds")),
                "steps_vs_maxbatch_median": median("steps_vs_maxbatch"),
                "time_vs_maxbatch_median": median("time_vs_maxbatch"),
                "steps_vs_maxbatch_probe_median": median("steps_vs_maxbatch_probe"),
                "time_vs_maxbatch_probe_median": median("time_vs_maxbatch_probe"),
                "throughput_vs_best_median": median("throughput_vs_best"),
                "throughput_vs_best_min": min(values("throughput_vs_best"), default=None),
                "pick_throughput_vs_best_median": median("pick_throughput_vs_best"),
            }
        )
    return out
