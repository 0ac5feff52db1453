"""Rendering of the length axis: the bucket table (text, Markdown), the longest length, the plot.

Pure functions of the records :class:`~maxbatch.buckets.BucketProfile` and
:class:`~maxbatch.buckets.LengthResult`, read by attribute; the library never prints. The plot
(``buckets.png``: the ceiling against length, the data set's length histogram beneath) needs
matplotlib (``pip install "maxbatch[plot]"``), imported when drawn.
"""

from __future__ import annotations

from pathlib import Path

from maxbatch.buckets import BucketProfile, LengthResult
from maxbatch.errors import ConfigError
from maxbatch.units import format_bytes

HEAD = ["lengths", "ceiling", "predicted", "batch size", "tokens/batch", "items", "share"]


def _rows(bucket_profile: BucketProfile) -> list[list[str]]:
    return [
        [
            f"{b.min_length}-{b.max_length}",
            str(b.ceiling),
            "-" if b.predicted_ceiling is None else str(b.predicted_ceiling),
            str(b.batch_size),
            str(b.tokens_per_batch),
            str(b.items),
            f"{100 * b.share:.1f}%",
        ]
        for b in bucket_profile.buckets
    ]


def _model_line(result: BucketProfile | LengthResult) -> str | None:
    m = result.memory_model
    if m is None:
        return None
    return (
        f"memory model: {format_bytes(int(m.fixed_bytes))} + b x ("
        f"{m.bytes_per_sample:.0f} B + {m.bytes_per_token:.1f} B x L + "
        f"{m.bytes_per_token_pair:.3f} B x L^2)"
    )


def _summary(bucket_profile: BucketProfile) -> list[str]:
    usable = bucket_profile.usable_bytes
    lines = [
        f"device {bucket_profile.device}, usable {format_bytes(usable) if usable else '?'}; "
        f"{len(bucket_profile.trials)} real trials in {bucket_profile.seconds:.1f} s "
        f"(budget 2 x buckets + 2 = {2 * len(bucket_profile.buckets) + 2})",
    ]
    model = _model_line(bucket_profile)
    if model:
        lines.append(model)
    lhotse = bucket_profile.to_lhotse().items()  # its form, under lhotse's own names
    lines.append("lhotse/NeMo: " + " ".join(f"{name}={values}" for name, values in lhotse))
    lines += [f"note: {n}" for n in bucket_profile.notes]
    return lines


def bucket_table(bucket_profile: BucketProfile, *, title: str = "") -> str:
    """The bucket profile as a text table with its summary lines.

    Returns:
        The text.
    """
    rows = [HEAD, *_rows(bucket_profile)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    lines = [title] if title else []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *_summary(bucket_profile)])


def bucket_markdown(
    bucket_profile: BucketProfile, *, title: str = "maxbatch bucket profile"
) -> str:
    """The bucket profile as a Markdown table with its summary lines.

    Returns:
        The Markdown text.
    """
    lines = [f"# {title}", "", "| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(bucket_profile)]
    return "\n".join([*lines, "", *(f"- {line}" for line in _summary(bucket_profile)), ""])


def length_table(result: LengthResult, *, title: str = "") -> str:
    """The answer of ``--find length`` as text.

    Returns:
        The text.
    """
    usable = result.usable_bytes
    grid = result.length_multiple_of
    lines = [title] if title else []
    tried = f"multiples of {grid}" if grid > 1 else ""
    if result.longest_item is not None:  # a data set: its longest item that fits
        tried = f"a data set's item; tried at {tried}" if tried else "a data set's item"
    lines.append(
        f"longest length at batch size {result.batch_size}: {result.max_length}"
        + (f" ({tried})" if tried else "")
    )
    lines.append(
        f"device {result.device}, usable {format_bytes(usable) if usable else '?'}; "
        f"{len(result.trials)} real trials in {result.seconds:.1f} s"
    )
    model = _model_line(result)
    if model:
        lines.append(model)
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def length_markdown(result: LengthResult, *, title: str = "maxbatch longest length") -> str:
    """The answer of ``--find length`` as Markdown: the title, then the text.

    Returns:
        The Markdown text.
    """
    return f"# {title}\n\n{length_table(result)}\n"


def write_bucket_plot(bucket_profile: BucketProfile, path: str | Path) -> Path:
    """Draw the ceiling against length, with the data set's length histogram beneath.

    Returns:
        The path written.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError('plots need matplotlib: pip install "maxbatch[plot]"') from e
    fig = Figure(figsize=(7.5, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    buckets = bucket_profile.buckets
    uppers = [b.max_length for b in buckets]
    top.step(uppers, [b.ceiling for b in buckets], where="pre", color="#1f77b4", label="ceiling")
    top.plot(uppers, [b.ceiling for b in buckets], "o", color="#1f77b4")
    predicted = [(b.max_length, b.predicted_ceiling) for b in buckets]
    shown = [(n, c) for n, c in predicted if c is not None]
    if shown:
        top.plot(*zip(*shown, strict=True), "x", color="#7f7f7f", label="predicted before trials")
    top.set_ylabel("largest batch size")
    top.set_title("batch size that fits, per length bucket")
    top.legend()
    bars = bucket_profile.histogram
    if bars:
        bottom.bar(
            [(lo + hi) / 2 for lo, hi, _ in bars],
            [n for _, _, n in bars],
            width=[hi - lo + 1 for lo, hi, _ in bars],
            color="#7f7f7f",
        )
    bottom.set_xlabel("length (upper end of the bucket)")
    bottom.set_ylabel("items")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
