"""What ``probe`` and ``estimate`` share: common options, logging, the model file, progress."""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from maxbatch.cli.exits import run
from maxbatch.run.modelfile import ModelSpec, load_model_file
from maxbatch.settings import Precision

F = TypeVar("F", bound=Callable[..., Any])


def choices(kind: type[enum.Enum]) -> click.Choice[str]:
    """A click choice of an enum's values, in the enum's order (the enum is the one list).

    Returns:
        The choice.
    """
    return click.Choice([str(member.value) for member in kind])


def workload_options(
    *, headroom_help: str, inference_help: str, json_help: str, verbose_help: str
) -> Callable[[F], F]:
    """The options ``probe`` and ``estimate`` share, listed after each command's own.

    Each option reaches the command as the keyword argument of the same name; :func:`start`
    and :func:`step_keywords` (:func:`step_kwargs` with the file's hooks) turn them into the
    library's arguments.

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
        click.option("--precision", type=choices(Precision), default=None),
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


def start(model_file: str, verbose: int, debug: bool, *, rank: int = 0) -> ModelSpec:
    """Send logs to stderr at the level ``-v`` asks for, and load the model file.

    ``rank`` is this process's under torchrun (only rank 0 prints an error).

    Returns:
        The loaded model file.
    """
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(name)s: %(message)s")
    model_spec: ModelSpec = run(debug, lambda: load_model_file(model_file), rank=rank)
    return model_spec


def scanned(done: int, total: int) -> None:
    """A data set's scan on stderr: one line rewritten on a terminal, else one line at the end."""
    if sys.stderr.isatty():
        click.echo(
            f"\r\033[Kreading the data set: {done}/{total} items", err=True, nl=done == total
        )
    elif done == total:
        click.echo(f"read the data set: {total} items", err=True)


def step_keywords(
    *,
    headroom: str | None,
    min_batch: int | None,
    max_batch: int | None,
    multiple_of: int,
    inference: bool,
    precision: str | None,
    optimizer: str | None,
) -> dict[str, Any]:
    """The shared options as the library's keywords (plain values: the file's hooks apart).

    Returns:
        ``headroom``, ``mode``, ``precision``, ``min_batch_size``, ``max_batch_size``,
        ``multiple_of`` and ``optimizer`` (None: the file's ``optimizer()``).
    """
    return {
        "headroom": headroom,
        "mode": "inference" if inference else "train",
        "precision": precision,
        "min_batch_size": min_batch,
        "max_batch_size": max_batch,
        "multiple_of": multiple_of,
        "optimizer": optimizer,
    }


def step_kwargs(model_spec: ModelSpec, **step: Any) -> dict[str, Any]:
    """The keyword arguments that find_batch_size and estimate_batch_size share, with the hooks.

    Returns:
        :func:`step_keywords`, and the file's hooks (:meth:`ModelSpec.step_options`).
    """
    keywords = step_keywords(**step)
    return {**keywords, **model_spec.step_options(keywords["optimizer"])}
