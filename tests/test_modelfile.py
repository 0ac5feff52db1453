"""Tests of maxbatch.run.modelfile: the model.py conventions and every error they can raise."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from maxbatch.errors import ModelFileError
from maxbatch.estimate.estimate import estimate_batch_size
from maxbatch.run.modelfile import ModelSpec, load_model_file
from maxbatch.step.data import DataSource

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

MODEL = "import torch\nmodel = torch.nn.Linear(4, 2)\n"
SAMPLE = "sample = torch.randn(3, 4)\n"


def write(directory: Path, source: str, name: str = "model.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def load_error(path: Path) -> ModelFileError:
    with pytest.raises(ModelFileError) as info:
        load_model_file(path)
    return info.value


# --- the file itself ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.py"
    with pytest.raises(ModelFileError, match="file not found; expected a Python file") as info:
        load_model_file(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="is a directory; expected a Python file"):
        load_model_file(tmp_path)


def test_not_a_python_file(tmp_path: Path) -> None:
    path = write(tmp_path, MODEL + SAMPLE, name="model.txt")
    with pytest.raises(ModelFileError, match=r"not a \.py file \(suffix '\.txt'\)"):
        load_model_file(path)


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "import torch\n\nmodel = torch.nn.Linear(4, 2\n")
    with pytest.raises(ModelFileError, match="syntax error on line 3") as info:
        load_model_file(path)
    assert isinstance(info.value.__cause__, SyntaxError)


def test_syntax_error_in_a_sibling_names_the_sibling(tmp_path: Path) -> None:
    write(tmp_path, "x = (\n", name="broken_helper.py")
    path = write(tmp_path, "import broken_helper\n" + MODEL + SAMPLE)
    with pytest.raises(ModelFileError, match="syntax error on line 1 of .*broken_helper.py"):
        load_model_file(path)


@pytest.mark.parametrize(
    ("source", "kind", "expected"),
    [
        ("1 / 0\n", ZeroDivisionError, "raised ZeroDivisionError: division by zero"),
        ("import no_such_module_xyz\n", ModuleNotFoundError, "raised ModuleNotFoundError: No"),
        ("import sys\nsys.exit(2)\n", SystemExit, "raised SystemExit: 2"),
    ],
)
def test_exception_while_importing(
    tmp_path: Path, source: str, kind: type[BaseException], expected: str
) -> None:
    path = write(tmp_path, source)
    with pytest.raises(ModelFileError, match=expected) as info:
        load_model_file(path)
    assert isinstance(info.value.__cause__, kind)
    assert "fix the error so that the file imports cleanly" in str(info.value)


def test_failed_import_restores_sys_path_and_modules(tmp_path: Path) -> None:
    path_before = list(sys.path)
    error = load_error(write(tmp_path, "raise ValueError('bad')\n"))
    assert "raised ValueError: bad" in str(error)
    assert sys.path == path_before
    assert not [name for name in sys.modules if name.startswith("_maxbatch_modelfile_")]


# --- model / build_model --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch\n" + SAMPLE, "defines neither `model` nor `build_model`; expected"),
        (
            MODEL + SAMPLE + "def build_model():\n    return model\n",
            "defines both `model` and `build_model`, which is ambiguous; keep only one",
        ),
        (
            MODEL + SAMPLE + "model = 3\n",
            "`model` has type int; expected a torch.nn.Module instance",
        ),
        (
            "import torch\nmodel = torch.nn.Linear\n" + SAMPLE,
            r"`model` is the class Linear; expected an instance of it, such as `Linear\(\)`",
        ),
        (
            "import torch\n" + SAMPLE + "def model():\n    return torch.nn.Linear(4, 2)\n",
            "`model` has type function; .* must be named `build_model`",
        ),
        (
            "import torch\n" + SAMPLE + "build_model = torch.nn.Linear(4, 2)\n",
            "`build_model` is a torch.nn.Module, not a function; name it `model` instead",
        ),
        (
            "import torch\n" + SAMPLE + "build_model = 'resnet'\n",
            r"`build_model` has type str, not a function; expected `def build_model\(\):`",
        ),
        (
            "import torch\n" + SAMPLE + "def build_model(width):\n    return None\n",
            r"`build_model` cannot be called with 0 positional argument\(s\)",
        ),
        (
            "import torch\n" + SAMPLE + "def build_model():\n    return [1, 2]\n",
            r"`build_model\(\)` returned a value that has type list; expected a torch.nn.Module",
        ),
    ],
    ids=[
        "neither",
        "both",
        "not-a-module",
        "a-class",
        "a-function",
        "builder-is-a-module",
        "builder-not-callable",
        "builder-takes-arguments",
        "builder-returns-list",
    ],
)
def test_model_errors(tmp_path: Path, source: str, expected: str) -> None:
    with pytest.raises(ModelFileError, match=expected):
        load_model_file(write(tmp_path, source))


def test_build_model_raising_is_chained(tmp_path: Path) -> None:
    source = "import torch\n" + SAMPLE + "def build_model():\n    raise RuntimeError('boom')\n"
    with pytest.raises(
        ModelFileError, match=r"`build_model\(\)` raised RuntimeError: boom"
    ) as info:
        load_model_file(write(tmp_path, source))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "fix it so that it returns a torch.nn.Module" in str(info.value)


def test_names_are_checked_before_build_model_runs(tmp_path: Path) -> None:
    # build_model would fail, but the missing sample is reported first: nothing slow runs.
    source = "def build_model():\n    raise RuntimeError('should not run')\n"
    with pytest.raises(ModelFileError, match="defines neither `sample` nor `make_batch` nor `data"):
        load_model_file(write(tmp_path, source))


# --- sample / make_batch and the optional hooks ---------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (MODEL, "defines neither `sample` nor `make_batch` nor `dataset`; expected `sample = ...`"),
        (
            MODEL + SAMPLE + "def make_batch(batch_size):\n    return sample\n",
            "defines both `sample` and `make_batch`, which is ambiguous; keep only one",
        ),
        (MODEL + "sample = None\n", "`sample` is None; expected one batch"),
        (
            MODEL + "make_batch = torch.randn(3, 4)\n",
            r"`make_batch` has type torch.Tensor, not a function; "
            r"expected `def make_batch\(batch_size\):`",
        ),
        (
            MODEL + "def make_batch():\n    return None\n",
            r"`make_batch` cannot be called with 1 positional argument\(s\)",
        ),
        (
            MODEL + SAMPLE + "dataset = [torch.zeros(2)]\n",
            "defines both `sample` and `dataset`, which is ambiguous",
        ),
        (
            MODEL + "dataset = [torch.zeros(2)]\ndef make_batch(b):\n    return None\n",
            "defines both `make_batch` and `dataset`",
        ),
        (
            MODEL + SAMPLE + "def collate_fn(items):\n    return items\n",
            "defines `collate_fn` without `dataset`",
        ),
        (
            MODEL + "dataset = iter([torch.zeros(2)])\n",
            "`dataset`: a list_iterator cannot be indexed",
        ),
        (
            MODEL
            + "dataset = torch.utils.data.DataLoader([torch.zeros(2)], batch_size=1)\n"
            + "def collate_fn(items):\n    return items\n",
            "`dataset`: collate_fn is given and the DataLoader has its own",
        ),
        (MODEL + "def collate_fn():\n    return 1\ndataset = [1]\n", "`collate_fn` cannot be"),
    ],
    ids=[
        "neither",
        "both",
        "none",
        "factory-not-callable",
        "factory-takes-no-size",
        "sample-and-dataset",
        "make-batch-and-dataset",
        "collate-without-dataset",
        "iterable-dataset",
        "two-collates",
        "collate-takes-no-items",
    ],
)
def test_sample_errors(tmp_path: Path, source: str, expected: str) -> None:
    with pytest.raises(ModelFileError, match=expected):
        load_model_file(write(tmp_path, source))


HOOKS = {
    "forward": "forward(model, batch)",
    "loss": "loss(output, batch)",
    "optimizer": "optimizer(parameters)",
    "train_step": "train_step(model, batch, optimizer)",
    "extra_state": "extra_state()",
}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_not_callable(tmp_path: Path, hook: str) -> None:
    path = write(tmp_path, MODEL + SAMPLE + f"{hook} = 'adamw'\n")
    pattern = rf"`{hook}` has type str, not a function; expected `def {HOOKS[hook]}:`"
    with pytest.raises(ModelFileError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
        load_model_file(path)


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_with_wrong_arguments(tmp_path: Path, hook: str) -> None:
    path = write(tmp_path, MODEL + SAMPLE + f"def {hook}(a, b, c, d):\n    return None\n")
    with pytest.raises(ModelFileError, match=rf"`{hook}` cannot be called with \d positional"):
        load_model_file(path)


NOT_A_BATCH = {
    "string": ("'a batch'", "got str"),
    "empty": ("torch.zeros(0, 4)", "the sample's batch is empty"),
    "zero-dim": ("torch.tensor(3.0)", "no tensor with a batch dimension"),
    "ints": ("[1, 2, 3]", "got list"),
    "numpy": ("__import__('numpy').zeros((3, 4))", r"got ndarray.*torch.from_numpy"),
    "disagree": (
        "{'x': torch.zeros(3, 4), 'y': torch.zeros(2)}",
        r"disagree on the batch size.*sample\['x'\] has 3, sample\['y'\] has 2",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_A_BATCH))
def test_a_sample_that_is_not_a_batch(tmp_path: Path, case: str) -> None:
    value, reason = NOT_A_BATCH[case]
    path = write(tmp_path, MODEL + f"sample = {value}\n")
    with pytest.raises(ModelFileError, match=r"`sample` is not a batch: .*" + reason):
        load_model_file(path)


def test_extra_state_hook(tmp_path: Path) -> None:
    good = write(tmp_path, MODEL + SAMPLE + "def extra_state():\n    return [model]\n")
    spec = load_model_file(good)
    assert spec.extra_state_items() == [spec.model]
    assert load_model_file(write(tmp_path, MODEL + SAMPLE)).extra_state_items() == []
    bad = write(tmp_path, MODEL + SAMPLE + "def extra_state():\n    return model\n")
    with pytest.raises(ModelFileError, match=r"`extra_state\(\)` returned a value that has type"):
        load_model_file(bad).extra_state_items()
    boom = write(tmp_path, MODEL + SAMPLE + "def extra_state():\n    raise KeyError('ema')\n")
    with pytest.raises(ModelFileError, match=r"`extra_state\(\)` raised KeyError"):
        load_model_file(boom).extra_state_items()


# --- files that follow the conventions ------------------------------------------------------


def test_model_and_sample(tmp_path: Path) -> None:
    spec = load_model_file(str(write(tmp_path, MODEL + SAMPLE)))
    assert isinstance(spec, ModelSpec)
    assert isinstance(spec.model, torch.nn.Linear)
    assert isinstance(spec.sample, torch.Tensor)
    assert spec.sample.shape == (3, 4)
    assert spec.path == str(tmp_path / "model.py")
    assert (spec.make_batch, spec.forward, spec.loss, spec.optimizer, spec.train_step) == (
        None,
        None,
        None,
        None,
        None,
    )


def test_build_model_and_make_batch(tmp_path: Path) -> None:
    source = """
        import torch
        calls = []

        def build_model():
            calls.append(1)
            return torch.nn.Linear(4, 2)

        def make_batch(batch_size, *, seq_len=4):
            return torch.zeros(batch_size, seq_len)
    """
    spec = load_model_file(write(tmp_path, source))
    assert isinstance(spec.model, torch.nn.Linear)
    assert spec.sample is None
    assert spec.make_batch is not None
    assert spec.make_batch(5).shape == (5, 4)
    assert spec.model.__module__ == "torch.nn.modules.linear"


def test_optional_hooks_are_picked_up(tmp_path: Path) -> None:
    source = """
        import torch
        model = torch.nn.Linear(4, 2)
        sample = {"x": torch.randn(3, 4), "y": torch.randn(3, 2)}

        def forward(model, batch):
            return model(batch["x"])

        def loss(output, batch):
            return torch.nn.functional.mse_loss(output, batch["y"])

        def optimizer(parameters):
            return torch.optim.SGD(parameters, lr=0.1)

        def train_step(model, batch, optimizer):
            optimizer.zero_grad()
            value = loss(forward(model, batch), batch)
            value.backward()
            optimizer.step()
            return value
    """
    spec = load_model_file(write(tmp_path, source))
    assert spec.forward is not None and spec.loss is not None
    assert spec.optimizer is not None and spec.train_step is not None
    output = spec.forward(spec.model, spec.sample)
    assert output.shape == (3, 2)
    assert spec.loss(output, spec.sample).ndim == 0
    optimizer = spec.optimizer(spec.model.parameters())
    assert isinstance(optimizer, torch.optim.SGD)
    assert spec.train_step(spec.model, spec.sample, optimizer).ndim == 0


def test_sibling_imports_work_and_leave_nothing_behind(tmp_path: Path) -> None:
    path_before = list(sys.path)
    for name, width in (("one", 3), ("two", 5)):
        directory = tmp_path / name
        directory.mkdir()
        write(directory, f"import torch\nWIDTH = {width}\n", name="shared_helper.py")
        write(
            directory,
            "import shared_helper\n" + MODEL.replace("4, 2", "shared_helper.WIDTH, 2") + SAMPLE,
        )
    first = load_model_file(tmp_path / "one" / "model.py")
    second = load_model_file(tmp_path / "two" / "model.py")
    # Each file got its own helper, not the one cached by the first load.
    assert isinstance(first.model, torch.nn.Linear) and isinstance(second.model, torch.nn.Linear)
    assert (first.model.in_features, second.model.in_features) == (3, 5)
    assert sys.path == path_before
    assert "shared_helper" not in sys.modules
    assert not [name for name in sys.modules if name.startswith("_maxbatch_modelfile_")]


def test_each_load_is_a_fresh_module(tmp_path: Path) -> None:
    path = write(tmp_path, MODEL + SAMPLE)
    assert load_model_file(path).model is not load_model_file(path).model


def test_dataclass_in_the_file_works(tmp_path: Path) -> None:
    # dataclasses look the defining module up in sys.modules while the class is created.
    source = """
        from __future__ import annotations
        import dataclasses
        import torch

        @dataclasses.dataclass
        class Config:
            width: int = 4

        model = torch.nn.Linear(Config().width, 2)
        sample = torch.randn(3, 4)
    """
    assert load_model_file(write(tmp_path, source)).model.in_features == 4


def test_dataset_and_collate_fn(tmp_path: Path) -> None:
    source = (
        MODEL
        + """
