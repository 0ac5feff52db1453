"""Reading a saved ``report.json`` (or a cache entry's result) back, defensively.

Only the keys of the result's records, with the types their fields have (the schema is derived
from the dataclass fields), and with terminal control characters shown as escapes, never sent to
the terminal. What passes the check comes back as a :class:`~maxbatch.results.BatchSizeResult`
(``from_dict``), which the renderers take like a fresh one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

from maxbatch.errors import ConfigError
from maxbatch.results import FLAT_KEYS, BatchSizeResult, CapacityAnswer, SearchAnswer

__all__ = ["SavedReport", "check_result", "load_report", "result_from_checked"]

# -- reading a saved report back -------------------------------------------------------------

_NUMBER = "number"
_INT = "int"
_BOOL = "bool"
_STR = "str"
_COUNT = "count"  # an int of at least 1
_SKIP = "skip"  # a field the check leaves out


def _optional(kind: Any) -> tuple[str, Any]:
    return ("optional", kind)


# The schema is derived from the records' fields (:func:`_schema`); what their types cannot say:
# sizes are integers of at least 1,
_COUNTS = {"batch_size", "ceiling", "world_size", "accumulation_steps"}
# records whose ``to_dict`` is not their fields (non-finite numbers as None, a property added),
# or never read back from a file (a trial's trace, free-form ``dict[str, Any]`` fields),
_NOT_READ_BACK = {"noise_scale", "trace"}
# A file may leave out what a record needs and the renderers never read.
_UNREAD = {"complete"}
# and the keys that are no field: the result's derived numbers and the report's model file.
_EXTRA: dict[str, Any] = {
    "accumulation_steps": _COUNT,
    "global_batch_size": _INT,
    "model_file": _STR,
}


def _kind(tp: Any, name: str) -> Any:
    """The schema of a field of type ``tp``: a kind, a list of one, a record's dict, or _SKIP."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        kind = _kind(next(a for a in args if a is not type(None)), name)
        return _SKIP if kind == _SKIP else _optional(kind)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _kind(args[0], name)
        return _SKIP if item == _SKIP else [item]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _schema(tp)
    if tp is int:
        return _COUNT if name in _COUNTS else _INT
    return {bool: _BOOL, float: _NUMBER, str: _STR}.get(tp, _SKIP)


def _schema(record: type) -> dict[str, Any]:
    """The schema of a record's dict, derived from its fields' types.

    A field with a default, or one that may be None, is optional (older files lack the newer
    ones); the nested records of a :class:`~maxbatch.results.BatchSizeResult` are flat, under
    its JSON keys.

    Returns:
        Each key's kind; an optional one as ``("optional", kind)``.
    """
    hints = typing.get_type_hints(record)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        kind = _kind(hints[f.name], f.name)
        if kind == _SKIP or f.name in _NOT_READ_BACK:
            continue
        defaulted = f.default is not dataclasses.MISSING
        defaulted |= f.default_factory is not dataclasses.MISSING
        if f.name in FLAT_KEYS:  # a stage record: its fields in the flat dict
            names = FLAT_KEYS[f.name]
            for sub, sub_kind in kind.items():
                plain = not isinstance(sub_kind, tuple)
                sub_kind = _optional(sub_kind) if defaulted and plain else sub_kind
                out[names.get(sub, sub)] = sub_kind
            continue
        out[f.name] = _optional(kind) if defaulted and not isinstance(kind, tuple) else kind
    return out


def _result_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """The result's required keys and its optional ones, each with its kind."""
    schema = _schema(BatchSizeResult)
    schema.update({k: _optional(schema[k]) for k in _UNREAD})
    required = {k: v for k, v in schema.items() if not isinstance(v, tuple)}
    optional = {k: v[1] for k, v in schema.items() if isinstance(v, tuple)}
    return required, {**optional, **_EXTRA}


_REQUIRED, _OPTIONAL = _result_schema()
# Keys the renderers read only together with another one.
_TOGETHER = {
    "pick_confidence": "pick_confidence_reason",
    "world_size": "global_batch_size",  # when above 1
    "accumulation_steps": "global_batch_size",  # when above 1
}
_LARGEST = 2.0**63  # bytes and seconds beyond this are not a measurement

