"""Checking the names a model file defines: the model or its builder, the batches, the hooks.

Each check raises :class:`~maxbatch.errors.ModelFileError` naming the file, the name and what was
expected (:func:`maxbatch.run.modelfile.load_model_file` calls them, in that order).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from maxbatch.errors import ConfigError, ModelFileError, WorkloadError
from maxbatch.step.batching import batch_size_of
from maxbatch.step.data import DataSource

#: What ``getattr`` returns for a name the file does not define.
MISSING = object()
# Exactly one of these says where batches come from.
SOURCES = ("sample", "make_batch", "dataset")


def model_or_builder(name: str, module: ModuleType) -> Callable[[], Any]:
    """A function returning the file's ``model``, or its ``build_model``, not yet called."""
    model = getattr(module, "model", MISSING)
    build = getattr(module, "build_model", MISSING)
    if model is MISSING and build is MISSING:
        raise ModelFileError(
            name,
            "defines neither `model` nor `build_model`; expected `model = MyNet()` "
            "(a torch.nn.Module) or a function `build_model()` that returns one",
        )
    if model is not MISSING and build is not MISSING:
        raise ModelFileError(
            name, "defines both `model` and `build_model`, which is ambiguous; keep only one"
        )
    if model is not MISSING:
        if not isinstance(model, torch.nn.Module):
            raise ModelFileError(name, f"`model` {describe(model)}; {expect_module(model)}")
        return lambda: model
    if isinstance(build, torch.nn.Module):  # callable, but calling it would run its forward
        raise ModelFileError(
            name, "`build_model` is a torch.nn.Module, not a function; name it `model` instead"
        )
    builder = hook(name, module, "build_model", ())
    assert builder is not None  # present, checked above
    return builder


def build(name: str, builder: Callable[[], Any]) -> torch.nn.Module:
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
            f"`build_model()` returned a value that {describe(built)}; {expect_module(built)}",
        )
    return built


def sample_of(name: str, module: ModuleType) -> Any:
    """The file's ``sample``, or ``None`` when it defines ``make_batch`` or ``dataset``."""
    sample = getattr(module, "sample", MISSING)
    defined = [source for source in SOURCES if hasattr(module, source)]
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
    if sample is MISSING:
        return None
    try:
        batch_size_of(sample)
    except WorkloadError as e:
        raise ModelFileError(name, f"`sample` is not a batch: {e}") from None
    return sample


def dataset_of(name: str, module: ModuleType, collate_fn: Callable[..., Any] | None) -> Any:
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


def hook(
    name: str, module: ModuleType, attribute: str, arguments: tuple[str, ...]
) -> Callable[..., Any] | None:
    """``module.attribute`` if present and callable with ``arguments``; ``None`` if absent."""
    value = getattr(module, attribute, MISSING)
    if value is MISSING:
        return None
    signature = f"{attribute}({', '.join(arguments)})"
    if not callable(value):
        raise ModelFileError(
            name, f"`{attribute}` {describe(value)}, not a function; expected `def {signature}:`"
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


def describe(value: object) -> str:
    """The type of a value for messages: ``has type list``, ``is the class MyNet``."""
    if inspect.isclass(value):
        return f"is the class {value.__qualname__}"
    kind = type(value)
    if kind.__module__ == "builtins":
        return f"has type {kind.__qualname__}"
    return f"has type {kind.__module__}.{kind.__qualname__}"


def expect_module(value: object) -> str:
    """What to fix when a model is not a module, with a hint for the common slips."""
    if inspect.isclass(value) and issubclass(value, torch.nn.Module):
        return f"expected an instance of it, such as `{value.__qualname__}()`"
    if callable(value):
        return "expected a torch.nn.Module; a function that builds one must be named `build_model`"
    return "expected a torch.nn.Module instance"
