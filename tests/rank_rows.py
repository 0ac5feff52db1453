"""Running a multi-process script from a test and reading the JSON row each rank writes.

The ranks share one stdout, and two ranks printing at once can land on one line; so each rank
writes its row to a file of its own (``rank-<n>.json``) in the folder the test names in the
``MAXBATCH_ROWS_DIR`` environment variable, and the test reads the folder when the run is over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ROWS_DIR = "MAXBATCH_ROWS_DIR"


def write_row(row: dict[str, Any]) -> None:
    """In a rank: write ``row`` (with its ``rank``) to its own file in ``$MAXBATCH_ROWS_DIR``."""
    path = Path(os.environ[ROWS_DIR]) / f"rank-{int(row['rank'])}.json"
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(row))
    partial.replace(path)  # the reader sees a whole row or none


def rank_rows(*args: str, timeout: float = 300) -> list[dict[str, Any]]:
    """Run ``python *args`` from the repository root; the rows the ranks wrote, by rank."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as rows_dir:
        out = subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": path, ROWS_DIR: rows_dir},
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [json.loads(file.read_text()) for file in Path(rows_dir).glob("rank-*.json")]
    return sorted(rows, key=lambda row: int(row["rank"]))
