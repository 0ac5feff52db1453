"""The result cache: a repeat probe of the same step on the same device skips the search.

Entries live under the user cache directory (``$XDG_CACHE_HOME/maxbatch``, default
``~/.cache/maxbatch``), one JSON file per key. The key is a hash of everything that changes the
answer (see :mod:`maxbatch.store.cachekey`): the model's structure (module types, parameter and
buffer shapes, dtypes and ``requires_grad``), the batch's shapes and dtypes, the optimizer's type
and the hyper-parameters that change its memory, the user's step functions (their code), the
device's name and total memory, every field of the request that changes the answer (mode,
precision, capacity, headroom, grid, pick, advice, loop: :mod:`maxbatch.run.request`), and the
torch and maxbatch versions.

A hit is checked before it is used (:func:`verified`): the cached ceiling is run once and must
fit, the size above it once and must not (unless the ceiling is the maximum allowed); a hit that
fails the check is probed again and replaced. Entries are written atomically (a temporary file
renamed over the old one); an entry that cannot be read, or that breaks the result's schema
or invariants (:mod:`maxbatch.store.cachefiles`), is ignored with a warning and probed afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from maxbatch.results import BatchSizeResult, CachedSearch, Trial
from maxbatch.store.cachefiles import check_entry, entry_files, read_entry, remove_own_files
from maxbatch.store.cachekey import FORMAT, describe, key_of

__all__ = [
    "FORMAT",
    "CacheEntry",
    "ResultCache",
    "cache_dir",
    "describe",
    "from_cache",
    "key_of",
    "verified",
]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/maxbatch``, or ``~/.cache/maxbatch`` when the variable is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "maxbatch"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheEntry:
    """One stored result, as ``maxbatch cache list`` shows it.

    Attributes:
        key: the key (the file name without ``.json``).
        path: the file.
        created: when it was stored (ISO 8601, UTC).
        model: the model's class and parameter count, in words.
        device: the device name it was measured on.
        ceiling: the cached ceiling.
        batch_size: the cached pick.
    """

    key: str
    path: Path
    created: str
    model: str
    device: str
    ceiling: int
    batch_size: int


class ResultCache:
    """The results stored in one directory (default :func:`cache_dir`)."""

    def __init__(self, directory: Path | None = None):
        self.directory = cache_dir() if directory is None else directory

    def path(self, key: str) -> Path:
        """The file of ``key``."""
        return self.directory / f"{key}.json"

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            data = read_entry(path)
            if data.get("format") != FORMAT:
                raise ValueError("not a maxbatch cache entry of this version")
            check_entry(data, path.stem)
            BatchSizeResult.from_dict(data["result"])  # every record must come back
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(
                f"maxbatch: ignoring the invalid cache entry {path} ({type(e).__name__}: {e}); "
                "it is replaced by the next probe (maxbatch cache clear removes it)",
                stacklevel=3,
            )
            return None
        return data

    def get(self, key: str) -> BatchSizeResult | None:
        """The stored result of ``key``, or None (missing, or unreadable: with a warning)."""
        data = self._read(self.path(key))
        return None if data is None else BatchSizeResult.from_dict(data["result"])

    def put(self, key: str, result: BatchSizeResult, description: Mapping[str, Any]) -> Path | None:
        """Store ``result`` under ``key`` atomically: a reader sees the old entry or the new one.

        A cache that cannot be written (permissions, a full disk) warns and stores nothing:
        the answer itself stands.

        Returns:
            The entry's file, or None when the cache could not be written.
        """
        params = sum(math.prod(p[1]) for p in description.get("parameters", ()))
        top = (description.get("modules") or [["", "?"]])[0][1]
        entry = {
            "format": FORMAT,
            "key": key,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": f"{top}, {params:,} parameters",
            "description": description,
            "result": result.to_dict(),
        }
        target = self.path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        except OSError as e:
            warnings.warn(f"maxbatch: cannot write the cache {self.directory}: {e}", stacklevel=2)
            return None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entry, fh, indent=1, default=repr)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as e:
            warnings.warn(f"maxbatch: cannot write the cache entry {target}: {e}", stacklevel=2)
            return None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # gone after the rename; left over only after a failure
        return target

    def entries(self) -> list[CacheEntry]:
        """Every readable entry, newest first (unreadable ones are skipped with a warning)."""
        found = []
        for path in self._files():
            data = self._read(path)
            if data is None:
                continue
            r = data["result"]
            found.append(
                CacheEntry(
                    key=path.stem,
                    path=path,
                    created=str(data.get("created", "?")),
                    model=str(data.get("model", "?")),
                    device=f"{r['device']} ({r['device_name']})",
                    ceiling=int(r["ceiling"]),
                    batch_size=int(r["batch_size"]),
                )
            )
        return sorted(found, key=lambda e: e.created, reverse=True)

    def clear(self) -> int:
        """Remove the cache's own entries (and stray temporary files); return how many went.

        Only files the cache writes are removed
        (:func:`maxbatch.store.cachefiles.remove_own_files`):
        never another file in the folder, never through a link.

        Returns:
            The number of entries removed.
        """
        return remove_own_files(self.directory)

    def _files(self) -> Iterator[Path]:
        yield from entry_files(self.directory)


def verified(
    hit: BatchSizeResult,
    run: Callable[[int], Trial],
    *,
    multiple_of: int,
    max_batch_size: int | None,
) -> tuple[bool, str]:
    """Run the cached ceiling (it must fit) and the size above it (it must not).

    Above the maximum batch size nothing is run. Returns whether the hit holds and, in words,
    what the check found.

    Returns:
        Whether the hit holds, and what the check found, in words.
    """
    ceiling = hit.ceiling
    if not run(ceiling).fits:
        return False, f"the cached ceiling {ceiling} does not fit any more"
    above = ceiling + multiple_of
    if max_batch_size is not None and above > max_batch_size:
        return True, f"{ceiling} fits (the maximum batch size)"
    if run(above).fits:
        return False, f"{above}, above the cached ceiling {ceiling}, fits now"
    return True, f"{ceiling} fits and {above} does not"


def from_cache(
    hit: BatchSizeResult,
    key: str,
    check: str | None,
    seconds: float,
    trials: tuple[Trial, ...] = (),
) -> BatchSizeResult:
    """The cached result as this call's answer: marked, with how it was checked.

    ``trials`` (this run's: the check) replace the stored search's, which stay apart in
    ``cached_search`` with their wall time of then.

    Returns:
        The answer.
    """
    how = "trusted without a check (trust_cache)" if check is None else f"checked now: {check}"
    note = f"from the cache (key {key[:12]}): {how}"
    stored = CachedSearch(key=key, trials=hit.trials, seconds=hit.seconds)
    return dataclasses.replace(
        hit,
        from_cache=True,
        notes=(note, *hit.notes),
        seconds=seconds,
        search=dataclasses.replace(hit.search, trials=trials),
        cached_search=stored,
    )
