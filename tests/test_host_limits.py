"""What this process can hold on the host: free memory, the cgroup's limit, RLIMIT_AS."""

from __future__ import annotations

from pathlib import Path

import pytest

from maxbatch.hostmem import HostLimit, host_limit, host_room

pytest.importorskip("resource")  # not on Windows


def test_host_limit_reads_the_tightest_limit(tmp_path: Path) -> None:
    here = host_limit(tmp_path)  # no cgroup files there: free memory or RLIMIT_AS
    assert here.free_bytes > 0 and here.source in {"free host memory", "RLIMIT_AS"}
    (tmp_path / "memory.max").write_text("1048576\n")
    (tmp_path / "memory.current").write_text("524288\n")
    tight = host_limit(tmp_path)
    assert tight == HostLimit(free_bytes=524288, source="cgroup memory.max", limit_bytes=1048576)
    assert "512.00 KiB left under cgroup memory.max (1.00 MiB)" in tight.describe()
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit
    assert host_limit(tmp_path).source != "cgroup memory.max"
    assert host_room(1000, HostLimit(free_bytes=1000, source="x")) == 1900
