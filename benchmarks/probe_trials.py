"""Trials and wall time to the exact ceiling: maxbatch's search next to doubling + bisection.

For each bundled example model and each virtual-device cap, both tools look for the largest batch
size whose training step fits, in the same process and on the same virtual device:

- maxbatch: ``maxbatch.find_batch_size(..., memory=cap)`` with its defaults: on the CPU that is
  its search from the sample's size, without the fake-tensor estimate (``estimate_first=None``
  runs the estimate first only on CUDA);
- maxbatch + estimate (``estimate_first=True``): it starts from the ceiling its fake-tensor
  estimate predicts (``maxbatch.estimate.estimate``), so a right prediction needs two trials, and
  its time includes the fake trials;
- the baseline, doubling + bisection (the strategy of Lightning's ``binsearch`` batch-size finder):
  start at the sample's batch size, double until a size does not fit, then bisect between the last
  success and the first failure until they are adjacent. It runs each size with maxbatch's own trial
  (``maxbatch.search.trial.run_trial``), so it gets the same measurement, out-of-memory recovery and
  state restoration, and the only difference left is the choice of sizes.

Both must agree on the ceiling, and an independent check (``ceiling`` fits, ``ceiling + 1`` does
not) must confirm it; a disagreement is printed loudly and the script exits with status 1.

Run from the repository root::

    python benchmarks/probe_trials.py            # 3 models x 4 caps, a few minutes on 2 cores
    python benchmarks/probe_trials.py --quick    # 3 models x 2 caps, under a minute
    python benchmarks/probe_trials.py --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peers.workbench import Workbench, machine, virtual_device
from peers.workloads import adamw
from probe_models import MODELS as BUILT
from probe_models import forward, loss

import maxbatch
from maxbatch.errors import DoesNotFitError
from maxbatch.results import Trial
from maxbatch.run.modelfile import load_model_file
from maxbatch.step.batching import make_batch_fn
from maxbatch.units import format_bytes, parse_bytes

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
#: The bundled examples, then the models built in code (``probe_models.py``) whose peak bends.
MODELS = ("mlp", "cnn", "transformer", *BUILT)
#: The smallest cap leaves every example's ceiling 5x (cnn: 80 for 16) to 12x (mlp: 382 for 32)
#: its sample size; the largest keeps the default run to a few minutes on 2 cores.
CAPS = ("64MiB", "150MiB", "300MiB", "600MiB")
QUICK_CAPS = ("64MiB", "150MiB")


def load_example(name: str) -> Workbench:
    """Load ``examples/<name>.py`` with maxbatch's own model-file loader, or a built model."""
    if name in BUILT:
        model, sample = BUILT[name]()
        return Workbench(name=name, model=model, sample=sample, forward_fn=forward, loss_fn=loss)
    spec = load_model_file(EXAMPLES_DIR / f"{name}.py")
    return Workbench(
        name=name,
        model=spec.model,
        sample=spec.sample if spec.sample is not None else spec.make_batch,
        optimizer=spec.optimizer or adamw,
        forward_fn=spec.forward,
        loss_fn=spec.loss,
        train_step=spec.train_step,
    )


@dataclasses.dataclass(frozen=True)
class ToolRun:
    """What one tool found and what it cost."""

    ceiling: int
    trials: tuple[Trial, ...]
    seconds: float

    def sizes(self) -> list[tuple[int, bool]]:
        """The sizes tried, in order, with whether each fit."""
        return [(t.batch_size, t.fits) for t in self.trials]


@dataclasses.dataclass(frozen=True)
class Row:
    """One model at one cap: both tools, the verification, and any problem found."""

    model: str
    cap: str
    cap_bytes: int
    ceiling: int
    maxbatch_trials: int
    maxbatch_seconds: float
    baseline_ceiling: int
    baseline_trials: int
    baseline_seconds: float
    verified: bool
    maxbatch_sizes: list[tuple[int, bool]]
    baseline_sizes: list[tuple[int, bool]]
    first: str  # which tool ran first at this cap (in the first repeat)
    maxbatch_all_seconds: list[float] = dataclasses.field(default_factory=list)
    baseline_all_seconds: list[float] = dataclasses.field(default_factory=list)
    estimate_trials: int = 0  # maxbatch forced to start from the fake-tensor estimate's guess
    estimate_seconds: float = 0.0
    problems: tuple[str, ...] = ()

    @property
    def trials_ratio(self) -> float:
        """Baseline trials per maxbatch trial."""
        return self.baseline_trials / self.maxbatch_trials

    @property
    def time_ratio(self) -> float:
        """Baseline seconds per maxbatch second."""
        return self.baseline_seconds / self.maxbatch_seconds

    def to_dict(self) -> dict[str, Any]:
        """Return the row as a JSON-ready dict, ratios included."""
        d = dataclasses.asdict(self)
        d["trials_ratio"] = self.trials_ratio
        d["time_ratio"] = self.time_ratio
        return d


