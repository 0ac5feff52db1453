"""maxbatch next to its peers, side by side, on the same models, samples and virtual devices.

Peers (``pip install -e ".[bench]"``): Lightning's ``Tuner.scale_batch_size`` (modes
``binsearch`` and ``power``), Accelerate's ``find_executable_batch_size``, torch-max-mem's
``maximize_memory_utilization`` and toma's ``toma.batch``. For each workload and cap it measures
the true ceiling (brute force), each tool's answer, whether the tool ran its answer, its steps and
wall time, and the throughput at its answer against the best of a sweep. See
``benchmarks/README.md`` for the columns and every adaptation.

Run from the repository root::

    python benchmarks/run.py --quick     # 5 workloads x 2 caps, under 10 minutes on 2 cores
    python benchmarks/run.py             # 5 workloads x 3 caps, the committed results
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peers import chart, report
from peers.core import Row, measure, summarize
from peers.tools import INSTALL, LIGHTNING_MAX_TRIALS, START, STEPS, TOOLS, available
from peers.truth import REPLICATES, WARMUP
from peers.workbench import machine
from peers.workloads import WORKLOADS

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("maxbatch", "torch", "lightning", "accelerate", "torch-max-mem", "toma", "matplotlib")


def versions() -> dict[str, str]:
    """Installed versions of maxbatch, torch and the peers."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def source() -> str:
    """The commit maxbatch ran from, marked ``+changes`` when ``maxbatch/`` differs from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", "maxbatch") else "")


def problems(rows: Sequence[Row]) -> list[str]:
    """Checks that must hold: the truth is verified and maxbatch's answer equals it."""
    found = []
    for row in rows:
        where = f"{row.workload} at {row.cap}"
        if not row.truth.verified:
            found.append(f"{where}: a fresh rerun does not confirm the brute-force ceiling")
        mine = row.run("maxbatch")
        if mine is not None and mine.answer != row.truth.ceiling:
            found.append(f"{where}: maxbatch answered {mine.answer}, true {row.truth.ceiling}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write JSON, Markdown and PNG; 1 if a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each workload at its 2 quick caps")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"directory (default {RESULTS})")
    parser.add_argument("--name", help="file stem (default: peers, or peers-quick with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    tools = args.tools.split(",")
    bad = [t for t in tools if t not in TOOLS]
    if bad or tools[0] != "maxbatch":
        parser.error(f"--tools must start with maxbatch and name only: {', '.join(TOOLS)}")
    missing = [t for t in tools if not available(t)]
    if missing:
        print(f"skipping {', '.join(missing)}: not installed ({INSTALL})", file=sys.stderr)
        tools = [t for t in tools if t not in missing]
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    stem = args.name or ("peers-quick" if args.quick else "peers")

    info: dict[str, Any] = {
        **machine(),
        "cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]])
        if argv is None
        else shlex.join(["python", "benchmarks/run.py", *argv]),
        "versions": versions(),
        "maxbatch_source": source(),
        "workloads": {n: WORKLOADS[n].description for n in names},
        "settings": {
            "quick": args.quick,
            "tools": tools,
            "steps_per_attempt": STEPS,
            "downward_start": START,
            "lightning_max_trials": LIGHTNING_MAX_TRIALS,
            "throughput_warmup_steps": WARMUP,
            "throughput_timed_steps": REPLICATES,
        },
    }
    print(
        f"machine: {info['cpu']} ({info['cpus']} CPUs) | torch threads {info['torch_threads']} | "
        + " | ".join(f"{k} {v}" for k, v in info["versions"].items())
    )
    print(f"start of accelerate/torch-max-mem/toma: {START}; {STEPS} steps per attempt")
    print()
    print(report.header(), flush=True)
    t0 = time.perf_counter()
    rows: list[Row] = []
    for name in names:
        spec = WORKLOADS[name]
        for cap in spec.quick_caps if args.quick else spec.caps:
            rows.append(measure(spec, cap, tools))
            print(report.format_row(rows[-1]), flush=True)
    info["wall_seconds"] = time.perf_counter() - t0
    summary = summarize(rows, tools)
    print()
    print(report.format_summary(summary))
    print(f"wall time of the whole run: {info['wall_seconds']:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    png: str | None = f"{stem}.png"
    try:
        chart.draw(rows, tools, args.out / f"{stem}.png", f"maxbatch and its peers ({stem})")
    except ImportError:
        print(f"no chart: matplotlib is not installed ({INSTALL})", file=sys.stderr)
        png = None
    report.write_json(args.out / f"{stem}.json", rows, summary, info)
    (args.out / f"{stem}.md").write_text(
        report.markdown(rows, summary, info, png), encoding="utf-8"
    )
    print(f"wrote {args.out / stem}.json, .md" + (", .png" if png else ""))
    found = problems(rows)
    for p in found:
        print(f"PROBLEM {p}", flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
