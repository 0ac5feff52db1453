"""Report files: the ``--report`` folder (checked first, written atomically), and reading back.

The folder is checked before the first trial, so a bad path costs no probe. The files are
written into a fresh temporary folder beside their target and renamed into place: a failure
leaves no partial report, and no file is ever written through a symbolic link. A saved
``report.json`` is read back defensively (:mod:`maxbatch.store.reportcheck`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from maxbatch.errors import ConfigError, ReportWriteError
from maxbatch.store.reportcheck import check_result, load_report

__all__ = ["REPORT_FILES", "check_report_dir", "check_result", "load_report", "write_report"]

#: The files ``--report`` may write.
REPORT_FILES = ("report.json", "report.md", "memory.png", "throughput.png")


def check_report_dir(path: str | os.PathLike[str]) -> Path:
    """Check that the report can be written to ``path`` (a folder, made if missing).

    Returns:
        The folder, as a path.

    Raises:
        ConfigError: ``path`` or one of the report files in it is a symbolic link (also a
            dangling one), ``path`` is a file, a report file name in it is taken by a folder, or
            the folder (or its nearest existing parent) is not writable.
    """
    out = Path(path)
    if out.is_symlink():
        raise ConfigError(f"--report {out}: is a symbolic link; give the real folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--report {out}: is a file, not a folder; give a folder to write into")
    if out.is_dir():
        for name in REPORT_FILES:
            entry = out / name
            if entry.is_symlink():
                raise ConfigError(
                    f"--report {out}: {name} is a symbolic link; maxbatch never writes through "
                    "a link: remove it"
                )
            if entry.is_dir():
                raise ConfigError(f"--report {out}: {name} is a folder; remove or rename it")
        parent = out
    else:
        parent = out.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"--report {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--report {out}: {parent} is not writable")
    _try_creating(out, parent)
    return out


def _try_creating(out: Path, parent: Path) -> None:
    """Create (and remove) a folder in ``parent``: access rights alone do not say it can be.

    ``/proc``, ``/sys`` and read-only mounts grant access to root and refuse every creation.

    Raises:
        ConfigError: the folder cannot be created, with the system's reason.
    """
    try:
        Path(tempfile.mkdtemp(prefix=".maxbatch-check-", dir=parent)).rmdir()
    except OSError as e:
        raise ConfigError(f"--report {out}: cannot create files in {parent} ({e.strerror})") from e


def write_report(out: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """Write a report into ``out`` atomically; return the names of the files written.

    ``write(folder)`` writes the files into a fresh temporary folder. A new ``out`` is that
    folder renamed; in an existing ``out`` each file is renamed into place (replacing a file of
    the same name, never following a link). Any error removes the temporary folder.

    Returns:
        The names of the files written.

    Raises:
        ReportWriteError: the files could not be written (a full disk, a file system that
            refuses them): nothing of the report is left behind.
    """
    check_report_dir(out)
    existing = out.is_dir()
    try:
        if not existing:
            out.parent.mkdir(parents=True, exist_ok=True)
        where = out if existing else out.parent
        temp = Path(tempfile.mkdtemp(prefix=".maxbatch-report-", dir=where))
    except OSError as e:
        raise ReportWriteError(out, e) from e
    try:
        names = write(temp)
        if existing:
            for name in names:
                os.replace(temp / name, out / name)
            temp.rmdir()
        else:
            umask = os.umask(0)
            os.umask(umask)
            temp.chmod(0o777 & ~umask)  # mkdtemp's folder is private
            os.rename(temp, out)
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ReportWriteError(out, e) from e
        raise
    return names
