from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple

import pytest
import torch

from maxbatch.errors import ConfigError, WorkloadError
from maxbatch.step.batching import batch_size_of, make_batch_fn, resize_batch

N = 4  # rows in every sample below


@dataclasses.dataclass(frozen=True)
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    name: str = "train"


class Pair(NamedTuple):
    x: torch.Tensor
    mask: torch.Tensor


def _images() -> torch.Tensor:
    return torch.arange(N * 3 * 2, dtype=torch.float32).reshape(N, 3, 2)


def _labels() -> torch.Tensor:
    return torch.tensor([7, 8, 9, 10], dtype=torch.int64)


SAMPLES: dict[str, Any] = {
    "tensor": _images(),
    "tuple": (_images(), _labels()),
    "dict": {"pixels": _images(), "split": "val", "labels": _labels(), "scale": torch.tensor(2.0)},
    "dataclass": Batch(_images(), _labels()),
    "namedtuple": Pair(_images(), torch.tensor([True, False, True, True])),
    "nested_list": [[_images(), 3], {"ids": _labels().to(torch.int32), "none": None}],
    "half": (_images().half(), _labels().to(torch.uint8)),
}


def _leaves(obj: Any) -> list[Any]:
    """Leaves in traversal order, for comparing a result with its sample."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [leaf for f in dataclasses.fields(obj) for leaf in _leaves(getattr(obj, f.name))]
    if isinstance(obj, (tuple, list)):
        return [leaf for item in obj for leaf in _leaves(item)]
    if isinstance(obj, dict):
        return [leaf for item in obj.values() for leaf in _leaves(item)]
    return [obj]


def _same_structure(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same_structure(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same_structure(x, y)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _same_structure(getattr(a, f.name), getattr(b, f.name))


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_batch_size_of(kind: str) -> None:
    assert batch_size_of(SAMPLES[kind]) == N


@pytest.mark.parametrize("kind", list(SAMPLES))
@pytest.mark.parametrize("size", [1, 3, 5, 11])
def test_resize_repeats_rows_cyclically(kind: str, size: int) -> None:
    sample = SAMPLES[kind]
    result = resize_batch(sample, size)
    _same_structure(result, sample)
    assert batch_size_of(result) == size
    rows = torch.arange(size) % N
    for got, orig in zip(_leaves(result), _leaves(sample), strict=True):
        if isinstance(orig, torch.Tensor) and orig.dim() > 0:
            assert got.shape == (size, *orig.shape[1:])
            assert got.dtype == orig.dtype
            assert got.device == orig.device
            assert torch.equal(got, orig[rows])
            for i in range(size):
                assert torch.equal(got[i], orig[i % N])
        else:
            assert got is orig  # 0-dim tensors and plain leaves are carried along


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_same_size_copies_the_tensors(kind: str) -> None:
    sample = SAMPLES[kind]
    result = resize_batch(sample, N)
    _same_structure(result, sample)
    for got, orig in zip(_leaves(result), _leaves(sample), strict=True):
        if isinstance(orig, torch.Tensor) and orig.dim() > 0:
            assert got is not orig
            assert got.untyped_storage().data_ptr() != orig.untyped_storage().data_ptr()
            assert torch.equal(got, orig)
        else:
            assert got is orig


def test_result_does_not_require_grad() -> None:
    sample = torch.randn(N, 2, requires_grad=True)
    result = resize_batch(sample, 6)
    assert result.requires_grad is False
    assert result.grad_fn is None


def test_dict_subclass_keeps_type_and_state() -> None:
    sample = collections.defaultdict(list, {"b": _labels(), "a": _images()})
    result = resize_batch(sample, 2)
    assert type(result) is collections.defaultdict
    assert result.default_factory is list
    assert list(result) == ["b", "a"]
    assert sample["b"].shape == (N,)  # the sample itself is untouched


class Encoding(collections.UserDict):  # type: ignore[type-arg]
    """A mapping that is not a dict, with state of its own, as a tokenizer's BatchEncoding."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        super().__init__(data)
        self.source = source


def test_a_mutable_mapping_that_is_not_a_dict() -> None:
    sample = Encoding({"y": _labels(), "x": _images()}, source="tokenizer")
    assert batch_size_of(sample) == N
    result = resize_batch(sample, 6)
    assert type(result) is Encoding and result.source == "tokenizer"
    assert list(result) == ["y", "x"] and result["y"].tolist() == [7, 8, 9, 10, 7, 8]
    assert sample["y"].shape == (N,)


def test_batch_fn_from_a_sample() -> None:
    sample = {"x": _images(), "y": _labels()}
    batch_fn, size = make_batch_fn(sample)
    assert size == N
    assert batch_fn(6)["y"].tolist() == [7, 8, 9, 10, 7, 8]


def test_batch_fn_from_a_callable() -> None:
    def make(b: int) -> torch.Tensor:
        return torch.zeros(b, 3)

    batch_fn, size = make_batch_fn(make)
    assert batch_fn is make
    assert size is None


def test_batch_fn_validates_the_sample_at_once() -> None:
    with pytest.raises(WorkloadError, match="disagree") as caught:
        make_batch_fn((torch.zeros(3, 2), torch.zeros(5)))
    assert caught.value.batch_size is None


def test_batch_fn_rejects_a_module() -> None:
    with pytest.raises(WorkloadError, match="module Linear") as caught:
        make_batch_fn(torch.nn.Linear(2, 2))
    assert "function of the batch size" in str(caught.value)


@pytest.mark.parametrize(
    "sample",
    [None, 3, "text", torch.tensor(1.0), (torch.tensor(1.0), [1, 2]), {"a": None}, []],
)
def test_no_batched_tensor(sample: Any) -> None:
    with pytest.raises(WorkloadError, match="no tensor with a batch dimension") as caught:
        batch_size_of(sample)
    assert type(sample).__name__ in str(caught.value)


def test_disagreeing_sizes_are_named() -> None:
    sample = {"x": torch.zeros(4, 2), "y": (torch.zeros(3), torch.zeros(4))}
    with pytest.raises(WorkloadError, match=r"found sizes 3, 4") as caught:
        batch_size_of(sample)
    message = str(caught.value)
    assert "sample['x'] has 4" in message
    assert "sample['y'][0] has 3" in message
    assert "sample['y'][1] has 4" in message


def test_empty_batch() -> None:
    with pytest.raises(WorkloadError, match="empty") as caught:
        resize_batch(torch.zeros(0, 3), 2)
    assert isinstance(caught.value, WorkloadError)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "8", None])
def test_bad_batch_size(bad: Any) -> None:
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1") as caught:
        resize_batch(_images(), bad)
    assert repr(bad) in str(caught.value)
    assert isinstance(caught.value, ValueError)
