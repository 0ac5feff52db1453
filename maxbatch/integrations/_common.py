"""What the framework integrations share: their options, checked once, and the plan they set."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from maxbatch import BatchSizeResult, ConfigError, advice_for, find_batch_size
from maxbatch.devicekinds import kind_of
from maxbatch.grid import positive_int

log = logging.getLogger(__name__)

# The arguments of find_batch_size that an integration fills in from the framework itself.
_FROM_FRAMEWORK = frozenset(
    {"model", "sample", "optimizer", "train_step", "forward_fn", "loss_fn", "device", "mode"}
)


def probe_options(options: dict[str, Any], owner: str) -> dict[str, Any]:
    """Check that ``options`` are keyword options of :func:`~maxbatch.find_batch_size`.

    Args:
        options: what the user passed on (``memory=``, ``headroom=``, ``pick=``, ...).
        owner: the integration's name, for the message.

    Returns:
        The options, as a new dict.

    Raises:
        ConfigError: an option is unknown, or one the integration takes from the framework.
    """
    params = inspect.signature(find_batch_size).parameters
    valid = sorted(
        name
        for name, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _FROM_FRAMEWORK
    )
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"{owner} got {', '.join(f'{n}=' for n in unknown)}, which it cannot pass on to "
            f"find_batch_size (the framework gives the model, data, optimizer and step); "
            f"valid options: {', '.join(valid)}"
        )
    return dict(options)


def with_extra_state(options: dict[str, Any], *state: Any) -> dict[str, Any]:
    """``options`` with the framework's own stateful objects added to the user's ``extra_state``.

    The probe restores them after every trial; ``None``s (a scaler that is not used) are left out.

    Returns:
        The options, with ``extra_state`` extended.
    """
    ours = [obj for obj in state if obj is not None]
    return {**options, "extra_state": [*ours, *options.get("extra_state", ())]}


def with_steady_state(
    result: BatchSizeResult, *, zero_grad: str | None, micro_batches: int
) -> BatchSizeResult:
    """``result`` whose ``steady_state`` says how the framework's own step ran in the trials.

    Args:
        result: the probe's result.
        zero_grad: where the framework's loop clears gradients (None: the module's own step,
            manual optimization).
        micro_batches: micro-batches per optimizer step that each trial's steps ran.

    Returns:
        The result, its ``steady_state`` filled in (when the probe reported one).
    """
    if result.steady_state is None:
        return result
    state = {**result.steady_state, "zero_grad": zero_grad, "micro_batches": micro_batches}
    search = dataclasses.replace(result.search, steady_state=state)
    return dataclasses.replace(result, search=search)


def check_global_batch(global_batch: int | None) -> int | None:
    """Check ``global_batch`` when the integration is made, before the framework runs.

    Returns:
        ``global_batch``.

    Raises:
        ConfigError: it is not None or a positive integer.
    """
    return None if global_batch is None else positive_int(global_batch, "global_batch")


#: The pick's confidence levels at which an integration trains at the pick rather than the ceiling.
CONFIDENT = frozenset({"high", "medium"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """The batch size per step and device, and the gradient accumulation steps, to train at.

    Attributes:
        batch_size: samples per forward/backward on each device.
        accumulation_steps: micro-batches per optimizer step (1 without ``global_batch``).
        note: the accumulation plan in words, or None without ``global_batch``.
        why: why this size: the pick (and how sure it is) or the ceiling.
    """

    batch_size: int
    accumulation_steps: int
    note: str | None
    why: str = ""


def _chosen(result: BatchSizeResult) -> tuple[BatchSizeResult, str]:
    """The result to plan from: as it is when its pick is sure enough, else at its ceiling."""
    level = result.pick_confidence
    if result.batch_size == result.ceiling:
        return result, f"the ceiling {result.ceiling}"
    if level in CONFIDENT:
        return result, f"the pick {result.batch_size} ({level} confidence)"
    why = (
        f"the ceiling {result.ceiling}, not the pick {result.batch_size}, whose confidence is "
        f"{level or 'unknown'}" + (f" ({result.pick_confidence_reason})" if level else "")
    )
    return dataclasses.replace(result, batch_size=result.ceiling), why


def plan_of(result: BatchSizeResult, global_batch: int | None = None) -> Plan:
    """The plan a result gives: the pick when its confidence is at least medium, else the ceiling.

    With ``global_batch``, the accumulation plan over that size (the result's own advice when it
    plans from the pick). The choice and its reason go to the log.

    Returns:
        The plan.
    """
    chosen, why = _chosen(result)
    own = chosen.advice if chosen is result else None
    plan = None if own is None else own.accumulation
    if plan is None and global_batch is not None:
        plan = advice_for(chosen, global_batch=global_batch).accumulation
    if plan is None:
        out = Plan(batch_size=chosen.batch_size, accumulation_steps=1, note=None, why=why)
    else:
        out = Plan(
            batch_size=plan.micro_batch,
            accumulation_steps=plan.accumulation_steps,
            note=plan.note,
            why=why,
        )
    log.info(
        "maxbatch sets batch size %d x %d accumulation steps: %s",
        out.batch_size,
        out.accumulation_steps,
        why,
    )
    return out


def first_batch(loader: Iterable[Any], device: torch.device) -> Any:
    """The first batch of ``loader``, drawn without moving the random state training will use.

    A shuffling loader draws its order from the global generator; the probe's batch must not
    shift the order (or the seeds) that training then sees.

    Returns:
        The batch.
    """
    devices = [device] if kind_of(device).own_rng else []
    with torch.random.fork_rng(devices=devices):
        return next(iter(loader))


def probe_data(loader: Iterable[Any], device: torch.device) -> Any:
    """What the probe builds its batches from: the loader's worst case, where it can be found.

    A ``DataLoader`` over a map-style data set goes to :func:`~maxbatch.find_batch_size` as it is,
    which builds each trial's batch from the largest items with the loader's ``collate_fn`` (so a
    padding collate pads to the longest sequences); an iterable data set, or a loader that does not
    batch, gives its first batch.

    Returns:
        The loader itself, or its first batch.
    """
    if (
        isinstance(loader, DataLoader)
        and loader.batch_sampler is not None
        and not isinstance(loader.dataset, IterableDataset)
    ):
        return loader
    return first_batch(loader, device)
