"""Loading a ``model.py`` file by its conventions (see the design, "model.py conventions").

Anything missing or wrong raises :class:`~maxbatch.errors.ModelFileError` naming the file, the name
and what was expected, also a ``sample`` that is not a batch. What ``make_batch`` returns is
checked later, where batches are built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from maxbatch.batching import batch_size_of
from maxbatch.data import DataSource
from maxbatch.errors import ConfigError, ModelFileError, WorkloadError

__all__ = ["ModelSpec", "load_model_file"]

# Each load gets its own module name, so two files called model.py never share a module object.
_COUNTER = itertools.count()
_MISSING = object()

# Functions a file may define: name -> the positional arguments maxbatch calls it with.
_HOOKS: dict[str, tuple[str, ...]] = {
    "make_batch": ("batch_size",),
    "forward": ("model", "batch"),
    "loss": ("output", "batch"),
    "optimizer": ("parameters",),
    "train_step": ("model", "batch", "optimizer"),
    "extra_state": (),
    "collate_fn": ("items",),
    "size_fn": ("item",),
}
# Exactly one of these says where batches come from.
_SOURCES = ("sample", "make_batch", "dataset")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model file defines, ready for the workload.

    Attributes:
        path: the file it was loaded from, as given.
        model: the module to probe (``model``, or the result of ``build_model()``).
        sample: one batch, batch dimension first; ``None`` when ``make_batch`` is given.
        make_batch: ``make_batch(batch_size)`` returning a batch of that size, or ``None``.
        forward: ``forward(model, batch)`` returning the output, or ``None`` for the default call.
        loss: ``loss(output, batch)`` returning a scalar, or ``None`` for the default reduction.
        optimizer: ``optimizer(parameters)`` returning an optimizer, or ``None`` for the default.
        train_step: ``train_step(model, batch, optimizer)`` replacing the default step, or ``None``.
        extra_state: ``extra_state()`` returning the list of objects the step changes beyond the
            model and optimizer (restored after every trial), or ``None``.
        collate_fn: ``collate_fn(items)`` making a batch of the ``dataset``'s items, or ``None``.
        dataset: a map-style dataset or a ``DataLoader`` whose largest items make the batches, or
            ``None`` when ``sample`` or ``make_batch`` is given.
        size_fn: ``size_fn(item)`` giving a ``dataset`` item's length (the length axis), or None.
    """

    path: str
    model: torch.nn.Module
    sample: Any
    make_batch: Callable[[int], Any] | None
    forward: Callable[[torch.nn.Module, Any], Any] | None
    loss: Callable[[Any, Any], torch.Tensor] | None
    optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None
    train_step: Callable[[torch.nn.Module, Any, torch.optim.Optimizer | None], Any] | None
    extra_state: Callable[[], Any] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    dataset: Any = None
    size_fn: Callable[[Any], int] | None = None

    def extra_state_items(self) -> list[Any]:
        """Call the file's ``extra_state()`` (an empty list without one).

        Returns:
            The items, as a list.

        Raises:
            ModelFileError: it raised, or returned something other than a list or tuple.
        """
        if self.extra_state is None:
            return []
        try:
            items = self.extra_state()
        except Exception as e:
            raise ModelFileError(
                self.path, f"`extra_state()` raised {type(e).__name__}: {e}; fix it"
            ) from e
        if not isinstance(items, (list, tuple)):
            raise ModelFileError(
                self.path,
                f"`extra_state()` returned a value that {_describe(items)}; expected a list of "
                "the objects the step changes (modules, tensors, GradScaler, ...)",
            )
        return list(items)

    def batch_source(self, on_progress: Callable[[int, int], None] | None = None) -> Any:
        """What the probe and the estimate take as the sample: the batch, factory or data source.

        Args:
            on_progress: called as ``on_progress(done, total)`` while a ``dataset`` is scanned.

        Returns:
            The sample, the ``make_batch`` function, or a :class:`~maxbatch.data.DataSource`.
        """
        if self.dataset is not None:
            return DataSource(
                self.dataset,
                collate_fn=self.collate_fn,
                size_fn=self.size_fn,
                on_progress=on_progress,
            )
        return self.make_batch if self.make_batch is not None else self.sample


