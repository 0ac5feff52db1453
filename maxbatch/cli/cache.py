"""``maxbatch cache list`` and ``maxbatch cache clear``: the result cache."""

from __future__ import annotations

import dataclasses
import json

import click

from maxbatch.store.cache import ResultCache


@click.group()
def cache() -> None:
    """The result cache ($XDG_CACHE_HOME/maxbatch, default ~/.cache/maxbatch)."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the entries as JSON")
def cache_list(as_json: bool) -> None:
    """List the cached results, newest first."""
    result_cache = ResultCache()
    found = result_cache.entries()
    if as_json:
        rows = [{**dataclasses.asdict(e), "path": str(e.path)} for e in found]
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{len(found)} cached result(s) in {result_cache.directory}")
    for e in found:
        click.echo(
            f"{e.key[:12]}  {e.created}  {e.model}  {e.device}  "
            f"ceiling {e.ceiling}, batch size {e.batch_size}"
        )


@cache.command("clear")
def cache_clear() -> None:
    """Remove every cached result."""
    result_cache = ResultCache()
    click.echo(f"removed {result_cache.clear()} cached result(s) from {result_cache.directory}")