dataset = [torch.zeros(n) for n in (2, 5, 3)]

def collate_fn(items):
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)
"""
    )
    spec = load_model_file(write(tmp_path, source))
    assert spec.sample is None and spec.make_batch is None and len(spec.dataset) == 3
    batches = spec.batch_source()
    assert isinstance(batches, DataSource)
    assert batches(2).shape == (2, 5)


# --- the shipped examples -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda path: path.name)
def test_examples_load(path: Path) -> None:
    spec = load_model_file(path)
    assert isinstance(spec.model, torch.nn.Module)
    source = spec.batch_source()
    batch = source(4) if callable(source) else source
    assert batch is not None
    if any(p.is_meta for p in spec.model.parameters()):
        # Built on the meta device (big_meta.py): no weights to run, so run it on fake tensors.
        est = estimate_batch_size(
            spec.model, batch, forward_fn=spec.forward, loss_fn=spec.loss, batch_sizes=[1]
        )
        assert est.peak_bytes(1)
        return
    if spec.forward is not None:
        output = spec.forward(spec.model, batch)
    else:
        assert isinstance(batch, torch.Tensor)
        output = spec.model(batch)
    value = spec.loss(output, batch) if spec.loss is not None else output.float().mean()
    assert value.ndim == 0 and torch.isfinite(value)


def test_there_are_examples() -> None:
    assert {path.name for path in EXAMPLES.glob("*.py")} >= {"mlp.py", "cnn.py", "transformer.py"}