def load_model_file(path: str | os.PathLike[str]) -> ModelSpec:
    """Import a model file and collect what it defines.

    The file runs as a fresh module with its own directory on ``sys.path`` (so it can import its
    siblings); the module is not left in ``sys.modules`` and ``sys.path`` is restored afterwards.

    Args:
        path: the ``.py`` file to load.

    Returns:
        The model, the sample or batch factory, and the optional hooks the file defines.

    Raises:
        ModelFileError: the file is missing or not a Python file, fails to import, or does not
            follow the conventions (the message says which name and what was expected).
    """
    name = os.fspath(path)
    file = Path(name)
    if not file.exists():
        raise ModelFileError(name, "file not found; expected a Python file such as model.py")
    if file.is_dir():
        raise ModelFileError(name, "is a directory; expected a Python file such as model.py")
    if file.suffix != ".py":
        raise ModelFileError(
            name,
            f"not a .py file (suffix {file.suffix!r}); expected a Python file such as model.py",
        )
    module = _import(name, file.resolve())
    # Check every name before calling build_model(), which may be slow.
    builder = _model_or_builder(name, module)
    sample = _sample(name, module)
    hooks = {hook: _callable(name, module, hook, arguments) for hook, arguments in _HOOKS.items()}
    dataset = _dataset(name, module, hooks["collate_fn"])
    return ModelSpec(
        path=name, model=_build(name, builder), sample=sample, dataset=dataset, **hooks
    )


def _import(name: str, file: Path) -> ModuleType:
    """Run ``file`` as a fresh module, with its directory on ``sys.path`` while it runs."""
    module_name = f"_maxbatch_modelfile_{next(_COUNTER)}_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ModelFileError(name, "cannot be imported; expected a Python source file")
    module = importlib.util.module_from_spec(spec)
    directory = str(file.parent)
    before = set(sys.modules)
    sys.path.insert(0, directory)
    # Registered while it runs, as an import would, so dataclasses and pickling inside it work.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        where = f"line {e.lineno}" if e.lineno is not None else "an unknown line"
        if e.filename and Path(e.filename).resolve() != file:
            where += f" of {e.filename}"  # a sibling module the file imports
        raise ModelFileError(
            name, f"syntax error on {where}: {e.msg}; fix the file so that Python can import it"
        ) from e
    except (Exception, SystemExit) as e:
        raise ModelFileError(
            name,
            f"importing the file raised {type(e).__name__}: {e}; "
            "fix the error so that the file imports cleanly",
        ) from e
    finally:
        sys.modules.pop(module_name, None)
        _forget_siblings(directory, before)
        # The file may have changed sys.path itself: remove our entry, not whatever is first.
        if directory in sys.path:
            sys.path.remove(directory)
    return module


def _forget_siblings(directory: str, before: set[str]) -> None:
    """Drop the modules the file imported from its own directory (helpers such as ``layers.py``).

    Otherwise a later model file in another directory with a same-named helper would get this one.
    Only top-level names found in ``directory`` count, never a library installed beneath it.
    """
    new = set(sys.modules) - before
    mine = {
        top for top in new if "." not in top and _found_in(Path(directory) / top, sys.modules[top])
    }
    for module_name in new:
        if module_name.partition(".")[0] in mine:
            del sys.modules[module_name]


def _found_in(stem: Path, module: ModuleType) -> bool:
    """Whether ``module`` was loaded as ``stem.py``, ``stem/__init__.py`` or namespace ``stem``."""
    origin = getattr(module, "__file__", None)
    if origin is not None:
        return Path(origin).resolve() in {stem.with_suffix(".py"), stem / "__init__.py"}
    return any(Path(entry).resolve() == stem for entry in getattr(module, "__path__", ()))


def _model_or_builder(name: str, module: ModuleType) -> Callable[[], Any]:
    """A function returning the file's ``model``, or its ``build_model``, not yet called."""
    model = getattr(module, "model", _MISSING)
    build = getattr(module, "build_model", _MISSING)
    if model is _MISSING and build is _MISSING:
        raise ModelFileError(
            name,
            "defines neither `model` nor `build_model`; expected `model = MyNet()` "
            "(a torch.nn.Module) or a function `build_model()` that returns one",
        )
    if model is not _MISSING and build is not _MISSING:
        raise ModelFileError(
            name, "defines both `model` and `build_model`, which is ambiguous; keep only one"
        )
    if model is not _MISSING:
        if not isinstance(model, torch.nn.Module):
            raise ModelFileError(name, f"`model` {_describe(model)}; {_expect_module(model)}")
        return lambda: model
    if isinstance(build, torch.nn.Module):  # callable, but calling it would run its forward
        raise ModelFileError(
            name, "`build_model` is a torch.nn.Module, not a function; name it `model` instead"
        )
    builder = _callable(name, module, "build_model", ())
    assert builder is not None  # present, checked above
    return builder


