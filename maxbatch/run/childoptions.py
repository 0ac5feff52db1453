"""The options an isolated trial's child takes: derived from :func:`~maxbatch.find_batch_size`.

A child loads the model file itself and gets its options as JSON: every keyword whose type
admits a plain value (a name, a number, a switch) crosses, unless the parent keeps it
(:data:`PARENT_OWN`, with why). A new plain keyword crosses by default. An option given at its
default says nothing a child does not assume: :func:`child_values` leaves it out, whoever keeps it.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from typing import Any

import torch

from maxbatch.devices.device import device_label
from maxbatch.errors import ConfigError
from maxbatch.run.finder import find_batch_size
from maxbatch.settings import SearchSettings

#: Seconds an isolated child may run by default (``trial_timeout=``, ``--trial-timeout``).
TRIAL_TIMEOUT = 600.0

#: The keywords of :func:`~maxbatch.find_batch_size` a child does not take from the parent, and why.
PARENT_OWN: dict[str, str] = {
    "min_batch_size": "the parent's search gives each child its one size",
    "max_batch_size": "the parent's search gives each child its one size",
    "time_budget": "the parent's search spends it (a child past it is killed)",
    "estimate_first": "a child runs one size: nothing to start from",
    "distributed": "isolated trials do not combine with torch.distributed",
    "cache": "the parent's answer is its own search's",
    "trust_cache": "the parent's answer is its own search's",
    "noise_scale": "not measured in isolated trials",
}


def _plain_keyword(hint: Any) -> bool:
    """Whether a keyword's type admits a plain value (a name, a number, a switch)."""
    kinds = typing.get_args(hint) or (hint,)
    return any(isinstance(k, type) and issubclass(k, (str, int, float)) for k in kinds)


def _child_options() -> frozenset[str]:
    """The keywords that take a plain value and that the parent does not keep: derived."""
    hints = typing.get_type_hints(find_batch_size)
    params = inspect.signature(find_batch_size).parameters.values()
    return frozenset(
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.name not in PARENT_OWN
        and _plain_keyword(hints[p.name])
    )


def child_values(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options as a child takes them: those at ``find_batch_size``'s default left out.

    ``noise_scale=False`` or ``cache=False`` are then no reason to refuse an isolated probe, and
    a device given as a :class:`torch.device` crosses by its name.

    Returns:
        The options left, with plain values where they had a plain equivalent.
    """
    defaults = {p.name: p.default for p in inspect.signature(find_batch_size).parameters.values()}
    values = {k: device_label(v) if isinstance(v, torch.device) else v for k, v in options.items()}
    return {k: v for k, v in values.items() if not (k in defaults and _same(v, defaults[k]))}


def _same(value: Any, default: Any) -> bool:
    """Whether ``value`` is ``default`` (plain values of the same type compared by value)."""
    plain = (type(None), bool, int, float, str)
    if value is default:
        return True
    return isinstance(value, plain) and type(value) is type(default) and value == default


def search_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take the search's options out of ``options``: the isolated parent's search reads them.

    Every :class:`~maxbatch.settings.SearchSettings` field a child would take: a child runs one
    size, so the search's options are the parent's (a new field is taken by default).

    Returns:
        The options taken, by field name.
    """
    names = {f.name for f in dataclasses.fields(SearchSettings)} & _child_options()
    return {k: options.pop(k) for k in list(options) if k in names}


def check_options(options: Mapping[str, Any], trial_timeout: float | None) -> None:
    """Check the options an isolated probe passes to its children, and the trial timeout.

    Raises:
        ConfigError: an option a child cannot take (a parent's own, or not a plain value), or a
            ``trial_timeout`` that is not a positive number of seconds.
    """
    taken = _child_options()
    unknown = sorted(
        k
        for k, v in options.items()
        if k not in taken or not (v is None or isinstance(v, (str, int, float)))
    )
    if unknown:
        raise ConfigError(
            f"isolated trials cannot take {', '.join(unknown)}: a child process loads the model "
            f"file itself; options it takes (plain values): {', '.join(sorted(taken))}"
        )
    if trial_timeout is not None and (
        isinstance(trial_timeout, bool)
        or not isinstance(trial_timeout, (int, float))
        or not 0 < trial_timeout < float("inf")
    ):
        raise ConfigError(
            f"trial_timeout={trial_timeout!r} is not a positive number of seconds; give e.g. "
            f"{TRIAL_TIMEOUT:g} (or None for no limit)"
        )
