"""``--report`` where the files cannot go: a full file system, ``/proc``, ``/sys``.

The answer reaches stdout first; then one line says why the report could not be written, exit 3,
and nothing of the report is left. Folders that refuse every creation are found up front.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from maxbatch.cli import main

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "examples" / "mlp.py")

# In a mount namespace of its own (gone with the process): a 64 KiB tmpfs, 48 KiB of it taken,
# the probe, and what is left in it.
_FULL_DISK = """
mount -t tmpfs -o size=64k tmpfs "$1" || exit 99
head -c 49152 /dev/zero > "$1/other" || exit 99
"$2" -m maxbatch probe "$3" --memory 32MiB --no-cache --no-profile --report "$1/r"
rc=$?
echo "left: [$(ls -A "$1")]"
exit $rc
"""


def _full_disk(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    cmd = ["unshare", "-rm", "sh", "-c", _FULL_DISK, "sh", str(mount), sys.executable, MLP]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    if done.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return done


@pytest.mark.slow
def test_a_full_disk_loses_neither_the_answer_nor_leaves_a_partial_report(tmp_path: Path) -> None:
    done = _full_disk(tmp_path)
    assert done.returncode == 3, done.stderr
    out = done.stdout
    assert "ceiling: " in out and "batch size: " in out  # the answer, on stdout
    assert out.rstrip().endswith("left: [other]")  # no report folder, no temporary folder
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("maxbatch: error: the report could not be written to ")
    assert "(No space left on device)" in last and "the answer above stands" in last
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("target", ["/proc/maxbatch-report", "/sys/maxbatch-report", "/proc/1"])
def test_a_folder_that_refuses_creation_is_refused_before_any_trial(target: str) -> None:
    if not Path(target).parent.exists():
        pytest.skip(f"no {Path(target).parent} here")
    res = CliRunner().invoke(main, ["probe", MLP, "--memory", "32MiB", "--report", target])
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"maxbatch: error: --report {target}: ")
    assert "trial" not in res.stderr and res.stdout == ""
    assert not Path(target).exists() or target == "/proc/1"
