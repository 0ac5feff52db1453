"""Running a multi-process script from a test and reading the JSON line each rank prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "MAXBATCH "


def rank_rows(*args: str, timeout: float = 300) -> list[dict[str, Any]]:
    """Run ``python *args`` from the repository root; the ``MAXBATCH {json}`` rows, by rank."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [
        json.loads(line[len(PREFIX) :])
        for line in out.stdout.splitlines()
        if line.startswith(PREFIX)
    ]
    return sorted(rows, key=lambda row: int(row["rank"]))