def start_size(sample: Any) -> int:
    """Where both searches start: the sample's batch size (2 for a ``make_batch`` function)."""
    _, size = make_batch_fn(sample)
    return size if size is not None else 2


def doubling_bisection(
    run: Callable[[int], Trial], start: int, *, usable_bytes: int
) -> tuple[int, list[Trial]]:
    """Lightning's ``binsearch``: double from ``start`` until a failure, then bisect to adjacency.

    If ``start`` itself does not fit, halve until a size fits (the bracket is then known).

    Returns:
        The largest size that fit (its neighbour above did not), and every trial in order.

    Raises:
        DoesNotFitError: batch size 1 does not fit.
    """
    trials: list[Trial] = []

    def fits(b: int) -> bool:
        trials.append(run(b))
        return trials[-1].fits

    lo, hi, b = 0, None, start
    while True:  # find one success
        if fits(b):
            lo = b
            break
        hi = b
        if b == 1:
            t = trials[-1]
            raise DoesNotFitError(
                "batch size 1 does not fit",
                batch_size=1,
                needed_bytes=t.peak_bytes,
                available_bytes=usable_bytes,
            )
        b //= 2
    while hi is None:  # double until a failure
        b = 2 * lo
        if fits(b):
            lo = b
        else:
            hi = b
    while hi - lo > 1:  # bisect
        b = (lo + hi) // 2
        if fits(b):
            lo = b
        else:
            hi = b
    return lo, trials


def run_baseline(bench: Workbench, cap_bytes: int) -> ToolRun:
    """Doubling + bisection with maxbatch's trials, timed from setup to restored state."""
    t0 = time.perf_counter()
    with virtual_device(bench, cap_bytes) as run:
        ceiling, trials = doubling_bisection(run, start_size(bench.sample), usable_bytes=cap_bytes)
    return ToolRun(ceiling, tuple(trials), time.perf_counter() - t0)


def run_maxbatch(
    bench: Workbench, cap_bytes: int, *, estimate_first: bool | None = None
) -> ToolRun:
    """``maxbatch.find_batch_size`` on a virtual device of ``cap_bytes``, timed end to end.

    ``estimate_first=None`` is maxbatch's default (on the CPU: no estimate); with True the search
    starts from the fake-tensor estimate's predicted ceiling and the time includes the fake trials.
    The profiler is off (``profile=False``): this benchmark times the search for the ceiling,
    as the baseline's time is; ``benchmarks/run.py`` times the whole call.
    """
    t0 = time.perf_counter()
    result = maxbatch.find_batch_size(
        bench.model,
        bench.sample,
        optimizer=bench.optimizer,
        loss_fn=bench.loss_fn,
        forward_fn=bench.forward_fn,
        train_step=bench.train_step,
        memory=cap_bytes,
        estimate_first=estimate_first,
        profile=False,
    )
    return ToolRun(result.ceiling, result.trials, time.perf_counter() - t0)


def run_maxbatch_with_estimate(bench: Workbench, cap_bytes: int) -> ToolRun:
    """maxbatch forced to start from the fake-tensor estimate's first guess."""
    return run_maxbatch(bench, cap_bytes, estimate_first=True)


def verify(bench: Workbench, cap_bytes: int, ceiling: int) -> tuple[Trial, Trial]:
    """Run ``ceiling`` and ``ceiling + 1`` afresh, as the first trials of a new virtual device.

    The first should fit and the second should not; the trials are returned to be checked.
    """
    with virtual_device(bench, cap_bytes) as run:
        return run(ceiling), run(ceiling + 1)


def warm_up(bench: Workbench, cap_bytes: int) -> None:
    """One untimed trial at the start size, so the first timed tool pays no first-call costs."""
    with virtual_device(bench, cap_bytes) as run:
        run(start_size(bench.sample))


