"""Rendering: the printed table, the Markdown report and the JSON file (the chart: ``chart.py``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core import Row

COLUMNS = (
    # (title, key, alignment, width)
    ("workload", "workload", "<", 12),
    ("cap", "cap", ">", 6),
    ("true", "true", ">", 5),
    ("tool", "tool", "<", 19),
    ("answer", "answer", ">", 6),
    ("ans/true", "answer_over_true", ">", 8),
    ("ran", "answer_ran", ">", 3),
    ("trials", "trials", ">", 6),
    ("steps", "steps", ">", 5),
    ("steps/mb", "steps_vs_maxbatch", ">", 8),
    ("seconds", "seconds", ">", 7),
    ("time/mb", "time_vs_maxbatch", ">", 7),
    ("tput/best", "throughput_vs_best", ">", 9),
    ("note", "note", "<", 0),
)

SUMMARY_COLUMNS = (
    ("tool", "tool", "<", 19),
    ("exact", "exact", ">", 5),
    ("failed", "errors", ">", 6),
    ("ans/true med (min-max)", "accuracy", ">", 22),
    ("untested", "untested_answers", ">", 8),
    ("too big", "answers_that_do_not_fit", ">", 7),
    ("trials", "trials", ">", 6),
    ("steps", "steps", ">", 5),
    ("seconds", "seconds", ">", 7),
    ("steps/mb", "steps_vs_maxbatch_median", ">", 8),
    ("time/mb", "time_vs_maxbatch_median", ">", 7),
    ("steps/probe", "steps_vs_maxbatch_probe_median", ">", 11),
    ("time/probe", "time_vs_maxbatch_probe_median", ">", 10),
    ("tput/best med (min)", "speed", ">", 19),
)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "answer_ran":
        return "yes" if value else "NO"
    if "_vs_maxbatch" in key:
        return f"{value:.1f}x" if value >= 1 else f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def cells(row: Row) -> list[list[str]]:
    """The table's cells for one row: a line per tool, the workload and cap on the first."""
    lines = []
    for i, run in enumerate(row.runs):
        m = row.metrics(run)
        m.update(workload=row.workload, cap=row.cap, true=row.truth.ceiling)
        if i:
            m.update(workload="", cap="", true="")
        lines.append([_fmt(key, m[key]) for _, key, _, _ in COLUMNS])
    return lines


def _summary_cells(summary: Sequence[dict[str, Any]]) -> list[list[str]]:
    lines = []
    for s in summary:
        acc = "-"
        if s["answer_over_true_median"] is not None:
            acc = (
                f"{s['answer_over_true_median']:.2f} ({s['answer_over_true_min']:.2f}-"
                f"{s['answer_over_true_max']:.2f})"
            )
        speed = "-"
        if s["throughput_vs_best_median"] is not None:
            speed = f"{s['throughput_vs_best_median']:.2f} ({s['throughput_vs_best_min']:.2f})"
        s = {**s, "accuracy": acc, "speed": speed, "exact": f"{s['exact']}/{s['rows']}"}
        lines.append([_fmt(key, s[key]) for _, key, _, _ in SUMMARY_COLUMNS])
    return lines


def _text(columns: Sequence[tuple[str, str, str, int]], line: Sequence[str]) -> str:
    return "  ".join(
        f"{cell:{align}{width}}" for cell, (_, _, align, width) in zip(line, columns, strict=True)
    ).rstrip()


def header() -> str:
    """The printed table's header."""
    return _text(COLUMNS, [title for title, *_ in COLUMNS])


def format_row(row: Row) -> str:
    """The printed lines of one row."""
    return "\n".join(_text(COLUMNS, line) for line in cells(row))


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """The printed per-tool summary."""
    lines = [_text(SUMMARY_COLUMNS, [title for title, *_ in SUMMARY_COLUMNS])]
    lines += [_text(SUMMARY_COLUMNS, line) for line in _summary_cells(summary)]
    return "\n".join(lines)


def _markdown(columns: Sequence[tuple[str, str, str, int]], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(title for title, *_ in columns) + " |"]
    out.append(
        "|" + "|".join("---:" if align == ">" else "---" for _, _, align, _ in columns) + "|"
    )
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def markdown(
    rows: Sequence[Row],
    summary: Sequence[dict[str, Any]],
    info: dict[str, Any],
    chart: str | None,
) -> str:
    """The Markdown report: machine, per-tool summary, the full table, the chart."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    parts = [
        "# maxbatch and its peers",
        "",
        f"Command: `{info['command']}`, {info['date']}, wall time {info['wall_seconds']:.0f} s.",
        "",
        f"Machine: {info['cpu']} ({info['cpus']} CPUs), {info['platform']}, Python "
        f"{info['python']}, torch threads {info['torch_threads']}. Versions: {versions} "
        f"(maxbatch from commit {info.get('maxbatch_source', 'unknown')}).",
        "",
        "Columns are explained in `benchmarks/README.md` (section `run.py`).",
        "",
        "Workloads (each tool trains forward, loss, backward, AdamW):",
        "",
        *[f"- `{name}`: {text}" for name, text in info.get("workloads", {}).items()],
        "",
        "## Per tool",
        "",
        _markdown(SUMMARY_COLUMNS, _summary_cells(summary)),
        "",
        "## Every workload and cap",
        "",
        _markdown(COLUMNS, [line for row in rows for line in cells(row)]),
        "",
    ]
    if chart:
        parts += [f"![trials and answer / true per tool]({chart})", ""]
    return "\n".join(parts)


def write_json(
    path: Path, rows: Sequence[Row], summary: Sequence[dict[str, Any]], info: dict[str, Any]
) -> None:
    """Write machine, summary and every row (all trials, sizes and speeds) as JSON."""
    out = {"machine": info, "summary": list(summary), "rows": [r.to_dict() for r in rows]}
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
