"""The profiler's time against the budget it prints, and the pick's spread over repeated probes.

Two parts (issues 21.2 and 17.6):

- **budget**: every bundled example that probes (``examples/*.py`` with a ``maxbatch probe``
  line) is probed as its docstring says, through the CLI in this process (``--json
  --no-cache``). Per row: the memory trials' seconds, the whole probe's, the profiler's (timed
  around the profile stage), the budget the profiler printed, whether the profiler stayed
  within it, and its share of the probe. Before issue 21 there was no budget for the whole
  profiler: the "budget" column then is the largest limit its reasons printed ("... would take
  the profiler past X s"), which the interleaved rounds did not count.
- **repeat**: ``--repeat N`` probes of the same model file (default 5 of ``examples/mlp.py``),
  then the sizes they set and the ceiling timed afterwards in interleaved rounds (the order
  reversed each round): each pick's throughput against the best of them, and the spread.

    python benchmarks/profiler_budget.py [--part budget|repeat|both] [--repeat 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from click.testing import CliRunner

import maxbatch.stages as stages
from maxbatch.cli import main
from maxbatch.modelfile import load_model_file
from maxbatch.spec import StepSpec
from maxbatch.timing import time_workload
from maxbatch.workload import build_workload

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {  # as each file's docstring runs it
    "mlp": ["--memory", "300MiB"],
    "cnn": ["--memory", "300MiB"],
    "transformer": ["--memory", "300MiB"],
    "sequences": ["--memory", "64MiB"],
    "noise_scale": ["--memory", "200MiB", "--max-batch", "1024"],
    "ddp": ["--memory", "64MiB"],
}
PRINTED = re.compile(r"past (?:its budget of )?([0-9.]+) s")


def probe(name: str, extra: list[str]) -> dict[str, Any]:
    """Probe one example through the CLI; time the profile stage around it."""
    spent: list[float] = []
    real: Callable[..., Any] = stages._profile

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    stages._profile = timed  # type: ignore[assignment]
    try:
        path = str(ROOT / "examples" / f"{name}.py")
        started = time.perf_counter()
        res = CliRunner().invoke(main, ["probe", path, *extra, "--json", "--no-cache"])
        wall = time.perf_counter() - started
    finally:
        stages._profile = real  # type: ignore[assignment]
    if res.exit_code != 0:
        raise SystemExit(f"{name}: exit {res.exit_code}: {res.output[-2000:]}")
    data = json.loads(res.stdout[res.stdout.index("{") :])
    texts = [data.get("profile_stop_reason") or ""]
    texts += [s["reason"] for s in data.get("profile_skipped") or ()]
    printed = [float(m) for t in texts for m in PRINTED.findall(t)]
    budget = data.get("profile_budget_seconds")
    if budget is None and printed:
        budget = max(printed)
    profiler = sum(spent)
    return {
        "example": name,
        "args": " ".join(extra),
        "ceiling": data["ceiling"],
        "pick": data["batch_size"],
        "confidence": data.get("pick_confidence"),
        "trials": len(data["trials"]),
        "trial_seconds": sum(t["seconds"] for t in data["trials"]),
        "probe_seconds": wall,
        "profiler_seconds": profiler,
        "budget_seconds": budget,
        "within": budget is not None and profiler <= budget,
        "share": profiler / wall,
    }


def budget_part(names: list[str]) -> list[dict[str, Any]]:
    """Print one row per example."""
    print(
        f"{'example':<12} {'ceiling':>7} {'pick':>5} {'conf':>6} {'trials':>6} {'trials s':>8} "
        f"{'probe s':>8} {'profiler s':>10} {'budget s':>8} {'within':>6} {'share':>6}"
    )
    rows = []
    for name in names:
        r = probe(name, EXAMPLES[name])
        rows.append(r)
        budget = "-" if r["budget_seconds"] is None else f"{r['budget_seconds']:.1f}"
        print(
            f"{name:<12} {r['ceiling']:>7} {r['pick']:>5} {r['confidence'] or '-':>6} "
            f"{r['trials']:>6} {r['trial_seconds']:>8.1f} {r['probe_seconds']:>8.1f} "
            f"{r['profiler_seconds']:>10.1f} {budget:>8} {'yes' if r['within'] else 'NO':>6} "
            f"{r['share']:>6.0%}",
            flush=True,
        )
    shares = [r["share"] for r in rows]
    print(
        f"profiler within its printed budget on {sum(r['within'] for r in rows)} of {len(rows)} "
        f"rows; its share of the probe: median {statistics.median(shares):.0%}, "
        f"range {min(shares):.0%} to {max(shares):.0%}"
    )
    return rows


def repeat_part(name: str, times: int, rounds: int) -> dict[str, Any]:
    """Probe ``name`` ``times`` times, then time what they set interleaved."""
    picks = []
    for k in range(times):
        r = probe(name, EXAMPLES[name])
        picks.append(r["pick"])
        print(f"probe {k + 1}: ceiling {r['ceiling']}, pick {r['pick']} ({r['confidence']})")
    ceiling = r["ceiling"]
    spec = load_model_file(ROOT / "examples" / f"{name}.py")
    sample = spec.make_batch if spec.make_batch is not None else spec.sample
    step = StepSpec.build(
        spec.model,
        sample,
        optimizer=spec.optimizer or "adamw",
        forward_fn=spec.forward,
        loss_fn=spec.loss,
    )
    sizes = sorted({*picks, ceiling})
    rates: dict[int, list[float]] = {b: [] for b in sizes}
    with build_workload(step, torch.device("cpu")) as work:
        for k in range(rounds):
            for b in sizes if k % 2 == 0 else sizes[::-1]:
                rates[b].append(b / statistics.median(time_workload(work, b)))
    rate = {b: statistics.median(v) for b, v in rates.items()}
    best = max(rate.values())
    share = [rate[b] / best for b in picks]
    print(f"picks {picks}; measured interleaved afterwards ({rounds} rounds):")
    for b in sizes:
        print(f"  {b:>6}: {rate[b]:,.1f} samples/s ({rate[b] / best:.1%} of the best)")
    print(
        f"picks within 5 % of the best: {sum(s >= 0.95 for s in share)} of {len(picks)}; "
        f"spread of the picks' throughput: {min(share):.1%} to {max(share):.1%} of the best"
    )
    return {"picks": picks, "ceiling": ceiling, "rates": rate, "share": share}


def main_() -> None:
    """Run the parts asked for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["budget", "repeat", "both"], default="both")
    parser.add_argument("--examples", default=",".join(EXAMPLES))
    parser.add_argument("--repeat", type=int, default=5, help="probes for the repeat part")
    parser.add_argument("--model", default="mlp", help="the example the repeat part probes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds afterwards")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {}
    if args.part in ("budget", "both"):
        out["budget"] = budget_part(args.examples.split(","))
    if args.part in ("repeat", "both"):
        out["repeat"] = repeat_part(args.model, args.repeat, args.rounds)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main_()
