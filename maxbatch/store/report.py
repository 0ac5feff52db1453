"""Rendering results: terminal text, Markdown and JSON, all pure functions of the records.

They take a :class:`~maxbatch.results.BatchSizeResult` and read its attributes; a saved
``report.json`` is read back into one (:func:`maxbatch.store.reportcheck.load_report`), so a saved
result renders exactly as a fresh one. What is not in the result (a title) is an argument.
"""

from __future__ import annotations

import json
from typing import Any

from maxbatch.results import BatchSizeResult, DeviceInfo, Estimate, NoiseScale, Throughput, Trial
from maxbatch.stats.noisestats import GROWS_NOTE
from maxbatch.units import format_bytes


def trial_line(index: int, trial: Trial) -> str:
    """One progress line for a finished trial."""
    verdict = "fits" if trial.fits else ("out of memory" if trial.oom else "over the usable memory")
    return (
        f"trial {index}: batch {trial.batch_size} {verdict} "
        f"(peak {format_bytes(trial.peak_bytes)}, {trial.seconds:.2f}s)"
    )


def point_line(point: Throughput) -> str:
    """One progress line for a timed batch size."""
    noisy = ", noisy" if point.noisy else ""
    return (
        f"timed batch {point.batch_size}: {point.samples_per_second:,.1f} samples/s "
        f"(median step {point.median_seconds * 1000:.1f} ms{noisy})"
    )


def result_json(result: BatchSizeResult, **extra: Any) -> str:
    """The result as indented JSON (its ``to_dict()``), with any extra keys (``model_file``)."""
    return json.dumps({**result.to_dict(), **extra}, indent=2)


def _header(r: BatchSizeResult) -> list[str]:
    kind = "virtual device" if r.virtual else "device"
    step = r.mode + (f", {r.precision}" if r.precision else "")
    if r.optimizer:
        step += f", {r.optimizer}"
    return [
        f"{kind} {r.device} ({r.device_name}): capacity {format_bytes(r.capacity_bytes)}, "
        f"headroom {format_bytes(r.headroom_bytes)}, usable {format_bytes(r.usable_bytes)}",
        f"step: {step}",
    ]


def _rows(r: BatchSizeResult) -> tuple[list[list[str]], list[list[str]]]:
    trials = [
        [
            str(t.batch_size),
            "yes" if t.fits else "no",
            format_bytes(t.peak_bytes),
            f"{t.seconds:.2f}",
        ]
        for t in r.trials
    ]
    points = [
        [
            str(p.batch_size),
            f"{p.samples_per_second:,.1f}",
            f"{p.median_seconds * 1000:.2f}",
            f"{p.iqr_seconds * 1000:.2f}" + (" (noisy)" if p.noisy else ""),
        ]
        for p in sorted(r.throughput, key=lambda p: p.batch_size)
    ]
    return trials, points


def _summary(r: BatchSizeResult) -> list[str]:
    lines = []
    mm = r.memory_model
    if mm:
        lines.append(
            f"memory model: {format_bytes(mm.fixed_bytes)} + "
            f"{format_bytes(mm.bytes_per_sample)} per sample"
        )
    source = ", estimated" if r.ceiling_source == "estimated" else ""
    lines.append(f"ceiling: {r.ceiling}{source} ({r.stop_reason})")
    lines.append(f"batch size: {r.batch_size} ({r.pick_reason})")
    lines.extend(profile_lines(r))
    world, steps = r.world_size, r.accumulation_steps
    if world > 1 or steps > 1:
        micro = r.global_batch_size // (world * steps)
        lines.append(
            f"global batch: {r.global_batch_size} = {micro} per rank x {world} rank(s) "
            f"x {steps} accumulation step(s)"
        )
    lines.extend(_noise_lines(r.noise_scale))
    if r.advice is not None:
        lines.extend(f"advice: {n}" for n in r.advice.notes)
    lines.extend(f"note: {n}" for n in r.notes)
    return lines


def profile_lines(r: BatchSizeResult) -> list[str]:
    """How sure the pick is, why the profiler stopped, and the sizes it skipped, by reason."""
    lines = []
    if r.pick_confidence:
        lines.append(f"pick confidence: {r.pick_confidence} ({r.pick_confidence_reason})")
    if r.profile_seconds is not None:
        budget = r.profile_budget_seconds
        within = "" if budget is None else f" of its {budget:.1f} s budget (rounds included)"
        lines.append(f"profiler: {r.profile_seconds:.1f} s{within}")
    if r.profile_stop_reason:
        lines.append(f"profiler stopped: {r.profile_stop_reason}")
    by_reason: dict[str, list[int]] = {}
    for s in r.profile_skipped:
        by_reason.setdefault(s.reason, []).append(s.batch_size)
    for reason, sizes in by_reason.items():
        lines.append(f"not timed: {', '.join(map(str, sizes))}: {reason}")
    return lines


def _noise_lines(ns: NoiseScale | None) -> list[str]:
    if ns is None:
        return []
    if ns.critical_batch is None:  # ``b_simple`` is not finite (JSON: null)
        value = "not resolved (the gradient was not above its noise)"
    else:
        value = f"B_simple ≈ {ns.b_simple:.4g} ± {ns.std_error:.2g}"
    return [
        f"noise scale: {value}; tr(Σ) {ns.trace_cov:.4g}, |G|² {ns.grad_sq_norm:.4g} "
        f"({ns.draws} draws of {ns.b_big // ns.b_small} x {ns.b_small} samples)",
        f"critical batch ≈ {ns.critical_batch or 'unknown'}: {GROWS_NOTE}",
        *(f"noise scale: {n}" for n in ns.notes),
    ]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    return [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *rows]
    ]