def _build(name: str, builder: Callable[[], Any]) -> torch.nn.Module:
    """Call ``build_model()`` (or return ``model``) and check that the result is a module."""
    try:
        built = builder()
    except Exception as e:
        raise ModelFileError(
            name,
            f"`build_model()` raised {type(e).__name__}: {e}; "
            "fix it so that it returns a torch.nn.Module",
        ) from e
    if not isinstance(built, torch.nn.Module):
        raise ModelFileError(
            name,
            f"`build_model()` returned a value that {_describe(built)}; {_expect_module(built)}",
        )
    return built


def _sample(name: str, module: ModuleType) -> Any:
    """The file's ``sample``, or ``None`` when it defines ``make_batch`` or ``dataset``."""
    sample = getattr(module, "sample", _MISSING)
    defined = [source for source in _SOURCES if hasattr(module, source)]
    if not defined:
        raise ModelFileError(
            name,
            "defines neither `sample` nor `make_batch` nor `dataset`; expected `sample = ...` "
            "(one batch, batch dimension first), a function `make_batch(batch_size)` that "
            "returns one, or `dataset = ...` (a map-style dataset or a DataLoader)",
        )
    if len(defined) > 1:
        both = " and ".join(f"`{source}`" for source in defined)
        raise ModelFileError(name, f"defines both {both}, which is ambiguous; keep only one")
    if sample is None:
        raise ModelFileError(
            name, "`sample` is None; expected one batch of tensors, batch dimension first"
        )
    if sample is _MISSING:
        return None
    try:
        batch_size_of(sample)
    except WorkloadError as e:
        raise ModelFileError(name, f"`sample` is not a batch: {e}") from None
    return sample


def _dataset(name: str, module: ModuleType, collate_fn: Callable[..., Any] | None) -> Any:
    """The ``dataset`` the file defines (checked, not yet read), or ``None``."""
    dataset = getattr(module, "dataset", None)
    if dataset is None:
        if collate_fn is not None:
            raise ModelFileError(
                name, "defines `collate_fn` without `dataset`; it collates the dataset's items"
            )
        return None
    try:
        DataSource(dataset, collate_fn=collate_fn)
    except ConfigError as e:
        raise ModelFileError(name, f"`dataset`: {e}") from e
    return dataset


def _callable(
    name: str, module: ModuleType, attribute: str, arguments: tuple[str, ...]
) -> Callable[..., Any] | None:
    """``module.attribute`` if present and callable with ``arguments``; ``None`` if absent."""
    value = getattr(module, attribute, _MISSING)
    if value is _MISSING:
        return None
    signature = f"{attribute}({', '.join(arguments)})"
    if not callable(value):
        raise ModelFileError(
            name, f"`{attribute}` {_describe(value)}, not a function; expected `def {signature}:`"
        )
    try:
        if attribute == "make_batch":  # make_batch(batch_size, length): the length axis
            _bind_either(value, arguments, ("batch_size", "length"))
        else:
            inspect.signature(value).bind(*arguments)
    except TypeError:
        raise ModelFileError(
            name,
            f"`{attribute}` cannot be called with {len(arguments)} positional argument(s); "
            f"expected `def {signature}:`",
        ) from None
    except ValueError:
        pass  # no signature to inspect (some builtins): trust it until it is called
    return value


def _bind_either(value: Any, one: tuple[str, ...], other: tuple[str, ...]) -> None:
    """Bind ``one`` or else ``other`` (raises TypeError when neither binds)."""
    try:
        inspect.signature(value).bind(*one)
    except TypeError:
        inspect.signature(value).bind(*other)


def _describe(value: object) -> str:
    """The type of a value for messages: ``has type list``, ``is the class MyNet``."""
    if inspect.isclass(value):
        return f"is the class {value.__qualname__}"
    kind = type(value)
    if kind.__module__ == "builtins":
        return f"has type {kind.__qualname__}"
    return f"has type {kind.__module__}.{kind.__qualname__}"


def _expect_module(value: object) -> str:
    """What to fix when a model is not a module, with a hint for the common slips."""
    if inspect.isclass(value) and issubclass(value, torch.nn.Module):
        return f"expected an instance of it, such as `{value.__qualname__}()`"
    if callable(value):
        return "expected a torch.nn.Module; a function that builds one must be named `build_model`"
    return "expected a torch.nn.Module instance"
