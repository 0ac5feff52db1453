"""The schema of a saved record, derived from its dataclass fields, and the check of a dict by it.

A saved ``report.json`` (a batch-size result, a bucket profile, a longest length) or a cache
entry's result is read back defensively: only the keys of the record's fields, with the types
those fields have, numbers finite and in range, sizes at least 1, and terminal control
characters shown as escapes, never sent to the terminal. Keys that are no field (derived ones
such as ``critical_batch`` or ``tokens_per_batch``) are accepted and dropped.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from maxbatch.answers import NoiseScale
from maxbatch.errors import ConfigError
from maxbatch.results import FLAT_KEYS

__all__ = ["NUMBER_OR_NULL", "SKIP", "checked", "clean", "optional", "schema_of"]

NUMBER = "number"
NUMBER_OR_NULL = "number or null"  # a float ``to_dict`` writes as null when it is not finite
INT = "int"
BOOL = "bool"
STR = "str"
COUNT = "count"  # an int of at least 1
SKIP = "skip"  # a field the check leaves out

# What the fields' types cannot say: sizes and counts are integers of at least 1,
_COUNTS = {
    "batch_size",
    "ceiling",
    "world_size",
    "accumulation_steps",
    "b_small",
    "b_big",
    "draws",
    "max_length",
    "length_multiple_of",
}
# records whose ``to_dict`` writes a non-finite float as null (their readers take it back),
_NULL_FLOATS: tuple[type, ...] = (NoiseScale,)
# and fields never read back from a file (a trial's per-operator trace).
_NOT_READ_BACK = {"trace"}

_LARGEST = 2.0**63  # bytes and seconds beyond this are not a measurement
# C0 and C1 control characters and DEL: escape sequences that would drive the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def optional(kind: Any) -> tuple[str, Any]:
    """The kind of a key a file may leave out (or write as null)."""
    return ("optional", kind)


def clean(text: str) -> str:
    """``text`` with its control characters shown as hexadecimal escapes, never sent as is."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _kind(tp: Any, name: str, null_floats: bool) -> Any:
    """The schema of a field of type ``tp``: a kind, a list of one, a record's dict, or SKIP."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        kind = _kind(next(a for a in args if a is not type(None)), name, null_floats)
        return SKIP if kind == SKIP else optional(kind)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _kind(args[0], name, null_floats)
        return SKIP if item == SKIP else [item]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return schema_of(tp)
    if tp is int:
        return COUNT if name in _COUNTS else INT
    if tp is float and null_floats:
        return NUMBER_OR_NULL
    return {bool: BOOL, float: NUMBER, str: STR}.get(tp, SKIP)


def schema_of(record: type) -> dict[str, Any]:
    """The schema of a record's dict, derived from its fields' types.

    A field with a default, or one that may be None, is optional (older files lack the newer
    ones); the stage records of a :class:`~maxbatch.results.BatchSizeResult` are flat, under
    its JSON keys (``FLAT_KEYS``).

    Returns:
        Each key's kind; an optional one as ``("optional", kind)``.
    """
    hints = typing.get_type_hints(record)
    null_floats = issubclass(record, _NULL_FLOATS)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        kind = _kind(hints[f.name], f.name, null_floats)
        if kind == SKIP or f.name in _NOT_READ_BACK:
            continue
        defaulted = f.default is not dataclasses.MISSING
        defaulted |= f.default_factory is not dataclasses.MISSING
        if f.name in FLAT_KEYS:  # a stage record: its fields in the flat dict
            names = FLAT_KEYS[f.name]
            for sub, sub_kind in kind.items():
                plain = not isinstance(sub_kind, tuple)
                sub_kind = optional(sub_kind) if defaulted and plain else sub_kind
                out[names.get(sub, sub)] = sub_kind
            continue
        out[f.name] = optional(kind) if defaulted and not isinstance(kind, tuple) else kind
    return out


def _checked_dict(value: Any, kind: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} should be an object, not {type(value).__name__}")
    out: dict[str, Any] = {}
    for key, sub in kind.items():
        is_optional = isinstance(sub, tuple)
        sub = sub[1] if is_optional else sub
        if value.get(key) is None:
            if sub == NUMBER_OR_NULL and key in value:
                out[key] = None  # not a finite number: its record's reader takes it back
            elif not is_optional:
                raise ConfigError(f"{where}.{key} is missing")
            continue
        out[key] = checked(value[key], sub, f"{where}.{key}")
    return out


def checked(value: Any, kind: Any, where: str) -> Any:
    """``value`` if it is of ``kind`` (strings cleaned, unknown keys dropped), else an error.

    Returns:
        The value, checked and cleaned.

    Raises:
        ConfigError: a key is missing or has the wrong type or range (the message names it).
    """
    if isinstance(kind, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where} should be a list, not {type(value).__name__}")
        return [checked(item, kind[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(kind, dict):
        return _checked_dict(value, kind, where)
    if kind == STR and isinstance(value, str):
        return clean(value)
    if kind == BOOL and isinstance(value, bool):
        return value
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == COUNT and isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value < _LARGEST:
            return value
        raise ConfigError(f"{where} should be at least 1")
    number = kind in (NUMBER, NUMBER_OR_NULL)
    if numeric and (number or (kind == INT and isinstance(value, int))):
        if math.isfinite(value) and abs(value) < _LARGEST:
            return value
        raise ConfigError(f"{where} is out of range")
    what = "an integer of at least 1" if kind == COUNT else f"a {kind}"
    raise ConfigError(f"{where} should be {what}, not {type(value).__name__}")
