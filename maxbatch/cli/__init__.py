"""The ``maxbatch`` command: parse, call the library, render, map errors to exit codes.

Exit codes: 0 an answer; 1 nothing fits or the workload failed; 2 usage errors and bad model files;
130 interrupted (Ctrl-C); 143 terminated (SIGTERM). The model is restored in every case.

One module per command (:mod:`~maxbatch.cli.probe`, :mod:`~maxbatch.cli.estimate`,
:mod:`~maxbatch.cli.report`, :mod:`~maxbatch.cli.devices`, :mod:`~maxbatch.cli.cache`); the
options ``probe`` and ``estimate`` share are in :mod:`~maxbatch.cli.options`, the error and
signal to exit code mapping in :mod:`~maxbatch.cli.exits`. This package is the only one that
imports click.
"""

from __future__ import annotations

import click

from maxbatch.cli import cache, devices, estimate, probe, report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="maxbatch")
def main() -> None:
    """Find the batch size that fits and trains fastest on your device."""


main.add_command(probe.probe)
main.add_command(report.report)
main.add_command(estimate.estimate)
main.add_command(devices.devices)
main.add_command(cache.cache)
