"""``maxbatch probe``: run the real step and find the largest batch size that fits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from maxbatch.cli.exits import interruptible, run
from maxbatch.cli.lengths import Axis, length_options, run_length_axis, take
from maxbatch.cli.options import choices, scanned, start, step_keywords, workload_options
from maxbatch.cli.probeargs import ProbeArgs
from maxbatch.cli.progress import Progress
from maxbatch.cli.report import check_report, write_report_files
from maxbatch.devices.device import require_weights, resolve_device
from maxbatch.results import BatchSizeResult
from maxbatch.run import torchrun
from maxbatch.run.isolate import probe_file
from maxbatch.run.modelfile import ModelSpec
from maxbatch.run.unfinished import ProfileInterrupted
from maxbatch.settings import TOLERANCE, PickRule
from maxbatch.step.interrupt import Terminated
from maxbatch.step.loop import ZeroGrad
from maxbatch.store.report import result_json, result_table


@click.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps [default: cuda, mps, cpu]")
@click.option("--memory", default=None, help="cap live tensor bytes, e.g. 300MiB or 24GiB")
@click.option("--time-budget", type=float, default=None, help="seconds; stop with the best so far")
@click.option("--max-trials", type=int, default=None, help="trials; stop with the best so far")
@click.option("--no-profile", is_flag=True, help="skip the throughput profiler: pick the ceiling")
@click.option("--no-cache", is_flag=True, help="neither read nor write the result cache")
@click.option(
    "--isolate",
    is_flag=True,
    help="run each trial in a fresh process that loads MODEL_FILE (a killed one does not fit)",
)
@click.option(
    "--trial-timeout",
    type=float,
    default=None,
    metavar="SECONDS",
    help="with --isolate: seconds each child may run before its process group is killed "
    "[default: 600]",
)
@click.option(
    "--trust-cache", is_flag=True, help="use a cached answer without running its ceiling again"
)
@click.option(
    "--pick",
    type=choices(PickRule),
    default=PickRule.WITHIN.value,
    show_default=True,
    help="within: smallest size within --tolerance of the best throughput; fastest: the best",
)
@click.option(
    "--tolerance",
    type=float,
    default=TOLERANCE,
    show_default=True,
    help="share of the best throughput the within pick may give up",
)
@click.option("--dataset-size", type=int, default=None, help="samples per epoch (advice)")
@click.option("--global-batch", type=int, default=None, help="wanted batch per optimizer step")
@click.option("--base-batch", type=int, default=None, help="batch size BASE_LR was tuned at")
@click.option("--base-lr", type=float, default=None, help="a tuned learning rate to scale")
@click.option(
    "--noise-scale",
    is_flag=True,
    help="measure the gradient noise scale (the critical batch) and advise a global batch near it",
)
@click.option(
    "--zero-grad",
    type=choices(ZeroGrad),
    default=ZeroGrad.BEFORE_FORWARD.value,
    show_default=True,
    help="where your loop clears gradients (before_backward: Lightning; after_step: HF Trainer)",
)
@click.option(
    "--accumulate",
    type=int,
    default=1,
    show_default=True,
    help="micro-batches per optimizer step in your loop: trials accumulate them",
)
@click.option(
    "--allow-growth",
    default=None,
    help="live bytes a step may keep on purpose (e.g. 1MiB) before it is called a leak",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="write report.json, report.md and PNG plots into this folder",
)
@length_options
@workload_options(
    headroom_help="bytes kept free [default: 0 with --memory, else 5%]",
    inference_help="probe a forward pass under inference_mode",
    json_help="print the result as JSON",
    verbose_help="log each trial (-vv: debug)",
)
def probe(model_file: str, **given: Any) -> None:
    """Find the largest batch size whose real step fits, for the model in MODEL_FILE.

    Under torchrun every rank probes its own device and the ranks agree; rank 0 prints.
    """
    axis = take(given)  # --find length, --buckets: the length axis
    args = ProbeArgs.take(model_file, given)  # what stays is the step's (options.step_keywords)
    rank = run(args.debug, torchrun.init_from_env)

    def call(fn: Callable[[], Any]) -> Any:
        return run(args.debug, fn, rank=rank)

    model_spec = start(model_file, args.verbose, args.debug, rank=rank)
    report_dir = args.report_dir
    if report_dir is not None:
        call(lambda: check_report(report_dir))
    dev = call(lambda: resolve_device(torchrun.rank_device(args.device)))
    call(args.check_timeout)
    if axis.wanted:
        _length_axis(model_spec, axis, args, dev, given, rank=rank)
        return
    progress = Progress(rank)
    with interruptible(progress.done):
        result = call(lambda: _probe(model_spec, args, dev, progress, given))
    torchrun.leave()
    if rank:
        return
    # The answer first: a report that cannot be written (a full disk) must not lose it.
    _answer(result, args, tty=progress.tty)
    if args.report_dir is not None:
        with interruptible(progress.done):  # the temporary folder goes, no partial report stays
            write_report_files(result, Path(args.report_dir), model_file, args.debug)


def _answer(result: BatchSizeResult, args: ProbeArgs, *, tty: bool) -> None:
    """The answer on stdout (first ending a timing line that a terminal rewrites)."""
    if tty and result.throughput:
        click.echo("", err=True)
    if args.as_json:
        click.echo(result_json(result, model_file=args.model_file))
    else:
        click.echo(result_table(result, title=f"maxbatch probe {args.model_file}"))


def _probe(
    model_spec: ModelSpec, args: ProbeArgs, device: Any, progress: Progress, step: dict[str, Any]
) -> BatchSizeResult:
    """The library's one entry for a model file, :func:`~maxbatch.probe_file`, as asked.

    Returns:
        The result.

    Raises:
        Terminated: SIGTERM came while the sizes were timed (the ceiling is printed first).
        KeyboardInterrupt: Ctrl-C came then (likewise).
    """
    try:
        return probe_file(
            model_spec,
            device=device,
            on_scan=scanned,
            **args.keywords(progress),
            **step_keywords(**step),
        )
    except ProfileInterrupted as stop:  # the ceiling was verified: print it, then exit
        _answer(stop.result, args, tty=progress.tty)
        raise Terminated() if stop.terminated else KeyboardInterrupt() from None


def _length_axis(
    model_spec: ModelSpec,
    axis: Axis,
    args: ProbeArgs,
    device: Any,
    step: dict[str, Any],
    *,
    rank: int,
) -> None:
    """``--find length`` or ``--buckets`` instead of the batch-size probe."""
    extra = run(args.debug, model_spec.extra_state_items, rank=rank)
    if not args.isolate:  # refused below: the length axis does not isolate
        run(args.debug, lambda: require_weights(model_spec.model), rank=rank)
        model_spec.model.to(device)
    with interruptible(lambda: "during the length axis"):
        run_length_axis(
            model_spec,
            axis,
            debug=args.debug,
            as_json=args.as_json,
            report_dir=args.report_dir,
            isolate=args.isolate,
            rank=rank,
            step=step,
            device=device,
            memory=args.memory,
            extra_state=extra,
        )
