"""PNG plots of a result: peak memory of each trial, and throughput per batch size.

Pure functions of a :class:`~maxbatch.results.BatchSizeResult`, read by attribute.
matplotlib is an optional dependency (``pip install "maxbatch[plot]"``), imported when a plot is
drawn. The figures use matplotlib's object API with the Agg canvas, so the user's pyplot backend
and global state are left alone.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from maxbatch.errors import ConfigError
from maxbatch.results import BatchSizeResult, MemoryPoint, Trial
from maxbatch.units import format_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB, GIB = 1024**2, 1024**3
FITS, FAILS, MODEL, LIMIT, PICK = "#1f77b4", "#d62728", "#7f7f7f", "#2ca02c", "#ff7f0e"


def write_plots(result: BatchSizeResult, out_dir: str | Path) -> list[Path]:
    """Draw ``memory.png`` and ``throughput.png`` for a result into ``out_dir``.

    Args:
        result: the result: its ``trials``, ``memory`` (more peaks to draw), the capacity, the
            memory model, the ceiling and the pick; ``throughput`` for the second plot. Parts
            that are empty (no memory model, no timed size) are left out of a plot.
        out_dir: the folder to write to (created if needed).

    Returns:
        The paths written: ``memory.png`` when there are trials or peaks, ``throughput.png``
        when there are throughput points.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError('plots need matplotlib: pip install "maxbatch[plot]"') from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if result.trials or result.memory:
        fig = Figure(figsize=(7.5, 4.6), layout="constrained")
        _memory(fig.add_subplot(), result)
        written.append(_save(fig, out / "memory.png"))
    if result.throughput:
        fig = Figure(figsize=(7.5, 4.6), layout="constrained")
        _throughput(fig, fig.add_subplot(), result)
        written.append(_save(fig, out / "throughput.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


def _title(result: BatchSizeResult, what: str) -> str:
    where = result.device_name or result.device
    kind = "virtual device" if result.virtual else None
    detail = ", ".join(str(x) for x in (result.device, kind) if x)
    return f"{what} on {where}" + (f" ({detail})" if detail and detail != where else "")


def _memory(ax: Axes, result: BatchSizeResult) -> None:
    trials, extra = result.trials, result.memory
    measured: list[Trial | MemoryPoint] = [*trials, *extra]
    usable, capacity = result.usable_bytes, result.capacity_bytes
    model, ceiling = result.memory_model, result.ceiling
    peaks = [t.peak_bytes for t in measured] + [usable or 0, capacity or 0]
    scale, unit = (GIB, "GiB") if max(peaks) >= GIB else (MIB, "MiB")
    sizes = [t.batch_size for t in measured] + [ceiling or 0]
    right = max(sizes) * 1.08
    if model:
        fixed, per = model.fixed_bytes, model.bytes_per_sample
        label = f"memory model: {format_bytes(fixed)} + {format_bytes(per)} × batch"
        line = [fixed / scale, (fixed + per * right) / scale]
        ax.plot([0, right], line, "--", c=MODEL, lw=1, label=label)
    if usable:
        ax.axhline(usable / scale, c=LIMIT, lw=1.5, label=f"usable {usable / scale:,.2f} {unit}")
    if capacity and capacity != usable:
        ax.axhline(capacity / scale, c=LIMIT, lw=1, ls=":", label="capacity (before headroom)")
    if extra:
        ax.plot(
            [m.batch_size for m in extra],
            [m.peak_bytes / scale for m in extra],
            "d",
            c=MODEL,
            ms=4,
            label="other measured peaks",
        )
    # Trial numbers show the search's path; a fit's sits below its point, a failure's above, so
    # the verifying pair (ceiling, ceiling + 1) stays readable.
    styles = ((True, "o", FITS, "fits", -12), (False, "X", FAILS, "fails", 5))
    for fits, marker, colour, label, dy in styles:
        group = [(i, t) for i, t in enumerate(trials, 1) if bool(t.fits) is fits]
        if not group:
            continue
        xs = [t.batch_size for _, t in group]
        ys = [t.peak_bytes / scale for _, t in group]
        ax.plot(xs, ys, marker, c=colour, ms=8, ls="none", label=f"trial: {label}", zorder=3)
        for (i, _), x, y in zip(group, xs, ys, strict=True):
            ax.annotate(str(i), (x, y), xytext=(6, dy), textcoords="offset points", fontsize=8)
    if ceiling:
        ax.axvline(ceiling, c=FITS, lw=1, ls=":", label=f"ceiling {ceiling}")
    ax.set_xlim(0, right)
    ax.set_ylim(0, max(peaks) / scale * 1.12)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"peak memory ({unit})")
    ax.set_title(_title(result, "Peak memory per trial"), fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _throughput(fig: Figure, ax: Axes, result: BatchSizeResult) -> None:
    points = sorted(result.throughput, key=lambda p: p.batch_size)
    xs = [p.batch_size for p in points]
    ys = [p.samples_per_second for p in points]
    # The IQR is of step seconds; drawn as samples/s it spans b / (median ± IQR / 2).
    low, high = [], []
    for p, y in zip(points, ys, strict=True):
        b, median, half = p.batch_size, p.median_seconds, p.iqr_seconds / 2
        low.append(y - b / (median + half))
        high.append((b / (median - half) if median > half else 2 * y) - y)
    ax.errorbar(xs, ys, yerr=[low, high], fmt="-", c=FITS, lw=1, capsize=3, label="median, IQR")
    steady = [(x, y) for p, x, y in zip(points, xs, ys, strict=True) if not p.noisy]
    noisy = [(x, y) for p, x, y in zip(points, xs, ys, strict=True) if p.noisy]
    if steady:
        ax.plot(*zip(*steady, strict=True), "o", c=FITS, ms=6, label="timed size")
    if noisy:
        ax.plot(*zip(*noisy, strict=True), "o", mfc="white", c=FITS, ms=6, label="noisy (IQR)")
    chosen = result.batch_size
    if chosen in xs:
        y = ys[xs.index(chosen)]
        ax.plot([chosen], [y], "*", c=PICK, ms=18, mec="black", zorder=4, label=f"pick {chosen}")
    ceiling = result.ceiling
    if ceiling:
        ax.axvline(ceiling, c=FAILS, lw=1, ls=":", label=f"ceiling {ceiling}")
    if max(xs) >= 8 * min(xs):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter("{x:g}")
    ax.set_ylim(0, max(y + h for y, h in zip(ys, high, strict=True)) * 1.1)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / second")
    fig.suptitle(_title(result, "Throughput of the real step"), fontsize=11)
    if result.pick_reason:
        reason = textwrap.fill(f"pick {chosen}: {result.pick_reason}", 110)
        ax.set_title(reason, fontsize=8, loc="left")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
