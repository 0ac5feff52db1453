"""Errors and signals to one line on stderr and an exit code; only rank 0 prints."""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import click

from maxbatch.earlysignals import EXIT_INTERRUPTED, EXIT_TERMINATED
from maxbatch.errors import (
    ConfigError,
    DeviceError,
    DistributedError,
    MaxbatchError,
    ModelFileError,
    RankFailedError,
    WorkloadError,
)
from maxbatch.step.interrupt import Terminated, stop_signals

EXIT_NO_ANSWER = 1
EXIT_USAGE = 2


@contextlib.contextmanager
def interruptible(done: Callable[[], str]) -> Iterator[None]:
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


def fail(exc: BaseException, debug: bool, *, rank: int = 0) -> None:
    """Print one clear line (or the traceback with --debug) and exit with the error's code.

    Under torchrun only rank 0 prints, other ranks only a lost rank (``rank``: this process's).
    """
    if rank != 0 and (not isinstance(exc, DistributedError) or isinstance(exc, RankFailedError)):
        pass  # rank 0 says it (a rank that failed is reported by rank 0 too)
    elif debug:
        traceback.print_exception(exc)
    else:
        where = f"rank {rank}: " if rank else ""
        cause = f" (caused by {type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        click.echo(f"maxbatch: error: {where}{exc}{cause}", err=True)
        if isinstance(exc, WorkloadError):
            click.echo("maxbatch: run with --debug for the traceback", err=True)
    usage = isinstance(exc, (ModelFileError, ConfigError, DeviceError))
    sys.exit(EXIT_USAGE if usage else EXIT_NO_ANSWER)


def run(debug: bool, fn: Callable[[], Any], *, rank: int = 0) -> Any:
    """Call ``fn()``; a :class:`~maxbatch.errors.MaxbatchError` exits through :func:`fail`.

    ``rank`` is this process's under torchrun (only rank 0 prints).

    Returns:
        What ``fn()`` returns.
    """
    try:
        return fn()
    except MaxbatchError as e:
        fail(e, debug, rank=rank)
