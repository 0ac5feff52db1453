"""Make a batch of any size from the user's sample batch.

A sample is a tensor or a nested structure of tuples, lists, dicts (and other mutable mappings,
such as the tokenizers' ``BatchEncoding``), dataclass instances and namedtuples whose leaves are
tensors or plain values. Every tensor with at least one dimension is *batched*: its dimension 0
is the batch. 0-dim tensors and non-tensor leaves (ints, strings, None, ...) are carried along
untouched.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch

from maxbatch.errors import BatchSizeMismatchError, ConfigError, WorkloadError

__all__ = [
    "batch_size_of",
    "check_rows",
    "held_bytes",
    "make_batch_fn",
    "map_tensors",
    "resize_batch",
]


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _init_fields(obj: Any) -> list[str]:
    # Only init fields: those are the ones dataclasses.replace() can set.
    return [f.name for f in dataclasses.fields(obj) if f.init]


def _batched_tensors(obj: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor with at least one dimension in ``obj``."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() > 0:
            yield path, obj
    elif _is_dataclass_instance(obj):
        for name in _init_fields(obj):
            yield from _batched_tensors(getattr(obj, name), f"{path}.{name}")
    elif _is_namedtuple(obj):
        for name, item in zip(type(obj)._fields, obj, strict=True):
            yield from _batched_tensors(item, f"{path}.{name}")
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from _batched_tensors(item, f"{path}[{i}]")
    elif isinstance(obj, MutableMapping):
        for key, item in obj.items():
            yield from _batched_tensors(item, f"{path}[{key!r}]")


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Rebuild ``obj`` with ``fn`` applied to every batched tensor, keeping container types.

    Args:
        obj: a tensor or a nested structure of them, as for :func:`batch_size_of`.
        fn: applied to every tensor with at least one dimension; 0-dim tensors and non-tensor
            leaves are kept as they are.

    Returns:
        A structure of the same shape and types as ``obj``.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.dim() > 0 else obj
    if _is_dataclass_instance(obj):
        changes = {name: map_tensors(getattr(obj, name), fn) for name in _init_fields(obj)}
        return dataclasses.replace(obj, **changes)
    if _is_namedtuple(obj):
        return type(obj)(*(map_tensors(item, fn) for item in obj))
    if isinstance(obj, (tuple, list)):
        items = [map_tensors(item, fn) for item in obj]
        return type(obj)(items)
    if isinstance(obj, MutableMapping):
        # A shallow copy keeps the mapping's type, key order and extra state (such as a
        # defaultdict's factory, or a BatchEncoding's encodings) without copying any tensor.
        out = copy.copy(obj)
        for key, item in obj.items():
            out[key] = map_tensors(item, fn)
        return out
    return obj


def _has_arrays(obj: Any) -> bool:
    """Whether ``obj`` is, or directly holds, a NumPy array (a common slip for a tensor)."""
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return any(type(x).__module__ == "numpy" for x in [obj, *items])


def batch_size_of(sample: Any) -> int:
    """Return the batch size of ``sample``: dimension 0 shared by all its batched tensors.

    Args:
        sample: a tensor or a nested structure of tuples, lists, dicts, dataclass instances
            and namedtuples holding tensors.

    Returns:
        The size of dimension 0 of every tensor in ``sample`` that has a dimension.

    Raises:
        WorkloadError: ``sample`` holds no tensor with at least one dimension, or its tensors
            disagree on the size of dimension 0, or that size is 0.
    """
    found = list(_batched_tensors(sample, "sample"))
    if not found:
        hint = " (convert arrays with torch.from_numpy)" if _has_arrays(sample) else ""
        raise WorkloadError(
            f"the sample holds no tensor with a batch dimension (got {type(sample).__name__}); "
            "pass a tensor, or a tuple, list, dict, dataclass or namedtuple of tensors whose "
            f"dimension 0 is the batch{hint}"
        )
    sizes = sorted({tensor.shape[0] for _, tensor in found})
    if len(sizes) > 1:
        where = ", ".join(f"{path} has {tensor.shape[0]}" for path, tensor in found)
        raise WorkloadError(
            "the tensors in the sample disagree on the batch size (dimension 0): found sizes "
            f"{', '.join(map(str, sizes))} ({where})"
        )
    if sizes[0] == 0:
        raise WorkloadError("the sample's batch is empty (dimension 0 has size 0)")
    return int(sizes[0])


def check_rows(batch: Any, batch_size: int) -> None:
    """Check that every tensor with a batch dimension in ``batch`` has ``batch_size`` rows.

    Raises:
        BatchSizeMismatchError: a tensor has another number of rows (or none has a dimension).
    """
    found = list(_batched_tensors(batch, "batch"))
    wrong = [(path, int(t.shape[0])) for path, t in found if t.shape[0] != batch_size]
    if found and not wrong:
        return
    returned = wrong[0][1] if wrong else 0
    where = (
        ", ".join(f"{path} has {rows}" for path, rows in wrong[:3])
        if wrong
        else "no tensor has a batch dimension"
    )
    raise BatchSizeMismatchError(
        f"make_batch({batch_size}) returned a batch of {returned} rows ({where}); "
        f"make_batch(batch_size) must return batch_size rows in every tensor with a batch "
        "dimension (dimension 0)",
        asked=batch_size,
        returned=returned,
    )


def resize_batch(sample: Any, batch_size: int) -> Any:
    """Return a copy of ``sample`` whose batched tensors all have ``batch_size`` rows.

    Row ``i`` of each result tensor is row ``i % n`` of the sample's tensor, where ``n`` is the
    sample's batch size, so a smaller batch is a prefix and a larger one repeats the rows
    cyclically. Result tensors keep the dtype and device of the sample's and do not require
    gradients. Containers are rebuilt with their own types. The tensors are always new, also when
    ``batch_size`` equals the sample's size, so that a trial's input bytes count at every size.

    Args:
        sample: the user's sample batch (see :func:`batch_size_of`).
        batch_size: the number of rows wanted, at least 1.

    Returns:
        A structure of the same shape and types as ``sample``.

    Raises:
        ConfigError: ``batch_size`` is not an integer of at least 1.
        WorkloadError: ``sample`` has no batch dimension or an inconsistent one.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = batch_size_of(sample)
    if batch_size == n:
        return map_tensors(sample, lambda tensor: tensor.detach().clone())
    indices: dict[torch.device, torch.Tensor] = {}

    def resize(tensor: torch.Tensor) -> torch.Tensor:
        # One index tensor per device, made on that device to avoid a host-to-device copy.
        index = indices.get(tensor.device)
        if index is None:
            index = torch.arange(batch_size, device=tensor.device) % n
            indices[tensor.device] = index
        with torch.no_grad():
            return tensor.index_select(0, index)

    return map_tensors(sample, resize)


def make_batch_fn(sample_or_callable: Any) -> tuple[Callable[[int], Any], int | None]:
    """Turn what the user gave into a function from batch size to batch.

    Args:
        sample_or_callable: either a function that takes a batch size and returns a batch,
            or a sample batch to resize with :func:`resize_batch`.

    Returns:
        The batch function, and the sample's batch size (``None`` for a user's function).

    Raises:
        WorkloadError: the sample has no batch dimension or an inconsistent one, or it is
            a ``torch.nn.Module`` (a model passed where the batch belongs).
    """
    if isinstance(sample_or_callable, torch.nn.Module):
        raise WorkloadError(
            f"expected a sample batch or a function of the batch size, got the module "
            f"{type(sample_or_callable).__name__}"
        )
    if callable(sample_or_callable) and not isinstance(sample_or_callable, torch.Tensor):
        return sample_or_callable, None
    sample = sample_or_callable
    size = batch_size_of(sample)

    def batch_fn(batch_size: int) -> Any:
        return resize_batch(sample, batch_size)

    return batch_fn, size


def held_bytes(batch: Any, device: torch.device) -> int:
    """The bytes of ``batch``'s tensors on ``device``, each storage once (slices are views)."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    map_tensors(batch, add)
    return sum(seen.values())
