"""Reading a saved ``report.json`` (or a cache entry's result) back, defensively.

A report is one of three answers, told apart by its keys: a batch-size result (``ceiling``), a
bucket profile of ``--buckets`` (``buckets``) or the longest length of ``--find length``
(``max_length``). Each is checked against the schema derived from its record's fields
(:mod:`maxbatch.store.schema`: only those keys, with their fields' types, control characters
shown as escapes) and comes back as its record (``from_dict``), which the renderers take like a
fresh one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from maxbatch.buckets import BucketProfile, LengthMemoryModel, LengthResult, LengthTrial
from maxbatch.errors import ConfigError
from maxbatch.results import FLAT_KEYS, BatchSizeResult, CapacityAnswer, SearchAnswer
from maxbatch.store.schema import checked, clean, optional, schema_of

__all__ = ["SavedReport", "check_result", "load_report", "result_from_checked"]

# A file may leave out what a record needs and the renderers never read.
_UNREAD = {"complete"}
# The keys that are no field: the result's derived numbers and the report's model file.
_EXTRA: dict[str, Any] = {
    "accumulation_steps": "count",
    "global_batch_size": "int",
    "model_file": "str",
}


def _result_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """The result's required keys and its optional ones, each with its kind."""
    schema = schema_of(BatchSizeResult)
    schema.update({k: optional(schema[k]) for k in _UNREAD})
    required = {k: v for k, v in schema.items() if not isinstance(v, tuple)}
    optional_keys = {k: v[1] for k, v in schema.items() if isinstance(v, tuple)}
    return required, {**optional_keys, **_EXTRA}


_REQUIRED, _OPTIONAL = _result_schema()
# Keys the renderers read only together with another one.
_TOGETHER = {
    "pick_confidence": "pick_confidence_reason",
    "world_size": "global_batch_size",  # when above 1
    "accumulation_steps": "global_batch_size",  # when above 1
}
# The length axis's answers: the key that tells each apart, and its record.
_LENGTH_ANSWERS: dict[str, type[BucketProfile] | type[LengthResult]] = {
    "buckets": BucketProfile,
    "max_length": LengthResult,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SavedReport:
    """A ``report.json`` read back.

    Attributes:
        result: the answer, checked and cleaned (only what the renderers read): a batch-size
            result, or the bucket profile of ``--buckets``, or the longest length of
            ``--find length``.
        model_file: the model file it was probed from, when the report names one.
    """

    result: BatchSizeResult | BucketProfile | LengthResult
    model_file: str | None = None


def _read_json(path: str, shown: str) -> Any:
    """The parsed JSON of ``path``; a :class:`ConfigError` naming ``shown`` if it is none."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read it ({e.strerror})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: not UTF-8 text (byte {e.start}); not a maxbatch report") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{shown}: not JSON ({e.msg} at line {e.lineno})") from e
    except RecursionError:
        raise ConfigError(f"{shown}: JSON nested too deeply; not a maxbatch report") from None


def load_report(path: str) -> SavedReport:
    """Read a ``report.json`` for rendering: checked, reduced to what renders, control-free.

    Returns:
        The report: its answer (checked and cleaned) and its model file.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 JSON, nests too deeply, is none of
            the three reports, or lacks a key the renderers need or has one of the wrong type
            (the message names the key).
    """
    shown = clean(path)
    data = _read_json(path, shown)
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: not a maxbatch report (a JSON object is expected)")
    try:
        model_file = checked(data, {"model_file": optional("str")}, "report").get("model_file")
    except ConfigError as e:
        raise ConfigError(f"{shown}: not a maxbatch report ({e})") from None
    kind = next((key for key in _LENGTH_ANSWERS if key in data and "ceiling" not in data), None)
    if kind is not None:
        answer = _length_answer(data, _LENGTH_ANSWERS[kind], shown)
        return SavedReport(result=answer, model_file=model_file)
    missing = sorted(k for k in _REQUIRED if data.get(k) is None)
    if "ceiling" in missing:
        raise ConfigError(
            f"{shown}: not a maxbatch report: neither a batch-size report (no 'ceiling' key) nor "
            "a --buckets or --find length report (no 'buckets' or 'max_length' key)"
        )
    if missing:
        raise ConfigError(f"{shown}: not a maxbatch report (missing the keys {missing})")
    try:
        result = result_from_checked(check_result(data, "report"))
    except ConfigError as e:
        raise ConfigError(f"{shown}: not a maxbatch report ({e})") from None
    return SavedReport(result=result, model_file=model_file)


def _length_answer(
    data: dict[str, Any], record: type[BucketProfile] | type[LengthResult], shown: str
) -> BucketProfile | LengthResult:
    """The bucket profile or longest length of a report's dict, checked against its schema.

    Returns:
        The record, as the renderers take it.

    Raises:
        ConfigError: a key is missing or has the wrong type or range, or the record refuses
            the values (buckets out of order, a pick above its ceiling).
    """
    what = "bucket report" if record is BucketProfile else "--find length report"
    try:
        fields = checked(data, schema_of(record), "report")
        if record is BucketProfile:
            return BucketProfile.from_dict(fields)
        model, trials = fields.get("memory_model"), fields.get("trials", ())
        return LengthResult(
            **{k: v for k, v in fields.items() if k not in ("memory_model", "trials", "notes")},
            memory_model=None if model is None else LengthMemoryModel(**model),
            trials=tuple(LengthTrial(**t) for t in trials),
            notes=tuple(fields.get("notes", ())),
        )
    except ConfigError as e:
        raise ConfigError(f"{shown}: not a maxbatch {what} ({e})") from None


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


def result_from_checked(checked_result: dict[str, Any]) -> BatchSizeResult:
    """The result of a dict that passed :func:`check_result`.

    Returns:
        The result, as :meth:`BatchSizeResult.from_dict` builds it.
    """
    absent = {key: None for key in _AS_NONE if key not in checked_result}
    return BatchSizeResult.from_dict({"complete": True, **absent, **checked_result})


def check_result(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A result's dict checked against its schema: reduced to what renders, control-free.

    The ceiling, the pick and each trial's size must be integers of at least 1; numbers
    finite (a noise scale's may be null: not finite); strings are cleaned of control
    characters (also a cache entry's: see :mod:`maxbatch.store.cachefiles`).

    Returns:
        The keys the renderers read, checked and cleaned.

    Raises:
        ConfigError: a key is missing or has the wrong type or range (the message names it).
    """
    schema = {**_REQUIRED, **{key: optional(kind) for key, kind in _OPTIONAL.items()}}
    out: dict[str, Any] = checked(data, schema, where)
    for key, needs in _TOGETHER.items():
        if out.get(key) not in (None, 1) and needs not in out:
            raise ConfigError(f"{where}.{needs} is missing ({where}.{key} needs it)")
    return out
