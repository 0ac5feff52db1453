"""``maxbatch report`` and ``probe --report``: report folders written and rendered again."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from maxbatch.buckets import BucketProfile, LengthResult
from maxbatch.cli.exits import run
from maxbatch.errors import ReportWriteError
from maxbatch.results import BatchSizeResult
from maxbatch.store.bucketreport import bucket_markdown, bucket_table, length_markdown, length_table
from maxbatch.store.plots import write_plots
from maxbatch.store.report import result_json, result_markdown, result_table
from maxbatch.store.reportfiles import check_report_dir, load_report, write_report


@click.command()
@click.argument("report_file", type=click.Path(dir_okay=False))
@click.option("--markdown", is_flag=True, help="render as Markdown instead of text")
@click.option("--debug", is_flag=True, help="show tracebacks")
def report(report_file: str, markdown: bool, debug: bool) -> None:
    """Render a saved report.json again (of a probe, --buckets or --find length)."""
    saved = run(debug, lambda: load_report(report_file))
    title = f"maxbatch: {report_file if saved.model_file is None else saved.model_file}"
    click.echo(_rendered(saved.result, title=title, markdown=markdown))


def _rendered(
    answer: BatchSizeResult | BucketProfile | LengthResult, *, title: str, markdown: bool
) -> str:
    """The answer as ``probe`` printed it (text), or as its report.md (Markdown, no images)."""
    if isinstance(answer, BucketProfile):
        render = bucket_markdown if markdown else bucket_table
        return render(answer, title=title)
    if isinstance(answer, LengthResult):
        return (
            length_markdown(answer, title=title) if markdown else length_table(answer, title=title)
        )
    return result_markdown(answer, title=title) if markdown else result_table(answer, title=title)


NO_PLOTS = (
    'plots skipped: they need matplotlib: pip install "maxbatch[plot]" '
    '(from a clone: pip install -e ".[plot]")'
)


def check_report(report_dir: str) -> None:
    """Check the report folder before the first trial (the plots are optional, see below)."""
    check_report_dir(report_dir)


def _can_plot() -> bool:
    """Whether matplotlib imports; without it report.json and report.md are still written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


#: The answer was printed, but the ``--report`` files could not be written (a full disk).
EXIT_REPORT_NOT_WRITTEN = 3


def write_report_files(
    result: BatchSizeResult, out: Path, model_file: str, debug: bool = False
) -> None:
    """Write report.json, report.md and the plots into ``out``, through a temporary folder.

    Files that cannot be written (a full disk, a file system that refuses them) leave nothing
    behind and end the command with one line and exit 3: the answer was printed before.
    """
    plots = _can_plot()

    def write(folder: Path) -> list[str]:
        text = result_json(result, model_file=model_file)
        (folder / "report.json").write_text(text + "\n", encoding="utf-8")
        images = write_plots(result, folder) if plots else []
        markdown = result_markdown(result, title=f"maxbatch: {model_file}", images=bool(images))
        (folder / "report.md").write_text(markdown, encoding="utf-8")
        return ["report.json", "report.md", *(p.name for p in images)]

    try:
        written = write_report(out, write)
    except ReportWriteError as e:
        if debug:
            traceback.print_exception(e)
        else:
            click.echo(f"maxbatch: error: {e}", err=True)
        sys.exit(EXIT_REPORT_NOT_WRITTEN)
    click.echo(f"report written to {out}: {', '.join(written)}", err=True)
    if not plots:
        click.echo(NO_PLOTS, err=True)
