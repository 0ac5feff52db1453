"""``maxbatch estimate``: peak memory and ceilings from fake tensors, without running the step."""

from __future__ import annotations

import sys
from typing import Any

import click

from maxbatch.cli.exits import EXIT_NO_ANSWER, interruptible, run
from maxbatch.cli.options import choices, scanned, start, step_kwargs, workload_options
from maxbatch.estimate.estimate import estimate_batch_size
from maxbatch.settings import Target
from maxbatch.store.report import estimate_json, estimate_table


@click.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--memory", default=None, help="capacities: 24GiB, or several: 16GiB,24GiB,80GiB")
@click.option(
    "--target",
    type=choices(Target),
    default=Target.CPU.value,
    show_default=True,
    help="cpu: count as the virtual device; cuda: 512 B rounding, a CUDA context reserve",
)
@click.option("--batch-size", "batch_sizes", type=int, multiple=True, help="also its peak (repeat)")
@workload_options(
    headroom_help="bytes kept free [default: 0 for cpu, 5% for cuda]",
    inference_help="estimate a forward pass under inference_mode",
    json_help="print the estimate as JSON",
    verbose_help="log each fake trial (-vv: debug)",
)
def estimate(
    model_file: str,
    memory: str | None,
    target: str,
    batch_sizes: tuple[int, ...],
    as_json: bool,
    verbose: int,
    debug: bool,
    **step: Any,
) -> None:
    """Estimate peak memory and ceilings without running the step (fake tensors).

    For devices you do not have: nothing is computed and no memory is used, whatever the batch
    size. A model whose build_model() builds it under torch.device("meta") is never allocated.
    """
    model_spec = start(model_file, verbose, debug)
    with interruptible(lambda: "during the estimate"):
        result = run(
            debug,
            lambda: estimate_batch_size(
                model_spec.model,
                model_spec.batch_source(scanned),
                memory=memory,
                target=target,
                batch_sizes=batch_sizes,
                **step_kwargs(model_spec, **step),
            ),
        )
    if as_json:
        click.echo(estimate_json(result, model_file=model_file))
    else:
        click.echo(estimate_table(result, title=f"maxbatch estimate {model_file}"))
    if result.capacities and all(row.ceiling is None for row in result.capacities):
        sys.exit(EXIT_NO_ANSWER)
