"""The command's first instant: Ctrl-C and SIGTERM are one line and exit 130 / 143 from the start.

Importing torch and loading the model file take seconds, before the command can handle anything.
The package imports this module first (before torch), which calls :func:`install`; it acts only
when this process *is* the ``maxbatch`` command (the console script, or ``python -m maxbatch``):
never for a program that imports the library. Its handlers write one line and end the process
at once (``os._exit``: no traceback, and no ``except`` in a model file can swallow it). While a
probe runs, the library's own handlers (:func:`maxbatch.interrupt.stop_signals`) take over and
restore the model before the command exits with the same codes; they put these back after.
This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from types import FrameType

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "install", "is_command"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

_COMMANDS = ("maxbatch", "maxbatch.exe", "maxbatch-script.py")


def is_command(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process was started as the ``maxbatch`` command.

    The console script runs with ``sys.argv[0]`` its own path; ``python [options] -m maxbatch``
    has ``sys.argv[0] == "-m"`` while the package imports, and ``sys.orig_argv`` names the
    module (``python -m maxbatch.isotrial``, an isolated trial, is not the command).

    Returns:
        True for the command, False for anything else that imports the package.
    """
    argv = sys.argv if argv is None else argv
    orig = list(getattr(sys, "orig_argv", [])) if orig_argv is None else orig_argv
    if argv and os.path.basename(argv[0]) in _COMMANDS:
        return True
    if argv[:1] == ["-m"] and "-m" in orig:
        return orig[orig.index("-m") + 1 :][:1] in (["maxbatch"], ["maxbatch.__main__"])
    return False


def _end(signum: int, frame: FrameType | None) -> None:
    term = signum == signal.SIGTERM
    how = "terminated (SIGTERM)" if term else "interrupted"
    with contextlib.suppress(Exception):  # what was printed before stays printed
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(2, f"maxbatch: {how}; no trial was running\n".encode())
    os._exit(EXIT_TERMINATED if term else EXIT_INTERRUPTED)


def install() -> bool:
    """Handle SIGINT and SIGTERM as one line and 130 / 143, in the ``maxbatch`` command only.

    Returns:
        Whether the handlers were installed.
    """
    if not is_command() or threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGINT, _end)
    signal.signal(signal.SIGTERM, _end)
    return True


install()  # on import: the package imports this module before anything heavy