TRIAL_HEAD = ["batch", "fits", "peak", "seconds"]
POINT_HEAD = ["batch", "samples/s", "median ms", "IQR ms"]


def result_table(result: BatchSizeResult, *, title: str = "") -> str:
    """The trials and timings as short tables, then the answer."""
    trials, points = _rows(result)
    lines = ([title] if title else []) + _header(result) + [""] + _table(TRIAL_HEAD, trials)
    if points:
        lines += [""] + _table(POINT_HEAD, points)
    lines += [""] + _summary(result)
    lines.append(closing_line(result))
    return "\n".join(lines)


def closing_line(r: BatchSizeResult) -> str:
    """What this run did: trials, sizes timed, seconds; for a cache hit, the stored search apart.

    Returns:
        The line.
    """
    n, timed = len(r.trials), len(r.throughput)
    stored = r.cached_search
    if not r.from_cache or not stored:
        return f"{n} trials, {timed} sizes timed, {r.seconds:.1f}s"
    now = f"{n} trial{'' if n == 1 else 's'} run now (the check)" if n else "no trial (trusted)"
    return (
        f"from the cache: {now}, nothing timed, {r.seconds:.1f}s; the stored search: "
        f"{len(stored.trials)} trials, {timed} sizes timed, {stored.seconds:.1f}s"
    )


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def result_markdown(
    result: BatchSizeResult, *, title: str = "maxbatch report", images: bool = False
) -> str:
    """The result as a Markdown report.

    With ``images``, it links ``memory.png`` and ``throughput.png`` written beside it.

    Returns:
        The Markdown text.
    """
    trials, points = _rows(result)
    lines = [
        f"# {title}",
        "",
        f"**Batch size: {result.batch_size}** (ceiling {result.ceiling})",
        "",
    ]
    lines += [f"- {x}" for x in _header(result)] + [""]
    lines += ["## Probe trials", ""] + _md_table(TRIAL_HEAD, trials) + [""]
    if images:
        lines += ["![peak memory against batch size](memory.png)", ""]
    if points:
        lines += ["## Throughput", ""] + _md_table(POINT_HEAD, points) + [""]
        if images:
            lines += ["![throughput against batch size](throughput.png)", ""]
    lines += ["## Answer", ""] + [f"- {x}" for x in _summary(result)] + [""]
    return "\n".join(lines)


def devices_table(devices: list[DeviceInfo]) -> str:
    """The devices maxbatch can probe, one per line."""
    lines = [f"{'device':<8} {'total':>12} {'free':>12} {'others':>12}  name"]
    for d in devices:
        others = "-" if d.other_processes_bytes is None else format_bytes(d.other_processes_bytes)
        lines.append(
            f"{d.device:<8} {format_bytes(d.total_bytes):>12} {format_bytes(d.free_bytes):>12} "
            f"{others:>12}  {d.name}"
        )
    return "\n".join(lines)


def estimate_json(estimate: Estimate, **extra: Any) -> str:
    """The estimate as indented JSON (``to_dict()``, with ``ceiling`` for one capacity)."""
    data = estimate.to_dict()
    data.update(extra)
    return json.dumps(data, indent=2)


def estimate_table(estimate: Estimate, *, title: str = "") -> str:
    """The predicted ceilings, the memory model and the breakdown, marked as an estimate."""
    lines = [title] if title else []
    lines.append(
        f"ESTIMATE for target {estimate.target}, not a measurement: the step ran on fake tensors"
    )
    step = estimate.mode + (f", {estimate.precision}" if estimate.precision else "")
    if estimate.optimizer:
        step += f", {estimate.optimizer}"
    lines.append(f"step: {step}")
    if estimate.capacities:
        lines.append("")
        heads = ("capacity", "reserved", "headroom", "usable", "ceiling", "peak at ceiling")
        lines.append("  ".join(f"{h:>15}" for h in heads))
        for row in estimate.capacities:
            cells = [
                format_bytes(row.capacity_bytes),
                format_bytes(row.reserved_bytes),
                format_bytes(row.headroom_bytes),
                format_bytes(row.usable_bytes),
                "none fits" if row.ceiling is None else str(row.ceiling),
                "-" if row.peak_bytes is None else format_bytes(row.peak_bytes),
            ]
            lines.append("  ".join(f"{c:>15}" for c in cells))
        lines.extend(
            f"{format_bytes(row.capacity_bytes)}: {row.reason}"
            for row in estimate.capacities
            if row.ceiling is None
        )
    mm, b = estimate.memory_model, estimate.breakdown
    lines.append("")
    lines.append(
        f"memory model: {format_bytes(mm.fixed_bytes)} + {format_bytes(mm.bytes_per_sample)} "
        "per sample"
    )
    parts = (
        ("parameters", format_bytes(b.parameters_bytes)),
        ("gradients", format_bytes(b.gradients_bytes)),
        ("optimizer state", format_bytes(b.optimizer_bytes)),
        ("buffers", format_bytes(b.buffers_bytes)),
        ("inputs", f"{format_bytes(b.inputs_bytes_per_sample)} per sample"),
        ("activations", f"{format_bytes(b.activations_bytes_per_sample)} per sample"),
    )
    lines.extend(f"  {name:<16} {value}" for name, value in parts)
    asked = [(size, peak) for size, peak in estimate.peaks]
    if asked:
        lines.append("peaks: " + ", ".join(f"{s}: {format_bytes(p)}" for s, p in asked))
    lines.extend(f"note: {n}" for n in estimate.notes)
    lines.append(f"{estimate.fake_steps} fake trials in {estimate.seconds:.1f}s")
    return "\n".join(lines)
