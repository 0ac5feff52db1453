"""The ``maxbatch`` command: parse, call the library, render, map errors to exit codes.

Exit codes: 0 an answer; 1 nothing fits or the workload failed; 2 usage errors and bad model files;
130 interrupted (Ctrl-C); 143 terminated (SIGTERM). The model is restored in every case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from maxbatch import torchrun
from maxbatch.device import device_label, list_devices, resolve_device
from maxbatch.errors import (
    ConfigError,
    DeviceError,
    DistributedError,
    MaxbatchError,
    ModelFileError,
    RankFailedError,
    WorkloadError,
)
from maxbatch.estimate import estimate_batch_size
from maxbatch.finder import find_batch_size
from maxbatch.interrupt import Terminated, stop_signals
from maxbatch.modelfile import ModelSpec, load_model_file
from maxbatch.pick import TOLERANCE
from maxbatch.report import (
    devices_table,
    estimate_json,
    estimate_table,
    point_line,
    result_json,
    result_markdown,
    result_table,
    trial_line,
)
from maxbatch.reportfiles import check_report_dir, load_report, write_report
from maxbatch.results import Throughput, Trial

EXIT_NO_ANSWER = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


@contextlib.contextmanager
def _interruptible(done: Callable[[], str]) -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into one line and exit 130 or 143, after the library's clean-up.

    ``done()`` says what was done when the signal came (``after 3 trials``).
    """
    try:
        with stop_signals():
            yield
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        how = "terminated (SIGTERM)" if term else "interrupted"
        click.echo(f"maxbatch: {how} {done()}; the model is restored", err=True)
        sys.exit(EXIT_TERMINATED if term else EXIT_INTERRUPTED)


#: This process's rank under torchrun: only rank 0 prints (other ranks: a lost rank only).
_rank = 0


def _fail(exc: BaseException, debug: bool) -> None:
    """Print one clear line (or the traceback with --debug) and exit with the error's code."""
    if _rank != 0 and (not isinstance(exc, DistributedError) or isinstance(exc, RankFailedError)):
        pass  # rank 0 says it (a rank that failed is reported by rank 0 too)
    elif debug:
        import traceback

        traceback.print_exception(exc)
    else:
        where = f"rank {_rank}: " if _rank else ""
        cause = f" (caused by {type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        click.echo(f"maxbatch: error: {where}{exc}{cause}", err=True)
        if isinstance(exc, WorkloadError):
            click.echo("maxbatch: run with --debug for the traceback", err=True)
    usage = isinstance(exc, (ModelFileError, ConfigError, DeviceError))
    sys.exit(EXIT_USAGE if usage else EXIT_NO_ANSWER)


def _run(debug: bool, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except MaxbatchError as e:
        _fail(e, debug)


F = TypeVar("F", bound=Callable[..., Any])


def _workload_options(
    *, headroom_help: str, inference_help: str, json_help: str, verbose_help: str
) -> Callable[[F], F]:
    """The options ``probe`` and ``estimate`` share, listed after each command's own.

    Each option reaches the command as the keyword argument of the same name; :func:`_start`
    and :func:`_step_kwargs` turn them into the library's arguments.

    Returns:
        A decorator that adds the shared options to a command.
    """
    options = [
        click.option("--headroom", default=None, help=headroom_help),
        click.option("--min-batch", type=int, default=None, help="smallest batch size to try"),
        click.option("--max-batch", type=int, default=None, help="largest batch size to try"),
        click.option(
            "--multiple-of", type=int, default=1, show_default=True, help="batch granularity"
        ),
        click.option("--inference", is_flag=True, help=inference_help),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None),
        click.option(
            "--optimizer",
            type=click.Choice(["adamw", "adam", "sgd", "none"]),
            default=None,
            help="[default: the file's optimizer(), else adamw]",
        ),
        click.option("--json", "as_json", is_flag=True, help=json_help),
        click.option("-v", "--verbose", count=True, help=verbose_help),
        click.option("--debug", is_flag=True, help="show tracebacks"),
    ]

    def decorate(command: F) -> F:
        for option in reversed(options):  # decorators apply bottom-up
            command = option(command)
        return command

    return decorate


