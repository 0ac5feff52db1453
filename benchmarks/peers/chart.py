"""The PNG chart: trials per tool and answer / true ceiling per tool, one point per row."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from .core import Row


def draw(rows: Sequence[Row], tools: Sequence[str], path: Path, title: str) -> None:
    """Draw two panels (trials, answer / true), one point per workload and cap, to ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install -e ".[bench]"``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    colors = dict(zip(workloads, plt.get_cmap("tab10").colors, strict=False))
    fig, (ax_trials, ax_acc) = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    for x, tool in enumerate(tools):
        trials, accuracy = [], []
        for i, row in enumerate(rows):
            run = row.run(tool)
            if run is None:
                continue
            # Rows side by side (grouped by workload) so that equal values stay visible.
            dx = -0.3 + 0.6 * i / max(1, len(rows) - 1)
            first = all(r.workload != row.workload for r in rows[:i])
            label = row.workload if x == 0 and first else None
            style = {"color": colors[row.workload], "s": 22, "label": label, "zorder": 3}
            trials.append(len(run.attempts))
            ax_trials.scatter(x + dx, len(run.attempts), **style)
            if run.answer is not None:
                accuracy.append(run.answer / row.truth.ceiling)
                marker = "o" if run.answer_ran else "x"
                ax_acc.scatter(x + dx, accuracy[-1], marker=marker, **{**style, "label": None})
            else:  # the tool gave up: no answer
                ax_acc.scatter(x + dx, 0.02, marker="v", **{**style, "label": None})
        for ax, values in ((ax_trials, trials), (ax_acc, accuracy)):
            if values:
                m = statistics.median(values)
                ax.hlines(m, x - 0.38, x + 0.38, color="black", linewidth=2, zorder=4)
    for ax in (ax_trials, ax_acc):
        ax.set_xticks(range(len(tools)), tools, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.6, len(tools) - 0.4)
    ax_trials.set_ylabel("trials (batch sizes run), per workload and cap")
    ax_trials.set_title("Trials to an answer (fewer is better); bar: median")
    ax_trials.set_ylim(bottom=0)
    ax_acc.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax_acc.set_ylabel("answer / true ceiling")
    ax_acc.set_title("Answer / true ceiling (1 is exact); bar: median of the answers")
    ax_acc.text(
        0.01,
        0.06,
        "x: the tool never ran its answer    v (at 0): the tool gave up, no answer",
        transform=ax_acc.transAxes,
        fontsize=8,
    )
    ax_acc.set_ylim(0, 1.1)
    ax_trials.legend(title="workload", fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
