"""``Request``: the one carrier of a probe's options, from the keyword to the stage.

:func:`~maxbatch.find_batch_size` turns its keywords into one :class:`Request` (its records:
:class:`~maxbatch.settings.SearchSettings`, :class:`~maxbatch.settings.MemorySettings`,
:class:`~maxbatch.settings.ProfileSettings`, :class:`~maxbatch.settings.AdviceSettings`,
:class:`~maxbatch.step.spec.StepSpec`); the stages read its fields. What keys the result cache is
*derived* from those fields (:func:`cache_settings`): a new field is keyed by default, and one that
does not change the answer must be listed in :data:`NOT_KEYED` with the reason, or in
:data:`KEYED_APART` when the cache describes it in its own way.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from typing import Any

import torch

from maxbatch.run.distributed import Ranks
from maxbatch.settings import AdviceSettings, MemorySettings, ProfileSettings, SearchSettings
from maxbatch.step.spec import StepSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """Everything a probe was asked, validated: the records its stages take."""

    started: float  #: ``time.perf_counter()`` at the call: the time budget counts from here
    search: SearchSettings
    memory: MemorySettings
    profile: ProfileSettings
    advice: AdviceSettings
    step: StepSpec
    device: torch.device
    ranks: Ranks  #: the ranks that agree under ``torch.distributed`` (one rank: alone)


#: The fields (dotted paths into :class:`Request`) that do not change the answer, and why.
NOT_KEYED: dict[str, str] = {
    "started": "when the call began",
    "ranks": "the cache is not used under torch.distributed",
    "search.time_budget": "only complete answers are stored, and they do not depend on it",
    "search.estimate_first": "where the search starts; the ceiling is verified all the same",
    "search.on_trial": "a callback that watches",
    "search.cache": "whether the cache is used at all",
    "search.trust_cache": "whether a hit is checked, not what it is",
    "profile.on_point": "a callback that watches",
    "step.make_batch": "the batch it makes is described (its shapes and dtypes)",
    "step.sample_size": "the batch it makes is described (its shapes and dtypes)",
}

#: The fields the cache describes in its own way (:func:`maxbatch.store.cache.describe`).
KEYED_APART: dict[str, str] = {
    "device": "the device's kind, name and total memory",
    "step.model": "module types, parameter and buffer shapes, dtypes, requires_grad",
    "step.sample": "the shapes and dtypes of a batch made from it",
    "step.optimizer": "the built optimizer's type and the settings that change its memory",
    "step.extra_state": "how many objects are restored",
}


def fields(record: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf field of ``record`` (records nest), as its dotted path and value.

    Yields:
        The path (``search.grid.multiple_of``) and the value.
    """
    for f in dataclasses.fields(record):
        path, value = f"{prefix}{f.name}", getattr(record, f.name)
        if path in NOT_KEYED or path in KEYED_APART:
            yield path, value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from fields(value, f"{path}.")
        else:
            yield path, value


def _plain(value: Any, path: str) -> Any:
    """A keyed value as JSON-ready data.

    Returns:
        The value: plain, an enum's value, or a list of them.

    Raises:
        TypeError: the value is of a kind the key cannot say (list the field in NOT_KEYED or
            KEYED_APART, or make it a plain value, an enum or a record).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v, path) for v in value]
    raise TypeError(
        f"{path} ({type(value).__name__}) cannot key the result cache: make it a plain value, "
        "an enum or a record, or list it in NOT_KEYED (with why it does not change the answer)"
    )


def cache_settings(request: Request, device: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What keys the result cache, derived from the request's fields.

    Args:
        request: the request.
        device: the device as the key says it (kind, name, total bytes).

    Returns:
        The user's functions by field name (keyed by their code) and the settings by path.
    """
    functions: dict[str, Any] = {}
    settings: dict[str, Any] = {
        "device": device,
        "step.extra_state": len(request.step.extra_state.items),
    }
    for path, value in fields(request):
        if path in NOT_KEYED or path in KEYED_APART:
            continue
        if callable(value) and not isinstance(value, type):
            functions[path.rsplit(".", 1)[-1]] = value
        else:
            settings[path] = _plain(value, path)
    return functions, settings
