"""State that a user's ``train_step`` changes beyond the model and its optimizer: ``extra_state``.

An EMA copy of the model, a ``GradScaler``'s scale, a step counter, a second optimizer: the
user lists them as ``extra_state=[...]`` (or a model file's ``extra_state()``), and they are
restored after every trial, in place. A ``GradScaler`` that the ``train_step`` uses (a global or
closure variable of the function, or an attribute of the object of a bound-method ``train_step``
or of a callable object) is found and restored without being listed.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from maxbatch.errors import ConfigError

__all__ = ["ExtraState", "TensorSave", "host_copy", "referenced_scalers", "set_values"]


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` in host memory."""
    return t.detach().to("cpu", copy=True)


def set_values(tensor: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``tensor`` (the same object) use the storage, shape and strides of ``values``."""
    with torch.no_grad():
        tensor.set_(
            values.untyped_storage(), values.storage_offset(), values.size(), values.stride()
        )


@dataclasses.dataclass(kw_only=True)
class TensorSave:
    """A tensor object and its values on the host; :meth:`restore` writes them back into it."""

    tensor: torch.Tensor
    host: torch.Tensor

    @classmethod
    def take(cls, tensor: torch.Tensor) -> TensorSave:
        """Keep the object and copy its values to the host."""
        return cls(tensor=tensor, host=host_copy(tensor))

    def restore(self) -> torch.Tensor:
        """Write the saved values back into the same object (resized if a step resized it)."""
        with torch.no_grad():
            if self.tensor.shape == self.host.shape:
                self.tensor.copy_(self.host)
            else:
                set_values(self.tensor, self.host.to(self.tensor.device, copy=True))
        return self.tensor


@dataclasses.dataclass(kw_only=True)
class _Moved:
    """A tensor inside a saved ``state_dict()``: its host copy and the device it came from."""

    host: torch.Tensor
    device: torch.device


def _to_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _Moved(host=host_copy(value), device=value.device)
    return copy.deepcopy(value)


def _from_host(value: Any) -> Any:
    if isinstance(value, _Moved):
        return value.host.to(value.device, copy=True)
    return copy.deepcopy(value)


@dataclasses.dataclass(kw_only=True)
class _AttributesSave:
    """Every attribute of an object (a ``GradScaler``): tensors in place, the rest copied."""

    obj: Any
    values: dict[str, Any]

    @classmethod
    def take(cls, obj: Any) -> _AttributesSave:
        values = {
            k: TensorSave.take(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in vars(obj).items()
        }
        return cls(obj=obj, values=values)

    def restore(self) -> None:
        for k in [k for k in vars(self.obj) if k not in self.values]:
            delattr(self.obj, k)
        for k, v in self.values.items():
            setattr(self.obj, k, v.restore() if isinstance(v, TensorSave) else copy.deepcopy(v))

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (v.tensor for v in self.values.values() if isinstance(v, TensorSave))


@dataclasses.dataclass(kw_only=True)
class _GeneratorSave:
    """A ``torch.Generator``: its state, through ``get_state()`` / ``set_state()``."""

    obj: torch.Generator
    state: torch.Tensor

    @classmethod
    def take(cls, obj: torch.Generator) -> _GeneratorSave:
        return cls(obj=obj, state=obj.get_state())

    def restore(self) -> None:
        self.obj.set_state(self.state)


@dataclasses.dataclass(kw_only=True)
class _StateDictSave:
    """An object restored through its own ``state_dict()`` / ``load_state_dict()``."""

    obj: Any
    state: Any

    @classmethod
    def take(cls, obj: Any) -> _StateDictSave:
        return cls(obj=obj, state=tree_map(_to_host, obj.state_dict()))

    def restore(self) -> None:
        self.obj.load_state_dict(tree_map(_from_host, self.state))


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtraState:
    """The validated ``extra_state`` items, sorted by how each one is saved.

    Args:
        items: tensors, modules, optimizers, ``GradScaler`` and ``torch.Generator`` objects,
            and objects with ``state_dict()`` and ``load_state_dict()``.

    Raises:
        ConfigError: an item is none of these.
    """

    items: Sequence[Any]

    def __post_init__(self) -> None:
        if isinstance(self.items, (torch.Tensor, torch.nn.Module, str, bytes)) or not isinstance(
            self.items, Sequence
        ):
            raise ConfigError(
                f"extra_state must be a list of objects, got {type(self.items).__name__}; "
                "wrap a single object in a list"
            )
        for i, item in enumerate(self.items):
            kinds = (torch.Tensor, torch.nn.Module, torch.amp.GradScaler, torch.Generator)
            if not isinstance(item, kinds) and not _has_state_dict(item):
                raise ConfigError(
                    f"extra_state[{i}] has type {type(item).__name__}, which maxbatch cannot "
                    "save; expected a tensor, a torch.nn.Module, an optimizer, a GradScaler, a "
                    "torch.Generator or an object with state_dict() and load_state_dict()"
                )

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The modules (their parameters, buffers and flags are saved with the model's)."""
        return [x for x in self.items if isinstance(x, torch.nn.Module)]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers (saved like the step's own)."""
        return [x for x in self.items if isinstance(x, torch.optim.Optimizer)]

    def with_scalers(self, train_step: Callable[..., Any] | None) -> ExtraState:
        """These items and the ``GradScaler`` objects ``train_step`` refers to, each once."""
        found = referenced_scalers(train_step)
        known = {id(x) for x in self.items}
        return ExtraState(items=[*self.items, *(s for s in found if id(s) not in known)])

    def take(self) -> ExtraSave:
        """Save the items that the model's snapshot does not cover."""
        tensors = [TensorSave.take(x) for x in self.items if isinstance(x, torch.Tensor)]
        objects: list[_AttributesSave | _GeneratorSave | _StateDictSave] = []
        for x in self.items:
            if isinstance(x, torch.amp.GradScaler):
                # Its state_dict() loses the lazily created ``_scale`` being None.
                objects.append(_AttributesSave.take(x))
            elif isinstance(x, torch.Generator):
                objects.append(_GeneratorSave.take(x))
            elif not isinstance(x, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer)):
                objects.append(_StateDictSave.take(x))
        return ExtraSave(tensors_saved=tensors, objects=objects)


@dataclasses.dataclass(kw_only=True)
class ExtraSave:
    """The saved values of the extra tensors and objects."""

    tensors_saved: list[TensorSave]
    objects: list[_AttributesSave | _GeneratorSave | _StateDictSave]

    def tensors(self) -> Iterator[torch.Tensor]:
        """The live tensors held as extra state."""
        yield from (s.tensor for s in self.tensors_saved)
        for obj in self.objects:
            if isinstance(obj, _AttributesSave):
                yield from obj.tensors()

    def restore(self) -> None:
        """Put every saved value back."""
        for saved in self.tensors_saved:
            saved.restore()
        for obj in self.objects:
            obj.restore()


def _held(obj: Any) -> list[Any]:
    """The values of ``obj``'s own attributes (none for an object without ``__dict__``)."""
    try:
        return list(vars(obj).values())
    except TypeError:
        return []


def _used_by(fn: Any) -> list[Any]:
    """What ``fn`` can reach at once.

    Returns:
        Its global and closure variables, and for a bound method or a callable object, the
        attributes of its object (``self.scaler``).
    """
    values = []
    if inspect.ismethod(fn):
        values += _held(fn.__self__)
    elif not inspect.isfunction(fn) and callable(fn):
        values += _held(fn)
    try:
        names = inspect.getclosurevars(fn)
    except TypeError:  # not a Python function (a callable object, a partial)
        return values
    return [*values, *names.nonlocals.values(), *names.globals.values()]


def referenced_scalers(fn: Callable[..., Any] | None, depth: int = 3) -> list[torch.amp.GradScaler]:
    """The ``GradScaler`` objects that ``fn`` uses.

    Looked for among its global and closure variables and, when ``fn`` is a bound method (a
    ``train_step`` of a trainer object) or a callable object, among the object's attributes.
    Functions it uses are searched too, ``depth`` calls deep (a step that calls a helper), and
    a callable object's ``__call__``.

    Returns:
        The scalers, each once.
    """
    found: dict[int, torch.amp.GradScaler] = {}
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(fn, depth)]
    while todo:
        current, left = todo.pop()
        if current is None or id(current) in seen or left < 0:
            continue
        seen.add(id(current))
        call = inspect.getattr_static(type(current), "__call__", None)
        if inspect.isfunction(call) and not inspect.ismethod(current):  # a callable object
            todo.append((types.MethodType(call, current), left - 1))
        for value in _used_by(current):
            if isinstance(value, torch.amp.GradScaler):
                found.setdefault(id(value), value)
            elif inspect.isfunction(value) or inspect.ismethod(value):
                todo.append((value, left - 1))
    return list(found.values())
