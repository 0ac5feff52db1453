"""``maxbatch probe --find length`` and ``--buckets``: the length axis on the command line.

The options reach ``probe`` in its ``**step`` keywords; :func:`take` pops them, and when one asks
for the length axis :func:`run_length_axis` runs it instead of the batch-size probe.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from maxbatch.buckets import BucketProfile, LengthResult, LengthTrial
from maxbatch.cli.exits import run
from maxbatch.cli.options import step_kwargs
from maxbatch.errors import ConfigError
from maxbatch.run.bucketsizes import find_bucket_sizes
from maxbatch.run.lengths import find_max_length
from maxbatch.run.modelfile import ModelSpec
from maxbatch.search.bucketbins import parse_buckets
from maxbatch.store.bucketreport import (
    bucket_markdown,
    bucket_table,
    length_markdown,
    length_table,
    write_bucket_plot,
)

F = TypeVar("F", bound=Callable[..., Any])


def length_options(command: F) -> F:
    """Add ``--find``, ``--batch-size``, ``--length-multiple-of``, ``--max-length``, ``--buckets``.

    Returns:
        The command with the options.
    """
    options = [
        click.option(
            "--find",
            type=click.Choice(["batch", "length"]),
            default="batch",
            show_default=True,
            help="batch: the largest batch size; length: the longest length at --batch-size",
        ),
        click.option(
            "--batch-size", type=int, default=None, help="the batch size of --find length"
        ),
        click.option(
            "--length-multiple-of",
            type=int,
            default=1,
            show_default=True,
            help="--find length tries only multiples of this",
        ),
        click.option("--max-length", type=int, default=None, help="longest length to try"),
        click.option(
            "--buckets",
            default=None,
            help="a batch size per length bucket: a count (8, cut from the data set's lengths) "
            "or upper lengths (64,128,256,512)",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclasses.dataclass(frozen=True, kw_only=True)
class Axis:
    """What the length options asked for."""

    find: str
    batch_size: int | None
    length_multiple_of: int
    max_length: int | None
    buckets: str | None

    @property
    def wanted(self) -> bool:
        """Whether the length axis runs instead of the batch-size probe."""
        return self.find == "length" or self.buckets is not None


def take(step: dict[str, Any]) -> Axis:
    """Pop the length options from ``probe``'s keywords.

    Returns:
        What they asked for.
    """
    return Axis(
        find=step.pop("find"),
        batch_size=step.pop("batch_size"),
        length_multiple_of=step.pop("length_multiple_of"),
        max_length=step.pop("max_length"),
        buckets=step.pop("buckets"),
    )


def _source(model_spec: ModelSpec) -> Any:
    if model_spec.dataset is not None:
        return model_spec.dataset
    if model_spec.make_batch is not None:
        return model_spec.make_batch
    raise ConfigError(
        "the length axis needs batches of any length: define make_batch(batch_size, length), "
        "or a dataset (with size_fn(item) giving an item's length)"
    )


def run_length_axis(
    model_spec: ModelSpec,
    axis: Axis,
    *,
    debug: bool,
    as_json: bool,
    report_dir: str | None,
    isolate: bool = False,
    rank: int = 0,
    **common: Any,
) -> None:
    """Run ``--find length`` or ``--buckets`` and print the answer (``--report``: files too).

    ``rank`` is this process's under torchrun (only rank 0 prints an error).
    """

    def call(fn: Callable[[], Any]) -> Any:
        return run(debug, fn, rank=rank)

    if isolate:
        call(_no_isolate)
        return
    count = 0

    def progress(trial: LengthTrial) -> None:
        nonlocal count
        count += 1
        verdict = "fits" if trial.fits else "does not fit"
        click.echo(
            f"trial {count}: batch {trial.batch_size} at length {trial.length}: {verdict} "
            f"({trial.seconds:.2f} s)",
            err=True,
        )

    step = common.pop("step")
    kwargs = step_kwargs(model_spec, **step)
    for unused in ("min_batch_size", "multiple_of"):
        kwargs.pop(unused)
    max_batch = kwargs.pop("max_batch_size")
    kwargs.update(common, on_trial=progress, size_fn=model_spec.size_fn)
    kwargs["collate_fn"] = model_spec.collate_fn
    source = _source(model_spec)
    answer: BucketProfile | LengthResult
    if axis.buckets is not None:
        buckets = call(lambda: parse_buckets(axis.buckets or ""))
        bucket_profile: BucketProfile = call(
            lambda: find_bucket_sizes(
                model_spec.model, source, buckets=buckets, max_batch_size=max_batch, **kwargs
            ),
        )
        answer = bucket_profile
        text = bucket_table(
            bucket_profile, title=f"maxbatch probe {model_spec.path} --buckets {axis.buckets}"
        )
    else:
        batch_size = axis.batch_size
        if batch_size is None:
            call(_needs_batch_size)
            return
        longest: LengthResult = call(
            lambda: find_max_length(
                model_spec.model,
                source,
                batch_size=batch_size,
                length_multiple_of=axis.length_multiple_of,
                max_length=axis.max_length,
                **kwargs,
            ),
        )
        answer = longest
        text = length_table(longest, title=f"maxbatch probe {model_spec.path} --find length")
    data = {**answer.to_dict(), "model_file": model_spec.path}
    if report_dir is not None:
        call(lambda: _write_report(answer, Path(report_dir), model_spec.path))
    click.echo(json.dumps(data, indent=2) if as_json else text)


def _no_isolate() -> None:
    raise ConfigError("--isolate does not run the length axis yet: run without --isolate")


def _needs_batch_size() -> None:
    raise ConfigError("--find length needs --batch-size N: the batch size to fit the length at")


def _write_report(answer: BucketProfile | LengthResult, out: Path, model_file: str) -> None:
    """report.json, report.md and (for a bucket profile) buckets.png."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**answer.to_dict(), "model_file": model_file}
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if isinstance(answer, BucketProfile):
        write_bucket_plot(answer, out / "buckets.png")
        markdown = bucket_markdown(answer, title=f"maxbatch: {model_file}")
        markdown += "\n![ceiling against length](buckets.png)\n"
    else:
        markdown = length_markdown(answer, title=f"maxbatch: {model_file}")
    (out / "report.md").write_text(markdown, encoding="utf-8")
