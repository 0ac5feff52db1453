"""The result cache's files: which ones are its own, reading one safely, checking what it says.

Only names the cache writes are its own: ``<32 hex digits>.json`` entries and ``.<key>.*.tmp``
files left by an interrupted write, each a regular file (never a link, a FIFO or a folder).
Nothing else in the folder is read or removed, and no link inside it is followed. A file is
opened without blocking (``O_NONBLOCK``, ``O_NOFOLLOW``) and used only when ``fstat`` says it is
a regular file, so a FIFO named like an entry cannot hang a probe. An entry that parses is then
checked against the result's schema and invariants (:func:`check_entry`) before it is trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from maxbatch.reportfiles import check_result

__all__ = ["ENTRY_NAME", "check_entry", "entry_files", "read_entry", "remove_own_files"]

#: An entry's file name: the key (32 hex digits) and ``.json``.
ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.json")
#: A temporary file of an entry being written (see ``ResultCache.put``).
_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\..*\.tmp")
#: No entry is this large (one is a few KiB): a bigger file is not one.
_LARGEST_ENTRY = 16 * 2**20


def _regular(directory: Path, name: str) -> bool:
    """Whether ``name`` in ``directory`` is a regular file (a link is not followed)."""
    try:
        return stat.S_ISREG(os.lstat(directory / name).st_mode)
    except OSError:
        return False


def entry_files(directory: Path) -> Iterator[Path]:
    """The entries in ``directory`` (regular files with an entry's name), sorted by name."""
    with contextlib.suppress(OSError):
        names = sorted(os.listdir(directory))
        for name in names:
            if ENTRY_NAME.fullmatch(name) and _regular(directory, name):
                yield directory / name


def read_entry(path: Path) -> dict[str, Any]:
    """The JSON object in the entry file ``path``, read without blocking or following a link.

    Returns:
        The parsed object.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: it is not a regular file (a FIFO, a device, a folder, a link), is too
            large, is not UTF-8 JSON or not an object.
        OSError: it cannot be read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        if os.path.islink(path):
            raise ValueError("a symbolic link, not an entry the cache wrote") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file (a FIFO, a device or a folder)")
        if info.st_size > _LARGEST_ENTRY:
            raise ValueError(f"{info.st_size} bytes, too large for an entry")
        raw = fh.read(_LARGEST_ENTRY + 1)
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _trials_agree(result: Mapping[str, Any], most: int | None) -> str | None:
    """What is wrong with the ceiling's evidence in ``result``'s trials, or None."""
    ceiling = result["ceiling"]
    trials = result["trials"]
    if result.get("ceiling_source", "measured") != "measured":
        return None  # an estimated ceiling ran no trial at it
    if not any(t["batch_size"] == ceiling and t["fits"] for t in trials):
        return f"no trial of the ceiling {ceiling} fits"
    if any(t["batch_size"] > ceiling and t["fits"] for t in trials):
        return f"a size above the ceiling {ceiling} fits"
    if (most is None or ceiling < most) and not any(t["batch_size"] > ceiling for t in trials):
        return f"no size above the ceiling {ceiling} failed"
    return None


def _invariants(result: Mapping[str, Any], most: int | None) -> str | None:
    """What breaks the result's invariants, or None."""
    ceiling, pick = result["ceiling"], result["batch_size"]
    if pick > ceiling:
        return f"the pick {pick} is above the ceiling {ceiling}"
    if most is not None and ceiling > most:
        return f"the ceiling {ceiling} is above the maximum batch size {most}"
    if not 0 <= result["usable_bytes"] <= result["capacity_bytes"]:
        return "the usable bytes are not within the capacity"
    if any(p["batch_size"] > ceiling for p in result.get("throughput", ())):
        return f"a timed size is above the ceiling {ceiling}"
    return _trials_agree(result, most)


def check_entry(data: Mapping[str, Any], key: str) -> None:
    """Check a parsed entry: its key, the result's schema and the result's invariants.

    The invariants: the ceiling, the pick and every trial's size are integers of at least 1,
    the pick is at most the ceiling (and the ceiling at most the maximum batch size asked
    for), a trial at the ceiling fits, none above it does and one above it failed (unless the
    ceiling is that maximum), and no timed size is above the ceiling.

    Raises:
        ValueError: what is wrong, in words.
    """
    if data.get("key") != key:
        raise ValueError(f"its key {data.get('key')!r} is not its file name's")
    result = data.get("result")
    if not isinstance(result, dict):
        raise ValueError("it has no result")
    check_result(result, "result")
    grid = (data.get("description") or {}).get("settings", {}).get("grid")
    most = grid[1] if isinstance(grid, list) and len(grid) == 3 else None
    most = most if isinstance(most, int) and not isinstance(most, bool) else None
    wrong = _invariants(result, most)
    if wrong is not None:
        raise ValueError(wrong)


def remove_own_files(directory: Path) -> int:
    """Remove the cache's own files in ``directory``; return how many entries went.

    Only regular files with an entry's or a temporary file's name are removed (a link, even
    one named like an entry, is left alone and never followed); anything else stays.

    Returns:
        The number of entries removed (temporary files are not counted).
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    for name in names:
        entry = ENTRY_NAME.fullmatch(name) is not None
        if not (entry or _TEMP_NAME.fullmatch(name)) or not _regular(directory, name):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
            removed += entry
    return removed
