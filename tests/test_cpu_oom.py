"""A real out-of-memory error of the CPU allocator, in a child process under RLIMIT_AS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rlimit import CAP

CHILD = CAP + textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from maxbatch import find_batch_size

    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 10))
    sample = torch.randn(8, 1024)
    # Warm the allocator and the autograd machinery before the address space is capped.
    model(sample).sum().backward()
    model.zero_grad(set_to_none=True)
    cap(160 * 1024**2)
    # No --memory cap and no headroom: only the kernel's limit stops a trial, with the CPU
    # allocator's own error ("DefaultCPUAllocator: can't allocate memory").
    result = find_batch_size(model, sample, headroom=0, optimizer="sgd", device="cpu")
    print(json.dumps(result.to_dict()))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_real_cpu_oom_is_caught_and_the_probe_goes_on() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    trials = result["trials"]
    ooms = [t for t in trials if t["oom"]]
    assert ooms, trials  # the kernel's limit produced real allocator errors
    fits = {t["batch_size"]: t["fits"] for t in trials}
    ceiling = result["ceiling"]
    assert fits[ceiling] is True and fits[ceiling + 1] is False
    assert ceiling > 8


CNN_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from maxbatch import find_batch_size
    from maxbatch.run.modelfile import load_model_file

    spec = load_model_file(sys.argv[1])
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    limit = vm + 300 * 1024**2
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The convolutions run in oneDNN, whose failed allocations say only
    # "could not create a primitive" (maxbatch.step.oom.OOM_WHOLE_MESSAGES).
    result = find_batch_size(spec.model, spec.sample, forward_fn=spec.forward, loss_fn=spec.loss,
                             headroom=0, optimizer="sgd", device="cpu", profile=False)
    print(json.dumps(result.to_dict()))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_real_cpu_oom_inside_onednn_is_an_oom() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "cnn.py"
    out = subprocess.run(
        [sys.executable, "-c", CNN_CHILD, str(example)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    fits = {t["batch_size"]: t["fits"] for t in result["trials"]}
    assert any(t["oom"] for t in result["trials"])
    assert fits[result["ceiling"]] is True and fits[result["ceiling"] + 1] is False
