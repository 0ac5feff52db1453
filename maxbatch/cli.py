"""The ``maxbatch`` command: parse, call the library, render, map errors to exit codes.

Exit codes: 0 an answer; 1 nothing fits or the workload failed; 2 usage errors and bad model files.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from maxbatch.device import list_devices, resolve_device
from maxbatch.errors import (
    ConfigError,
    DeviceError,
    DoesNotFitError,
    MaxbatchError,
    ModelFileError,
    WorkloadError,
)
from maxbatch.finder import find_batch_size
from maxbatch.modelfile import load_model_file
from maxbatch.report import devices_table, result_json, result_table, trial_line
from maxbatch.results import Trial

EXIT_NO_ANSWER = 1
EXIT_USAGE = 2


def _fail(exc: BaseException, debug: bool) -> None:
    """Print one clear line (or the traceback with --debug) and exit with the error's code."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    else:
        cause = f" (caused by {type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        click.echo(f"maxbatch: error: {exc}{cause}", err=True)
        if isinstance(exc, WorkloadError):
            click.echo("maxbatch: run with --debug for the traceback", err=True)
    usage = isinstance(exc, (ModelFileError, ConfigError, DeviceError))
    sys.exit(EXIT_USAGE if usage else EXIT_NO_ANSWER)


def _run(debug: bool, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except MaxbatchError as e:
        _fail(e, debug)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maxbatch")
def main() -> None:
    """Find the batch size that fits and trains fastest on your device."""


@main.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps [default: cuda, mps, cpu]")
@click.option("--memory", default=None, help="cap live tensor bytes, e.g. 300MiB or 24GiB")
@click.option(
    "--headroom", default=None, help="bytes kept free [default: 0 with --memory, else 5%%]"
)
@click.option("--min-batch", type=int, default=None, help="smallest batch size to try")
@click.option("--max-batch", type=int, default=None, help="largest batch size to try")
@click.option("--multiple-of", type=int, default=1, show_default=True, help="batch granularity")
@click.option("--inference", is_flag=True, help="probe a forward pass under inference_mode")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@click.option(
    "--optimizer",
    type=click.Choice(["adamw", "adam", "sgd", "none"]),
    default=None,
    help="[default: the file's optimizer(), else adamw]",
)
@click.option("--time-budget", type=float, default=None, help="seconds; stop with the best so far")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("-v", "--verbose", count=True, help="log each trial (-vv: debug)")
@click.option("--debug", is_flag=True, help="show tracebacks")
def probe(
    model_file: str,
    device: str | None,
    memory: str | None,
    headroom: str | None,
    min_batch: int | None,
    max_batch: int | None,
    multiple_of: int,
    inference: bool,
    precision: str | None,
    optimizer: str | None,
    time_budget: float | None,
    as_json: bool,
    verbose: int,
    debug: bool,
) -> None:
    """Find the largest batch size whose real step fits, for the model in MODEL_FILE."""
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(name)s: %(message)s")
    spec = _run(debug, lambda: load_model_file(model_file))
    dev = _run(debug, lambda: resolve_device(device))
    spec.model.to(dev)
    count = 0

    def progress(trial: Trial) -> None:
        nonlocal count
        count += 1
        click.echo(trial_line(count, trial), err=True)

    opt: Any = optimizer if optimizer is not None else spec.optimizer
    result = _run(
        debug,
        lambda: find_batch_size(
            spec.model,
            spec.make_batch if spec.make_batch is not None else spec.sample,
            optimizer=opt,
            loss_fn=spec.loss,
            forward_fn=spec.forward,
            train_step=spec.train_step,
            device=dev,
            memory=memory,
            headroom=headroom,
            mode="inference" if inference else "train",
            precision=precision,
            min_batch_size=min_batch,
            max_batch_size=max_batch,
            multiple_of=multiple_of,
            time_budget=time_budget,
            on_trial=progress,
        ),
    )
    if as_json:
        click.echo(result_json(result, model_file=model_file))
    else:
        click.echo(result_table(result, title=f"maxbatch probe {model_file}"))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the devices as JSON")
def devices(as_json: bool) -> None:
    """List the devices maxbatch can probe and their memory."""
    found = list_devices()
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in found], indent=2))
    else:
        click.echo(devices_table(found))


_ = (DoesNotFitError,)  # exit code 1, like every MaxbatchError that is not a usage error
