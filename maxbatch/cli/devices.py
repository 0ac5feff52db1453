"""``maxbatch devices``: the devices maxbatch can probe and their memory."""

from __future__ import annotations

import json

import click

from maxbatch.devices.device import list_devices
from maxbatch.store.report import devices_table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print the devices as JSON")
def devices(as_json: bool) -> None:
    """List the devices maxbatch can probe and their memory."""
    found = list_devices()
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in found], indent=2))
    else:
        click.echo(devices_table(found))
