"""``maxbatch probe``: run the real step and find the largest batch size that fits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from maxbatch.cli import exits
from maxbatch.cli.exits import interruptible, run
from maxbatch.cli.lengths import length_options, run_length_axis, take
from maxbatch.cli.options import scanned, start, step_kwargs, workload_options
from maxbatch.cli.report import check_report, write_report_files
from maxbatch.devices.device import device_label, require_weights, resolve_device
from maxbatch.errors import ConfigError
from maxbatch.results import Throughput, Trial
from maxbatch.run import torchrun
from maxbatch.run.finder import find_batch_size
from maxbatch.run.modelfile import ModelSpec
from maxbatch.run.unfinished import ProfileInterrupted
from maxbatch.settings import TOLERANCE
from maxbatch.step.interrupt import Terminated
from maxbatch.store.report import point_line, result_json, result_table, trial_line


@click.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps [default: cuda, mps, cpu]")
@click.option("--memory", default=None, help="cap live tensor bytes, e.g. 300MiB or 24GiB")
@click.option("--time-budget", type=float, default=None, help="seconds; stop with the best so far")
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
    type=click.Choice(["within", "fastest"]),
    default="within",
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
    type=click.Choice(["before_forward", "before_backward", "after_step"]),
    default="before_forward",
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
def probe(
    model_file: str,
    device: str | None,
    memory: str | None,
    time_budget: float | None,
    no_profile: bool,
    no_cache: bool,
    isolate: bool,
    trial_timeout: float | None,
    trust_cache: bool,
    pick: str,
    tolerance: float,
    dataset_size: int | None,
    global_batch: int | None,
    base_batch: int | None,
    base_lr: float | None,
    noise_scale: bool,
    zero_grad: str,
    accumulate: int,
    allow_growth: str | None,
    report_dir: str | None,
    as_json: bool,
    verbose: int,
    debug: bool,
    **step: Any,
) -> None:
    """Find the largest batch size whose real step fits, for the model in MODEL_FILE.

    Under torchrun every rank probes its own device and the ranks agree; rank 0 prints.
    """
    axis = take(step)  # --find length, --buckets: the length axis
    rank = exits.rank = run(debug, torchrun.init_from_env)
    spec = start(model_file, verbose, debug)
    extra = run(debug, spec.extra_state_items)
    _check_report(debug, report_dir)
    dev = run(debug, lambda: resolve_device(torchrun.rank_device(device)))
    run(debug, lambda: _loop_options(isolate, zero_grad, accumulate, allow_growth))
    if not isolate:  # isolated: only the children touch the device
        run(debug, lambda: require_weights(spec.model))
        spec.model.to(dev)
    if axis.wanted:
        with interruptible(lambda: "during the length axis"):
            run_length_axis(
                spec,
                axis,
                debug=debug,
                as_json=as_json,
                report_dir=report_dir,
                isolate=isolate,
                step=step,
                device=dev,
                memory=memory,
                extra_state=extra,
            )
        return
    count = 0

    tty = sys.stderr.isatty()

    def progress(trial: Trial) -> None:
        nonlocal count
        count += 1
        if rank:
            return
        click.echo(trial_line(count, trial), err=True)

    def timed(point: Throughput) -> None:
        if rank:
            return
        # On a terminal the timing line rewrites itself; in a log, one line per size.
        if tty:
            click.echo("\r\033[K" + point_line(point), err=True, nl=False)
        else:
            click.echo(point_line(point), err=True)

    def trials() -> str:
        return f"after {count} trial{'' if count == 1 else 's'}"

    options = {
        "time_budget": time_budget,
        "on_trial": progress,
        "profile": not no_profile,
        "pick": pick,
        "tolerance": tolerance,
        "on_point": timed,
        "dataset_size": dataset_size,
        "global_batch": global_batch,
        "base_batch": base_batch,
        "base_lr": base_lr,
        "noise_scale": noise_scale,
    }
    with interruptible(trials):
        if isolate:
            result = run(
                debug,
                lambda: _isolated(
                    model_file,
                    device_label(dev),
                    memory,
                    {**options, "trial_timeout": trial_timeout},
                    step,
                ),
            )
        else:
            try:
                result = _probe(
                    debug,
                    spec,
                    trial_timeout,
                    device=dev,
                    memory=memory,
                    extra_state=extra,
                    cache=not no_cache,
                    trust_cache=trust_cache,
                    zero_grad=zero_grad,
                    accumulate=accumulate,
                    allow_growth=allow_growth,
                    **options,
                    **step_kwargs(spec, **step),
                )
            except ProfileInterrupted as stop:  # the ceiling was verified: print it, then exit
                _answer(stop.result.to_dict(), model_file, as_json, tty=tty)
                raise Terminated() if stop.terminated else KeyboardInterrupt() from None
    torchrun.leave()
    if rank:
        return
    if tty and result.throughput:
        click.echo("", err=True)
    data = {**result.to_dict(), "model_file": model_file}
    # The answer first: a report that cannot be written (a full disk) must not lose it.
    _answer(data, model_file, as_json, tty=False)
    if report_dir is not None:
        with interruptible(trials):  # the temporary folder goes, no partial report stays
            write_report_files(data, Path(report_dir), model_file, debug)


def _answer(result: dict[str, Any], model_file: str, as_json: bool, *, tty: bool) -> None:
    """The answer on stdout (first ending a timing line that a terminal rewrites)."""
    if tty and result.get("throughput"):
        click.echo("", err=True)
    data = {**result, "model_file": model_file}
    if as_json:
        click.echo(result_json(data))
    else:
        click.echo(result_table(data, title=f"maxbatch probe {model_file}"))


def _check_report(debug: bool, report_dir: str | None) -> None:
    if report_dir is not None:
        run(debug, lambda: check_report(report_dir))


def _loop_options(isolate: bool, zero_grad: str, accumulate: int, growth: str | None) -> None:
    """Refuse the loop's options with ``--isolate`` (its children do not take them yet)."""
    if isolate and (zero_grad != "before_forward" or accumulate != 1 or growth):
        raise ConfigError(
            "--zero-grad, --accumulate and --allow-growth are not passed to isolated trials "
            "yet; run without --isolate"
        )


def _probe(debug: bool, spec: ModelSpec, trial_timeout: float | None, **kwargs: Any) -> Any:
    if trial_timeout is not None:
        run(debug, _timeout_needs_isolate)
    return run(debug, lambda: find_batch_size(spec.model, spec.batch_source(scanned), **kwargs))


def _isolated(
    model_file: str,
    device: str,
    memory: str | None,
    options: dict[str, Any],
    step: dict[str, Any],
) -> Any:
    """``--isolate``: every trial in a fresh process (the file's own hooks are loaded there)."""
    from maxbatch.run.isolate import probe_file

    unset = {k for k in ("noise_scale", "trial_timeout") if not options.get(k)}
    options = {k: v for k, v in options.items() if k not in unset}
    return probe_file(
        model_file,
        isolate=True,
        device=device,
        memory=memory,
        headroom=step["headroom"],
        mode="inference" if step["inference"] else "train",
        precision=step["precision"],
        optimizer=step["optimizer"],
        min_batch_size=step["min_batch"],
        max_batch_size=step["max_batch"],
        multiple_of=step["multiple_of"],
        **options,
    )


def _timeout_needs_isolate() -> None:
    raise ConfigError(
        "--trial-timeout bounds the processes of --isolate; add --isolate (without it "
        "every trial runs in this process: --time-budget bounds the search)"
    )
