"""Ctrl-C and SIGTERM during a probe: one exception, raised where the probe is, at most once.

The probe restores the user's model in ``finally`` blocks, so an interrupt only has to arrive as an
exception: :class:`Terminated` (a ``KeyboardInterrupt``) for SIGTERM, ``KeyboardInterrupt`` for
Ctrl-C. After the first signal both are ignored until the block ends, so a second Ctrl-C cannot
cut the restore short.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

__all__ = ["Terminated", "stop_signals"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where the probe is, so that its clean-up runs as for Ctrl-C."""


def _stop(signum: int, frame: FrameType | None) -> NoReturn:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise once (see the module doc); the old handlers come back after.

    Outside the main thread, where Python cannot handle signals, it changes nothing.
    """
    try:
        previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
