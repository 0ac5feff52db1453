"""Loading a ``model.py`` file by its conventions (README, "The model file").

Anything missing or wrong raises :class:`~maxbatch.errors.ModelFileError` naming the file, the name
and what was expected, also a ``sample`` that is not a batch. What ``make_batch`` returns is
checked later, where batches are built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from maxbatch.errors import ModelFileError
from maxbatch.run.modelcheck import (
    build,
    dataset_of,
    describe,
    hook,
    model_or_builder,
    sample_of,
)
from maxbatch.step.data import DataSource

__all__ = ["ModelSpec", "load_model_file"]

# Each load gets its own module name, so two files called model.py never share a module object.
_COUNTER = itertools.count()

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


@dataclasses.dataclass(frozen=True, kw_only=True)
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
                f"`extra_state()` returned a value that {describe(items)}; expected a list of "
                "the objects the step changes (modules, tensors, GradScaler, ...)",
            )
        return list(items)

    def step_options(self, optimizer: Any = None) -> dict[str, Any]:
        """The step's keywords the file's hooks give, as ``find_batch_size`` takes them.

        Args:
            optimizer: the optimizer asked for; ``None``: the file's ``optimizer()``, if any.

        Returns:
            ``optimizer``, ``loss_fn``, ``forward_fn`` and ``train_step``.
        """
        return {
            "optimizer": optimizer if optimizer is not None else self.optimizer,
            "loss_fn": self.loss,
            "forward_fn": self.forward,
            "train_step": self.train_step,
        }

    def batch_source(self, on_progress: Callable[[int, int], None] | None = None) -> Any:
        """What the probe and the estimate take as the sample: the batch, factory or data source.

        Args:
            on_progress: called as ``on_progress(done, total)`` while a ``dataset`` is scanned.

        Returns:
            The sample, the ``make_batch`` function, or a :class:`~maxbatch.step.data.DataSource`.
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
    builder = model_or_builder(name, module)
    sample = sample_of(name, module)
    hooks = {key: hook(name, module, key, arguments) for key, arguments in _HOOKS.items()}
    dataset = dataset_of(name, module, hooks["collate_fn"])
    return ModelSpec(path=name, model=build(name, builder), sample=sample, dataset=dataset, **hooks)


def _import(name: str, file: Path) -> ModuleType:
    """Run ``file`` as a fresh module, with its directory on ``sys.path`` while it runs."""
    module_name = f"_maxbatch_modelfile_{next(_COUNTER)}_{file.stem}"
    found = importlib.util.spec_from_file_location(module_name, file)
    if found is None or found.loader is None:
        raise ModelFileError(name, "cannot be imported; expected a Python source file")
    module = importlib.util.module_from_spec(found)
    directory = str(file.parent)
    before = set(sys.modules)
    sys.path.insert(0, directory)
    # Registered while it runs, as an import would, so dataclasses and pickling inside it work.
    sys.modules[module_name] = module
    try:
        found.loader.exec_module(module)
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