def _fit_word(trial: Trial) -> str:
    return "fits" if trial.fits else "does not fit"


def _brackets(tool: ToolRun, ceiling: int) -> bool:
    """Whether the tool's own trials show ``ceiling`` fitting and ``ceiling + 1`` not."""
    done = dict(tool.sizes())
    return done.get(ceiling) is True and done.get(ceiling + 1) is False


def compare(
    bench: Workbench, cap: str | int, *, maxbatch_first: bool = True, repeats: int = 1
) -> Row:
    """Run both tools on ``bench`` at ``cap``, check that they agree, and verify the ceiling.

    With ``repeats`` > 1 each tool runs that many times (the order alternating) and the median
    wall time is reported; every repeat must try the same sizes.
    """
    cap_bytes = parse_bytes(cap, name="cap")
    tools = {
        "maxbatch": run_maxbatch,
        "maxbatch + estimate": run_maxbatch_with_estimate,
        "doubling+bisection": run_baseline,
    }
    runs: dict[str, list[ToolRun]] = {name: [] for name in tools}
    first = "maxbatch" if maxbatch_first else "doubling+bisection"
    for i in range(repeats):
        order = list(tools) if (i % 2 == 0) == maxbatch_first else list(reversed(tools))
        for name in order:
            runs[name].append(tools[name](bench, cap_bytes))
    mine, base = runs["maxbatch"][0], runs["doubling+bisection"][0]
    forced = runs["maxbatch + estimate"][0]
    problems = []
    if mine.ceiling != base.ceiling:
        problems.append(f"maxbatch found {mine.ceiling}, doubling+bisection {base.ceiling}")
    if forced.ceiling != mine.ceiling:
        problems.append(f"maxbatch found {mine.ceiling}, with the estimate {forced.ceiling}")
    for name, tool_runs in runs.items():
        tool = tool_runs[0]
        if not _brackets(tool, tool.ceiling):
            problems.append(f"{name} did not run {tool.ceiling} (fit) and {tool.ceiling + 1} (no)")
        if any(r.sizes() != tool.sizes() for r in tool_runs):
            problems.append(f"{name} tried different sizes in different repeats")
    at, above = verify(bench, cap_bytes, mine.ceiling)
    verified = at.fits and not above.fits
    if not verified:
        problems.append(
            f"a fresh rerun disagrees: {at.batch_size} {_fit_word(at)} (peak {at.peak_bytes} B), "
            f"{above.batch_size} {_fit_word(above)} (peak {above.peak_bytes} B), "
            f"cap {cap_bytes} B"
        )
    return Row(
        model=bench.name,
        cap=cap if isinstance(cap, str) else format_bytes(cap_bytes),
        cap_bytes=cap_bytes,
        ceiling=mine.ceiling,
        maxbatch_trials=len(mine.trials),
        maxbatch_seconds=statistics.median(r.seconds for r in runs["maxbatch"]),
        baseline_ceiling=base.ceiling,
        baseline_trials=len(base.trials),
        baseline_seconds=statistics.median(r.seconds for r in runs["doubling+bisection"]),
        verified=verified,
        maxbatch_sizes=mine.sizes(),
        baseline_sizes=base.sizes(),
        first=first,
        maxbatch_all_seconds=[r.seconds for r in runs["maxbatch"]],
        baseline_all_seconds=[r.seconds for r in runs["doubling+bisection"]],
        estimate_trials=len(forced.trials),
        estimate_seconds=statistics.median(r.seconds for r in runs["maxbatch + estimate"]),
        problems=tuple(problems),
    )


def _state(model: torch.nn.Module) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_model(
    bench: Workbench,
    caps: Sequence[str],
    report: Callable[[Row], None],
    *,
    repeats: int = 1,
) -> list[Row]:
    """Every cap for one model (tool order alternating per cap); check the model is unchanged."""
    before, training = _state(bench.model), bench.model.training
    warm_up(bench, parse_bytes(caps[0], name="cap"))
    rows = []
    for i, cap in enumerate(caps):
        row = compare(bench, cap, maxbatch_first=i % 2 == 0, repeats=repeats)
        after = _state(bench.model)
        if bench.model.training != training or any(
            not torch.equal(before[k], after[k]) for k in before
        ):
            row = dataclasses.replace(row, problems=(*row.problems, "model state changed"))
        report(row)
        rows.append(row)
    return rows


