"""Reliability figures: state after faults, memory after OOMs, errors told apart, bad inputs.

1. The fault matrix of ``benchmarks/faults.py`` (14 set-ups x 4 faults): cases whose state is
   bit-identical afterwards, with the same tensor objects.
2. 100 out-of-memory trials in a row on the virtual device, watched by an outer counter: bytes and
   tensors still alive afterwards.
3. Non-memory failures raised inside the step: how many the probe takes for an OOM (it must
   re-raise every one), and the real OOM messages of ``tests/test_oom.py`` it recognises.
4. Bad inputs to the command line: how many end with the right exit code and one clear line.
5. Across processes and at the edges (``processes.py``): ``--isolate`` children that crash, hang
   or lose their parent; Ctrl-C / SIGTERM in the command's first seconds; absurd sizes; models
   on the meta device; ``--report`` under a linked parent. Cases handled of cases tried.
6. Issue 18's second round (``benchmarks/hardening.py``): full disks, hostile caches, interrupts
   in the save or restore, optimizer-step OOMs, non-finite losses, scalers on ``self``, cache hits.

Run from the repository root (about four minutes on 2 busy cores, 3.5 of them section 5)::

    python benchmarks/reliability.py
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from faults import FAULTS, SETUPS, capture, differences, run  # noqa: E402
from processes import (  # noqa: E402
    absurd_sizes,
    early_signals,
    isolated_deaths,
    meta_models,
    report_link_parents,
)

from maxbatch import WorkloadError, find_batch_size  # noqa: E402
from maxbatch.devices.accounting import MemoryCounter  # noqa: E402
from maxbatch.search.meter import CountingMeter  # noqa: E402
from maxbatch.search.trial import run_trial  # noqa: E402
from maxbatch.step.batching import make_batch_fn  # noqa: E402
from maxbatch.step.oom import is_oom  # noqa: E402
from maxbatch.step.workload import Workload, make_optimizer  # noqa: E402


def state_matrix() -> tuple[int, int, list[str]]:
    """Cases bit-identical after the probe, of all cases, and the failing ones."""
    failing = []
    for name, build in SETUPS.items():
        for fault in FAULTS:
            case = build()
            before = capture(case)
            run(case, fault)
            diff = differences(before, capture(case))
            if diff:
                failing.append(f"{name} x {fault}: {diff[:3]}")
    total = len(SETUPS) * len(FAULTS)
    return total - len(failing), total, failing


def _live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): a lazy deprecated object in torch warns when asked its __class__.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def leaks_after_ooms(trials: int = 100) -> tuple[int, int, int]:
    """(OOM trials, bytes still counted, tensors still alive) after ``trials`` OOMs in a row."""
    from models import cnn

    model, sample = cnn()
    make_batch, _ = make_batch_fn(sample)
    work = Workload(model, make_batch, torch.device("cpu"), optimizer=make_optimizer("adam", model))
    with work, CountingMeter(torch.device("cpu")) as meter:
        meter.set_usable(400_000)
        run_trial(work, meter, 4)  # the optimizer's state exists from here on
        outer = MemoryCounter()
        outer.track(work.state_tensors())
        before_bytes, before_tensors = outer.live_bytes, _live_tensors()
        with outer:
            ooms = sum(run_trial(work, meter, 512).oom for _ in range(trials))
        outer.track(work.state_tensors())
        leaked = outer.live_bytes - before_bytes, _live_tensors() - before_tensors
    return ooms, *leaked


NON_OOM: dict[str, Callable[[], BaseException]] = {
    "ValueError": lambda: ValueError("bad value"),
    "TypeError": lambda: TypeError("forward() missing 1 required positional argument"),
    "shape mismatch": lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3)"),
    "IndexError": lambda: IndexError("index 50 is out of bounds for dimension 0"),
    "KeyError": lambda: KeyError("labels"),
    "AttributeError": lambda: AttributeError("'Tensor' object has no attribute 'logits'"),
    "ZeroDivisionError": lambda: ZeroDivisionError("division by zero"),
    "AssertionError": lambda: AssertionError("shapes differ"),
    "NotImplementedError": lambda: NotImplementedError("no kernel for this dtype"),
    "RecursionError": lambda: RecursionError("maximum recursion depth exceeded"),
    "OSError ENOMEM": lambda: OSError(12, "Cannot allocate memory"),
    "illegal memory access": lambda: RuntimeError(
        "CUDA error: an illegal memory access was encountered"
    ),
    "cuDNN NOT_SUPPORTED": lambda: RuntimeError(
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
        "non-contiguous input."
    ),
    "oneDNN descriptor": lambda: RuntimeError(
        "could not create a primitive descriptor for a convolution forward propagation primitive"
    ),
    "bare out of memory": lambda: RuntimeError("out of memory"),
    "SystemExit(0)": lambda: SystemExit(0),
}


def misclassified() -> tuple[int, int]:
    """(non-memory failures the probe took for an OOM, kinds tried)."""
    from models import mlp

    wrong = 0
    for make in NON_OOM.values():
        model, sample = mlp()

        def forward(m: torch.nn.Module, batch: torch.Tensor, make: Any = make) -> torch.Tensor:
            if batch.shape[0] > 4:
                raise make()
            return m(batch)

        try:
            find_batch_size(model, sample, forward_fn=forward, memory=200_000, profile=False)
            wrong += 1  # an answer: the failure was taken for "does not fit"
        except WorkloadError:
            pass
        except Exception:  # noqa: BLE001 - any other ending is a misclassification too
            wrong += 1
    return wrong, len(NON_OOM)


def recognised() -> tuple[int, int]:
    """(real OOM messages recognised, real OOM messages) from tests/test_oom.py."""
    from test_oom import REAL_MESSAGES

    ooms = [message for message, expected in REAL_MESSAGES if expected]
    return sum(is_oom(RuntimeError(m)) for m in ooms), len(ooms)


_MODEL = "import torch\nmodel = torch.nn.Linear(32, 2)\n"
_SAMPLES = {
    "sample is a string": "'text'",
    "sample is an empty tensor": "torch.zeros(0, 32)",
    "sample is a 0-dim tensor": "torch.tensor(1.0)",
    "sample is a list of ints": "[1, 2, 3]",
    "sample is a NumPy array": "__import__('numpy').zeros((4, 32))",
    "sample's tensors disagree": "{'x': torch.zeros(4, 32), 'y': torch.zeros(3)}",
}


def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], int]]:
    """(what, argv, expected exit code) for each bad input."""
    good = tmp / "good.py"
    good.write_text(_MODEL + "sample = torch.randn(4, 32)\n")
    cases = []
    for i, (what, value) in enumerate(_SAMPLES.items()):
        path = tmp / f"sample{i}.py"
        path.write_text(_MODEL + f"sample = {value}\n")
        cases.append((what, ["probe", str(path), "--memory", "64MiB"], 2))
    files = {
        "syntax error": "model = (\n",
        "no model": "sample = 1\n",
        "model is a class": "import torch\nmodel = torch.nn.Linear\nsample = torch.zeros(2, 2)\n",
        "import fails": "import not_a_module_anywhere\n",
        "exit at import": "import sys\nsys.exit(0)\n",
        "sys.exit(0) in the step": _MODEL
        + "sample = torch.randn(4, 32)\n"
        + "def forward(model, batch):\n    raise SystemExit(0)\n",
    }
    for i, (what, source) in enumerate(files.items()):
        path = tmp / f"file{i}.py"
        path.write_text(source)
        code = 1 if "in the step" in what else 2
        cases.append((what, ["probe", str(path), "--memory", "64MiB"], code))
    (tmp / "afile").write_text("x")
    (tmp / "link").symlink_to(tmp / "nowhere")
    reports = {
        "not UTF-8": b"\xff\xfe",
        "deeply nested": b"[" * 100000,
        "partial": b'{"ceiling": 1}',
    }
    for i, (what, blob) in enumerate(reports.items()):
        (tmp / f"r{i}.json").write_bytes(blob)
        cases.append((f"report file {what}", ["report", str(tmp / f"r{i}.json")], 2))
    probe = ["probe", str(good)]
    cases += [
        ("model file missing", ["probe", str(tmp / "missing.py")], 2),
        ("model file not .py", ["probe", str(tmp / "afile")], 2),
        ("--memory lots", [*probe, "--memory", "lots"], 2),
        ("--memory 0", [*probe, "--memory", "0"], 2),
        ("--device tpu", [*probe, "--device", "tpu"], 2),
        ("--device cuda:7", [*probe, "--device", "cuda:7"], 2),
        ("--min-batch above --max-batch", [*probe, "--min-batch", "9", "--max-batch", "3"], 2),
        ("--report is a file", [*probe, "--memory", "64MiB", "--report", str(tmp / "afile")], 2),
        ("--report dangling link", [*probe, "--memory", "64MiB", "--report", str(tmp / "link")], 2),
    ]
    return cases


def bad_inputs() -> tuple[int, int, list[str]]:
    """(bad inputs with the right code and one clear line, bad inputs, the others)."""
    from click.testing import CliRunner

    from maxbatch.cli import main

    wrong = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = _bad_inputs(Path(tmp))
        for what, argv, code in cases:
            res = CliRunner().invoke(main, argv)
            lines = res.stderr.strip().splitlines()
            usage = lines[:1] == ["Usage: main " + " ".join(argv[:1]) + " [OPTIONS] MODEL_FILE"]
            clear = "Traceback" not in res.output and (
                (len(lines) == 1 and lines[0].startswith("maxbatch: error: "))
                or (len(lines) == 2 and "--debug" in lines[1])
                or (usage and lines[-1].startswith("Error: "))  # click's own usage errors
            )
            if res.exit_code != code or not clear:
                wrong.append(f"{what}: exit {res.exit_code} (want {code}): {lines[-1:]}")
    return len(cases) - len(wrong), len(cases), wrong


#: Section 5 (``processes.py``): the figure's name and the function giving it.
PROCESS_SECTIONS = {
    "isolated children crashed, hung or orphaned, each told apart and ended": isolated_deaths,
    "Ctrl-C / SIGTERM in the first seconds: one line and 130 / 143": early_signals,
    "absurd sizes refused (ConfigError, exit 2)": absurd_sizes,
    "models without weights refused, pointing at estimate": meta_models,
    "--report under a linked parent: written there; a named link refused": report_link_parents,
}


def process_sections(figures: dict[str, object]) -> list[str]:
    """Run section 5 into ``figures``; return what went wrong."""
    wrong = []
    for name, section in PROCESS_SECTIONS.items():
        handled, tried, failing = section()
        figures[name] = f"{handled} of {tried}"
        wrong += failing
    return wrong


def main() -> int:
    torch.set_num_threads(1)
    same, cases, failing = state_matrix()
    ooms, leaked_bytes, leaked_tensors = leaks_after_ooms()
    wrong, kinds = misclassified()
    found, messages = recognised()
    right, inputs, others = bad_inputs()
    figures = {
        "state cases bit-identical": f"{same} of {cases}",
        f"bytes leaked after {ooms} OOMs": leaked_bytes,
        f"tensors leaked after {ooms} OOMs": leaked_tensors,
        "non-OOM kinds taken for OOM": f"{wrong} of {kinds}",
        "real OOM messages recognised": f"{found} of {messages}",
        "bad inputs with the right code and one clear line": f"{right} of {inputs}",
    }
    others = others + process_sections(figures)
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    for line in failing + others:
        print("  not as it should be:", line)
    hard = hardening_figures()
    print(json.dumps({k: str(v) for k, v in figures.items()}), file=sys.stderr)
    return 0 if not failing and not others and not wrong and not leaked_bytes and hard else 1


def hardening_figures() -> bool:
    """Issue 18's second round (``hardening.py``): print its figures; True when all hold."""
    from hardening import main as hardening_main

    return hardening_main() == 0


if __name__ == "__main__":
    raise SystemExit(main())
