"""Rendering results for people (a terminal table) and machines (JSON); pure functions."""

from __future__ import annotations

import json
from typing import Any

from maxbatch.device import DeviceInfo
from maxbatch.results import BatchSizeResult, Trial
from maxbatch.units import format_bytes


def trial_line(index: int, trial: Trial) -> str:
    """One progress line for a finished trial."""
    verdict = "fits" if trial.fits else ("out of memory" if trial.oom else "over the usable memory")
    return (
        f"trial {index}: batch {trial.batch_size} {verdict} "
        f"(peak {format_bytes(trial.peak_bytes)}, {trial.seconds:.2f}s)"
    )


def result_json(result: BatchSizeResult, **extra: Any) -> str:
    """The result as indented JSON (``to_dict()`` plus any extra keys)."""
    data = result.to_dict()
    data.update(extra)
    return json.dumps(data, indent=2)


def result_table(result: BatchSizeResult, *, title: str = "") -> str:
    """The trials as a short table, then the answer."""
    lines = [title] if title else []
    cap = format_bytes(result.capacity_bytes)
    kind = "virtual device" if result.virtual else "device"
    lines.append(
        f"{kind} {result.device} ({result.device_name}): capacity {cap}, headroom "
        f"{format_bytes(result.headroom_bytes)}, usable {format_bytes(result.usable_bytes)}"
    )
    step = result.mode + (f", {result.precision}" if result.precision else "")
    if result.optimizer:
        step += f", {result.optimizer}"
    lines.append(f"step: {step}")
    lines.append("")
    lines.append(f"{'batch':>10}  {'fits':<5} {'peak':>12}  {'seconds':>8}")
    for t in result.trials:
        lines.append(
            f"{t.batch_size:>10}  {'yes' if t.fits else 'no':<5} "
            f"{format_bytes(t.peak_bytes):>12}  {t.seconds:>8.2f}"
        )
    lines.append("")
    if result.memory_model is not None:
        mm = result.memory_model
        lines.append(
            f"memory model: {format_bytes(mm.fixed_bytes)} + {format_bytes(mm.bytes_per_sample)} "
            "per sample"
        )
    lines.append(f"ceiling: {result.ceiling} ({result.stop_reason})")
    lines.append(f"batch size: {result.batch_size} ({result.pick_reason})")
    lines.extend(f"note: {n}" for n in result.notes)
    lines.append(f"{len(result.trials)} trials in {result.seconds:.1f}s")
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