COLUMNS = (
    ("model", "<"),
    ("cap", ">"),
    ("ceiling", ">"),
    ("maxbatch trials", ">"),
    ("maxbatch s", ">"),
    ("+ estimate trials", ">"),
    ("+ est. s", ">"),
    ("doubling+bisection trials", ">"),
    ("d+b s", ">"),
    ("trials ratio", ">"),
    ("time ratio", ">"),
)
WIDTHS = tuple(max(len(name), 11) for name, _ in COLUMNS)


def _line(cells: Sequence[str]) -> str:
    parts = [
        f"{cell:{align}{width}}"
        for cell, (_, align), width in zip(cells, COLUMNS, WIDTHS, strict=True)
    ]
    return "  ".join(parts).rstrip()


def header() -> str:
    """The table's header line."""
    return _line([name for name, _ in COLUMNS])


def format_row(row: Row) -> str:
    """One table line; a disagreement shows both ceilings and is flagged."""
    ceiling = str(row.ceiling)
    if row.baseline_ceiling != row.ceiling:
        ceiling = f"{row.ceiling}/{row.baseline_ceiling}"
    line = _line(
        [
            row.model,
            row.cap,
            ceiling,
            str(row.maxbatch_trials),
            f"{row.maxbatch_seconds:.2f}",
            str(row.estimate_trials),
            f"{row.estimate_seconds:.2f}",
            str(row.baseline_trials),
            f"{row.baseline_seconds:.2f}",
            f"{row.trials_ratio:.1f}x",
            f"{row.time_ratio:.1f}x",
        ]
    )
    return line + ("  <-- MISMATCH" if row.problems else "")


def summary(rows: Sequence[Row]) -> str:
    """Totals over all rows and the median ratios."""
    mt = sum(r.maxbatch_trials for r in rows)
    et = sum(r.estimate_trials for r in rows)
    es = sum(r.estimate_seconds for r in rows)
    bt = sum(r.baseline_trials for r in rows)
    ms = sum(r.maxbatch_seconds for r in rows)
    bs = sum(r.baseline_seconds for r in rows)
    return (
        f"total: maxbatch {mt} trials {ms:.1f} s, with the estimate forced {et} trials "
        f"{es:.1f} s, "
        f"doubling+bisection {bt} trials {bs:.1f} s "
        f"(x{bt / mt:.1f} trials, x{bs / ms:.1f} time); "
        f"median ratio: trials x{statistics.median(r.trials_ratio for r in rows):.1f}, "
        f"time x{statistics.median(r.time_ratio for r in rows):.1f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0, or 1 when the tools disagree or a ceiling fails its check."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only the caps {QUICK_CAPS}")
    parser.add_argument("--caps", help=f"comma-separated caps (default: {','.join(CAPS)})")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated examples")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each tool per row; median time (default 1)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steady times on a shared machine; 0: torch's choice)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    caps = args.caps.split(",") if args.caps else list(QUICK_CAPS if args.quick else CAPS)
    names = args.models.split(",")
    repeats = args.repeats
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 (torch's choice) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [n for n in names if n not in BUILT and not (EXAMPLES_DIR / f"{n}.py").is_file()]
    if unknown:
        parser.error(f"no example {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    info = machine()
    print(
        f"machine: {info['cpu']} | torch threads: {info['torch_threads']} | torch {info['torch']} "
        f"| python {info['python']} | maxbatch {info['maxbatch']}"
    )
    print("virtual device on the CPU; training step with the model file's optimizer (or AdamW)")
    print(
        "maxbatch: its defaults without the profiler (on the CPU no fake-tensor estimate); "
        "+ estimate: "
        "estimate_first=True"
    )
    print()
    print(header(), flush=True)
    t0 = time.perf_counter()
    rows: list[Row] = []
    for name in names:
        bench = load_example(name)
        rows += run_model(bench, caps, lambda r: print(format_row(r), flush=True), repeats=repeats)
    print()
    print(summary(rows))
    print(f"wall time of the whole run: {time.perf_counter() - t0:.0f} s")

    if args.json:
        out = {"machine": info, "rows": [r.to_dict() for r in rows]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    bad = [r for r in rows if r.problems]
    for r in bad:
        print(f"MISMATCH {r.model} at {r.cap}: {'; '.join(r.problems)}", flush=True)
    if bad:
        print(f"probe_trials: {len(bad)} of {len(rows)} rows failed their checks", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