# C0 and C1 control characters and DEL: escape sequences that would drive the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _checked(value: Any, kind: Any, where: str) -> Any:
    """``value`` if it is of ``kind`` (strings cleaned, unknown keys dropped), else an error."""
    if isinstance(kind, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where} should be a list, not {type(value).__name__}")
        return [_checked(item, kind[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} should be an object, not {type(value).__name__}")
        out = {}
        for key, sub in kind.items():
            optional = isinstance(sub, tuple)
            if value.get(key) is None:
                if optional:
                    continue
                raise ConfigError(f"{where}.{key} is missing")
            out[key] = _checked(value[key], sub[1] if optional else sub, f"{where}.{key}")
        return out
    if kind == _STR and isinstance(value, str):
        return _clean(value)
    if kind == _BOOL and isinstance(value, bool):
        return value
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _COUNT and isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value < _LARGEST:
            return value
        raise ConfigError(f"{where} should be at least 1")
    if numeric and (kind == _NUMBER or (kind == _INT and isinstance(value, int))):
        if math.isfinite(value) and abs(value) < _LARGEST:
            return value
        raise ConfigError(f"{where} is out of range")
    what = "an integer of at least 1" if kind == _COUNT else f"a {kind}"
    raise ConfigError(f"{where} should be {what}, not {type(value).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SavedReport:
    """A ``report.json`` read back.

    Attributes:
        result: the result, checked and cleaned (only what the renderers read).
        model_file: the model file it was probed from, when the report names one.
    """

    result: BatchSizeResult
    model_file: str | None = None


def load_report(path: str) -> SavedReport:
    """Read a ``report.json`` for rendering: checked, reduced to what renders, control-free.

    Returns:
        The report: its result (checked and cleaned) and its model file.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 JSON, nests too deeply, or lacks a
            key the renderers need or has one of the wrong type (the message names the key).
    """
    shown = _clean(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read it ({e.strerror})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: not UTF-8 text (byte {e.start}); not a maxbatch report") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{shown}: not JSON ({e.msg} at line {e.lineno})") from e
    except RecursionError:
        raise ConfigError(f"{shown}: JSON nested too deeply; not a maxbatch report") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: not a maxbatch report (a JSON object is expected)")
    missing = sorted(k for k in _REQUIRED if data.get(k) is None)
    if missing:
        raise ConfigError(f"{shown}: not a maxbatch report (missing the keys {missing})")
    try:
        checked = check_result(data, "report")
    except ConfigError as e:
        raise ConfigError(f"{shown}: not a maxbatch report ({e})") from None
    return SavedReport(result=result_from_checked(checked), model_file=checked.get("model_file"))


def _no_default(record: type, names: dict[str, str]) -> set[str]:
    """The flat keys of ``record``'s fields that have no default."""
    return {
        names.get(f.name, f.name)
        for f in dataclasses.fields(record)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


# The check leaves out an optional key that is null or missing in the file; those with no default
# in their record come back as None (``precision``, ``optimizer``, ``memory_model``), and
# ``complete``, which the renderers never read, as the probe's usual True.
_AS_NONE = {
    key
    for record, names in (
        (BatchSizeResult, {}),
        (CapacityAnswer, FLAT_KEYS["capacity"]),
        (SearchAnswer, FLAT_KEYS["search"]),
    )
    for key in _no_default(record, names)
    if key in _OPTIONAL and key not in _UNREAD
}


def result_from_checked(checked: dict[str, Any]) -> BatchSizeResult:
    """The result of a dict that passed :func:`check_result`.

    Returns:
        The result, as :meth:`BatchSizeResult.from_dict` builds it.
    """
    absent = {key: None for key in _AS_NONE if key not in checked}
    return BatchSizeResult.from_dict({"complete": True, **absent, **checked})


def check_result(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A result's dict checked against its schema: reduced to what renders, control-free.

    The ceiling, the pick and each trial's size must be integers of at least 1; numbers
    finite; strings are cleaned of control characters (also a cache entry's: see
    :mod:`maxbatch.store.cachefiles`).

    Returns:
        The keys the renderers read, checked and cleaned.

    Raises:
        ConfigError: a key is missing or has the wrong type or range (the message names it).
    """
    schema = {**_REQUIRED, **{key: _optional(kind) for key, kind in _OPTIONAL.items()}}
    out: dict[str, Any] = _checked(data, schema, where)
    for key, needs in _TOGETHER.items():
        if out.get(key) not in (None, 1) and needs not in out:
            raise ConfigError(f"{where}.{needs} is missing ({where}.{key} needs it)")
    return out
