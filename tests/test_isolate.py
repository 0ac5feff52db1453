"""Isolated trials: each trial in a real child process; RLIMIT_AS on the CPU (deaths by signal,
hangs and orphans: test_isolate_deaths.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rlimit import CAP

from maxbatch.errors import ConfigError, ModelFileError, WorkloadError
from maxbatch.run.isolate import probe_file

ROOT = Path(__file__).resolve().parent.parent
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals, RLIMIT_AS")


pytestmark = pytest.mark.usefixtures("children_import_this_checkout")


STEP = 256
CAPPED = CAP + textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from maxbatch.run.isolate import probe_file

    torch.nn.Linear(4, 4)(torch.randn(2, 4)).sum().backward()  # warm the allocator, autograd
    # Each child inherits the cap: a fresh process with torch imported, plus some room. No
    # memory= cap: a virtual capacity beyond the limit would be estimated, not run (the host
    # limits of maxbatch.devices.capacity); the real CPU device's capacity (the host's available
    # memory) is far above it, so the kernel's limit is what stops a trial. 400 MiB hold fewer
    # than 4096 samples of 110 KB: the maximum only spares the first jump's halvings. The coarse
    # grid keeps the children (each a torch start-up) few, and the sizes it runs rarely fall
    # within the few samples of the limit where address-space noise decides a trial.
    cap(400 * 1024**2)
    result = probe_file(
        sys.argv[1],
        isolate=True,
        optimizer="sgd",
        profile=False,
        multiple_of=256,
        max_batch_size=4096,
    )
    print(json.dumps(result.to_dict()))
    """
)


@LINUX
@pytest.mark.slow
def test_children_under_rlimit_as_find_a_verified_ceiling() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CAPPED, str(ROOT / "examples" / "mlp.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    fits = {t["batch_size"]: t["fits"] for t in result["trials"]}
    ceiling = result["ceiling"]
    assert fits[ceiling] is True and fits[ceiling + STEP] is False  # verified from above
    assert STEP < ceiling < 4096  # above the first size, below the maximum: the limit stopped it
    assert any(not t["fits"] and t["oom"] for t in result["trials"])


def test_a_bad_model_file_fails_before_any_child(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("model = 3\nsample = 4\n")
    with pytest.raises(ModelFileError, match="`model`"):
        probe_file(path, isolate=True)


def test_options_a_child_cannot_take_are_refused() -> None:
    with pytest.raises(ConfigError, match="isolated trials cannot take loss_fn"):
        probe_file(ROOT / "examples" / "mlp.py", isolate=True, loss_fn=lambda o, b: o.sum())


@pytest.mark.slow
def test_a_non_oom_error_in_a_child_is_a_workload_error(tmp_path: Path) -> None:
    path = tmp_path / "fails.py"
    path.write_text(
        "import torch\nmodel = torch.nn.Linear(8, 2)\nsample = torch.randn(4, 8)\n"
        "def loss(output, batch):\n    raise ValueError('no loss today')\n"
    )
    with pytest.raises(WorkloadError, match="no loss today") as info:
        probe_file(path, isolate=True, memory="1MiB", profile=False)
    assert info.value.batch_size == 4
