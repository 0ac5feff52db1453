"""The CLI calls one library entry for a model file, ``probe_file``; its options are derived.

A ``probe`` flag for a library keyword passes by its name (``cli/probeargs.py``): a test fails
for a flag that is neither passed on nor listed as the command's own. The integrations' options
are likewise the signature's, less what the framework gives.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maxbatch import find_batch_size, probe_file
from maxbatch.cli import main
from maxbatch.cli.lengths import Axis
from maxbatch.cli.options import step_keywords
from maxbatch.cli.probe import probe
from maxbatch.cli.probeargs import NEGATED, OWN, ProbeArgs, library_keywords
from maxbatch.cli.progress import Progress
from maxbatch.errors import ConfigError, ModelFileError
from maxbatch.run.childoptions import child_values
from maxbatch.run.modelfile import load_model_file

ROOT = Path(__file__).resolve().parent.parent

# Wide layers, few samples: a held gradient (accumulation) moves the ceiling under a few MiB.
WIDE = """\
import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
sample = torch.randn(4, 256)


def optimizer(parameters):
    return torch.optim.SGD(parameters, lr=0.01)
"""


@pytest.fixture(autouse=True)
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolated children import this checkout's maxbatch."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _fields(record: type) -> set[str]:
    return {f.name for f in dataclasses.fields(record)}


def test_every_probe_option_is_passed_on_or_the_commands_own() -> None:
    keywords = library_keywords()
    own = _fields(ProbeArgs)
    for name in own - set(OWN):  # the command's own (device: resolved first) or passed on
        routes = [name in keywords, name in NEGATED]  # by name, or turned (--no-x)
        assert routes.count(True) == 1, f"ProbeArgs.{name}: {routes} (keyword, negated)"
    assert set(OWN) <= own  # no stale name
    assert set(NEGATED.values()) <= keywords
    shared = set(inspect.signature(step_keywords).parameters)
    params = {p.name for p in probe.params}
    assert params == own | shared | _fields(Axis)  # each flag has one home
    assert not own & shared and not own & _fields(Axis)


def test_what_probe_passes_are_keywords_of_the_library() -> None:
    args = ProbeArgs.take("m.py", {f: None for f in _fields(ProbeArgs)} | {"isolate": True})
    step = {name: None for name in inspect.signature(step_keywords).parameters}
    passed = {**args.keywords(Progress(0)), **step_keywords(**step)}
    assert set(passed) <= library_keywords()
    assert passed["cache"] is False and passed["trust_cache"] is False  # isolated: no cache
    assert "trial_timeout" not in passed  # not given: the library's default, not "no limit"


def test_options_at_their_default_say_nothing_to_a_child() -> None:
    options = {
        "noise_scale": False,
        "cache": False,
        "trust_cache": False,
        "mode": "train",
        "device": torch.device("cpu"),
        "accumulate": 2,
        "zero_grad": "after_step",
        "memory": "1MiB",
    }
    left = child_values(options)
    assert left == {"device": "cpu", "accumulate": 2, "zero_grad": "after_step", "memory": "1MiB"}
    assert child_values({"accumulate": True}) == {"accumulate": True}  # True is not the 1


def test_a_loaded_model_file_probes_as_its_path(tmp_path: Path) -> None:
    path = tmp_path / "wide.py"
    path.write_text(WIDE)
    scans: list[tuple[int, int]] = []
    by_path = probe_file(path, memory="4MiB", profile=False, accumulate=2)
    spec = load_model_file(path)
    loaded = probe_file(spec, device="cpu", memory="4MiB", profile=False, accumulate=2)
    assert by_path.ceiling == loaded.ceiling
    assert [t.batch_size for t in by_path.trials] == [t.batch_size for t in loaded.trials]
    plain = probe_file(spec, memory="4MiB", profile=False, on_scan=lambda *a: scans.append(a))
    assert plain.ceiling > loaded.ceiling  # the held gradient of accumulation costs room
    assert scans == []  # a sample: no data set to scan


def test_trial_timeout_without_isolate_is_refused() -> None:
    with pytest.raises(ConfigError, match="isolate=True"):
        probe_file(ROOT / "examples" / "mlp.py", trial_timeout=5)


def test_the_files_extra_state_is_checked_before_any_child(tmp_path: Path) -> None:
    path = tmp_path / "extra.py"
    path.write_text(WIDE + "\n\ndef extra_state():\n    return 3\n")
    with pytest.raises(ModelFileError, match="extra_state"):
        probe_file(path, isolate=True, memory="4MiB", profile=False)


def _ceiling(argv: list[str]) -> dict[str, object]:
    res = CliRunner().invoke(main, ["probe", *argv, "--no-profile", "--no-cache", "--json"])
    assert res.exit_code == 0, res.output
    data: dict[str, object] = json.loads(res.stdout)
    return data


@pytest.mark.slow
@pytest.mark.parametrize(
    "loop", [["--accumulate", "2"], ["--zero-grad", "after_step"]], ids=["accumulate", "zero_grad"]
)
def test_isolated_trials_take_the_loops_options(tmp_path: Path, loop: list[str]) -> None:
    path = tmp_path / "wide.py"
    path.write_text(WIDE)
    argv = [str(path), "--memory", "4MiB", *loop]
    here, isolated = _ceiling(argv), _ceiling([*argv, "--isolate"])
    assert isolated["ceiling"] == here["ceiling"]
    assert isolated["steady_state"] == here["steady_state"]  # the loop the children ran
    if "--accumulate" in loop:  # it crossed: without it the ceiling is higher
        assert _ceiling([str(path), "--memory", "4MiB"])["ceiling"] > here["ceiling"]  # type: ignore[operator]


def test_the_integrations_pass_on_what_the_framework_does_not_give() -> None:
    from maxbatch.integrations import _common

    keywords = {
        name
        for name, p in inspect.signature(find_batch_size).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    framework = _common._FROM_FRAMEWORK
    assert framework <= set(inspect.signature(find_batch_size).parameters)  # no stale name
    for name in sorted(keywords - framework):
        assert _common.probe_options({name: None}, "X") == {name: None}
    for name in sorted(framework & keywords):
        with pytest.raises(ConfigError, match=f"{name}="):
            _common.probe_options({name: None}, "X")


@pytest.mark.parametrize("module", ["lightning", "transformers"])
def test_an_integration_names_only_the_frameworks_keywords(module: str) -> None:
    """What an integration passes by name is the framework's, or an argument of its own."""
    from maxbatch.integrations import _common

    tree = ast.parse((ROOT / "maxbatch" / "integrations" / f"{module}.py").read_text())
    own = {
        a.arg
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        for a in [*node.args.args, *node.args.kwonlyargs]
    }
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "find_batch_size"
    ]
    assert calls
    for call in calls:
        named = {k.arg for k in call.keywords if k.arg is not None}
        # the framework's (refused from users), or the integration's own argument (never in
        # **options: Python binds it to the integration's parameter)
        assert named <= _common._FROM_FRAMEWORK | own, named - _common._FROM_FRAMEWORK - own