def _start(model_file: str, verbose: int, debug: bool) -> ModelSpec:
    """Send logs to stderr at the level ``-v`` asks for, and load the model file."""
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(name)s: %(message)s")
    spec: ModelSpec = _run(debug, lambda: load_model_file(model_file))
    return spec


def scanned(done: int, total: int) -> None:
    """A data set's scan on stderr: one line rewritten on a terminal, else one line at the end."""
    if sys.stderr.isatty():
        click.echo(
            f"\r\033[Kreading the data set: {done}/{total} items", err=True, nl=done == total
        )
    elif done == total:
        click.echo(f"read the data set: {total} items", err=True)


def _step_kwargs(
    spec: ModelSpec,
    *,
    headroom: str | None,
    min_batch: int | None,
    max_batch: int | None,
    multiple_of: int,
    inference: bool,
    precision: str | None,
    optimizer: str | None,
) -> dict[str, Any]:
    """The keyword arguments that find_batch_size and estimate_batch_size share."""
    return {
        "optimizer": optimizer if optimizer is not None else spec.optimizer,
        "loss_fn": spec.loss,
        "forward_fn": spec.forward,
        "train_step": spec.train_step,
        "headroom": headroom,
        "mode": "inference" if inference else "train",
        "precision": precision,
        "min_batch_size": min_batch,
        "max_batch_size": max_batch,
        "multiple_of": multiple_of,
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maxbatch")
def main() -> None:
    """Find the batch size that fits and trains fastest on your device."""


@main.command()
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
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="write report.json, report.md and PNG plots into this folder",
)
@_workload_options(
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
    trust_cache: bool,
    pick: str,
    tolerance: float,
    dataset_size: int | None,
    global_batch: int | None,
    base_batch: int | None,
    base_lr: float | None,
    noise_scale: bool,
    report_dir: str | None,
    as_json: bool,
    verbose: int,
    debug: bool,
    **step: Any,
) -> None:
    """Find the largest batch size whose real step fits, for the model in MODEL_FILE.

    Under torchrun every rank probes its own device and the ranks agree; rank 0 prints.
    """
    global _rank
    _rank = _run(debug, torchrun.init_from_env)
    spec = _start(model_file, verbose, debug)
    extra = _run(debug, spec.extra_state_items)
    if report_dir is not None:
        _run(debug, lambda: _check_report(report_dir))
    dev = _run(debug, lambda: resolve_device(torchrun.rank_device(device)))
    if not isolate:  # isolated: only the children touch the device
        spec.model.to(dev)
    count = 0

    tty = sys.stderr.isatty()

    def progress(trial: Trial) -> None:
        nonlocal count
        count += 1
        if _rank:
            return
        click.echo(trial_line(count, trial), err=True)

    def timed(point: Throughput) -> None:
        if _rank:
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
    with _interruptible(trials):
        if isolate:
            result = _run(
                debug, lambda: _isolated(model_file, device_label(dev), memory, options, step)
            )
        else:
            result = _probe(
                debug,
                spec,
                device=dev,
                memory=memory,
                extra_state=extra,
                cache=not no_cache,
                trust_cache=trust_cache,
                **options,
                **_step_kwargs(spec, **step),
            )
    torchrun.leave()
    if _rank:
        return
    if tty and result.throughput:
        click.echo("", err=True)
    data = {**result.to_dict(), "model_file": model_file}
    if report_dir is not None:
        with _interruptible(trials):  # the temporary folder goes, no partial report stays
            _run(debug, lambda: _write_report(data, Path(report_dir), model_file))
    if as_json:
        click.echo(result_json(data))
    else:
        click.echo(result_table(data, title=f"maxbatch probe {model_file}"))


def _probe(debug: bool, spec: ModelSpec, **kwargs: Any) -> Any:
    return _run(debug, lambda: find_batch_size(spec.model, spec.batch_source(scanned), **kwargs))


def _isolated(
    model_file: str,
    device: str,
    memory: str | None,
    options: dict[str, Any],
    step: dict[str, Any],
) -> Any:
    """``--isolate``: every trial in a fresh process (the file's own hooks are loaded there)."""
    from maxbatch.isolate import probe_file

    if not options.get("noise_scale"):
        options = {k: v for k, v in options.items() if k != "noise_scale"}
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


