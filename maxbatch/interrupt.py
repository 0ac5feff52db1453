"""Ctrl-C and SIGTERM during a probe: one exception, raised where the probe is, at most once.

The probe restores the user's model in ``finally`` blocks, so an interrupt only has to arrive as an
exception: :class:`Terminated` (a ``KeyboardInterrupt``) for SIGTERM, ``KeyboardInterrupt`` for
Ctrl-C. After the first signal both are ignored until the block ends, so a second Ctrl-C cannot
cut the restore short. Inside :func:`signals_held` (the save and every restore of the user's
state) a signal is only recorded, and delivered right after the block: an interrupt never leaves
the model half saved or half restored.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

__all__ = ["Terminated", "signals_held", "stop_signals"]


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


_STOPPING = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM during a critical section; deliver them right after it.

    Inside, a signal is recorded in the list the block gets (so that it may undo its work
    first); afterwards the previous handlers come back and each signal held is raised again,
    once, to them: a ``KeyboardInterrupt`` (or :class:`Terminated`) then comes from the end of
    the block. Outside the main thread it holds nothing.

    Yields:
        The signals held so far, in the order they came.
    """
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    try:
        for stop in _STOPPING:
            previous[stop] = signal.signal(stop, hold)
    except ValueError:  # not the main thread
        pass
    try:
        yield pending
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for held in dict.fromkeys(pending):
            signal.raise_signal(held)  # its handler runs now (raise_signal checks for signals)
