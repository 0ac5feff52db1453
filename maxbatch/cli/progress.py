"""What ``probe`` prints while it runs: a line per trial, a line per timed size (rank 0 only)."""

from __future__ import annotations

import sys

import click

from maxbatch.results import Throughput, Trial
from maxbatch.store.report import point_line, trial_line


class Progress:
    """Counts the trials and prints them on stderr; only rank 0 prints.

    On a terminal the timing line rewrites itself; in a log, one line per size.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.count = 0
        self.tty = sys.stderr.isatty()

    def trial(self, trial: Trial) -> None:
        """One trial finished (``on_trial``)."""
        self.count += 1
        if not self.rank:
            click.echo(trial_line(self.count, trial), err=True)

    def point(self, point: Throughput) -> None:
        """One size was timed (``on_point``)."""
        if self.rank:
            return
        if self.tty:
            click.echo("\r\033[K" + point_line(point), err=True, nl=False)
        else:
            click.echo(point_line(point), err=True)

    def done(self) -> str:
        """What was done, for the line a signal prints: ``after 3 trials``.

        Returns:
            The words.
        """
        return f"after {self.count} trial{'' if self.count == 1 else 's'}"