def _check_report(report_dir: str) -> None:
    """Check the report folder and the plotting extra before the first trial."""
    check_report_dir(report_dir)
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(
            '--report draws plots, which need matplotlib: pip install "maxbatch[plot]"'
        )


def _write_report(data: dict[str, Any], out: Path, model_file: str) -> None:
    from maxbatch.plots import write_plots

    def write(folder: Path) -> list[str]:
        (folder / "report.json").write_text(result_json(data) + "\n", encoding="utf-8")
        images = write_plots(data, folder)
        markdown = result_markdown(data, title=f"maxbatch: {model_file}", images=bool(images))
        (folder / "report.md").write_text(markdown, encoding="utf-8")
        return ["report.json", "report.md", *(p.name for p in images)]

    written = write_report(out, write)
    click.echo(f"report written to {out}: {', '.join(written)}", err=True)


@main.command()
@click.argument("report_file", type=click.Path(dir_okay=False))
@click.option("--markdown", is_flag=True, help="render as Markdown instead of text")
@click.option("--debug", is_flag=True, help="show tracebacks")
def report(report_file: str, markdown: bool, debug: bool) -> None:
    """Render a saved report.json again."""
    data = _run(debug, lambda: load_report(report_file))
    title = f"maxbatch: {data.get('model_file', report_file)}"
    click.echo(result_markdown(data, title=title) if markdown else result_table(data, title=title))


@main.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--memory", default=None, help="capacities: 24GiB, or several: 16GiB,24GiB,80GiB")
@click.option(
    "--target",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="cpu: count as the virtual device; cuda: 512 B rounding, a CUDA context reserve",
)
@click.option("--batch-size", "batch_sizes", type=int, multiple=True, help="also its peak (repeat)")
@_workload_options(
    headroom_help="bytes kept free [default: 0 for cpu, 5% for cuda]",
    inference_help="estimate a forward pass under inference_mode",
    json_help="print the estimate as JSON",
    verbose_help="log each fake trial (-vv: debug)",
)
def estimate(
    model_file: str,
    memory: str | None,
    target: str,
    batch_sizes: tuple[int, ...],
    as_json: bool,
    verbose: int,
    debug: bool,
    **step: Any,
) -> None:
    """Estimate peak memory and ceilings without running the step (fake tensors).

    For devices you do not have: nothing is computed and no memory is used, whatever the batch
    size. A model whose build_model() builds it under torch.device("meta") is never allocated.
    """
    spec = _start(model_file, verbose, debug)
    with _interruptible(lambda: "during the estimate"):
        result = _run(
            debug,
            lambda: estimate_batch_size(
                spec.model,
                spec.batch_source(scanned),
                memory=memory,
                target=target,
                batch_sizes=batch_sizes,
                **_step_kwargs(spec, **step),
            ),
        )
    if as_json:
        click.echo(estimate_json(result, model_file=model_file))
    else:
        click.echo(estimate_table(result, title=f"maxbatch estimate {model_file}"))
    if result.capacities and all(row.ceiling is None for row in result.capacities):
        sys.exit(EXIT_NO_ANSWER)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the devices as JSON")
def devices(as_json: bool) -> None:
    """List the devices maxbatch can probe and their memory."""
    found = list_devices()
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in found], indent=2))
    else:
        click.echo(devices_table(found))


@main.group()
def cache() -> None:
    """The result cache ($XDG_CACHE_HOME/maxbatch, default ~/.cache/maxbatch)."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the entries as JSON")
def cache_list(as_json: bool) -> None:
    """List the cached results, newest first."""
    from maxbatch.cache import ResultCache

    store = ResultCache()
    found = store.entries()
    if as_json:
        rows = [{**dataclasses.asdict(e), "path": str(e.path)} for e in found]
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{len(found)} cached result(s) in {store.directory}")
    for e in found:
        click.echo(
            f"{e.key[:12]}  {e.created}  {e.model}  {e.device}  "
            f"ceiling {e.ceiling}, batch size {e.batch_size}"
        )


@cache.command("clear")
def cache_clear() -> None:
    """Remove every cached result."""
    from maxbatch.cache import ResultCache

    store = ResultCache()
    click.echo(f"removed {store.clear()} cached result(s) from {store.directory}")
