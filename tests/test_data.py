"""Worst-case batches from real data: a data set or a DataLoader as the probe's batch source."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from models import encoder
from sequences import LONGEST, Sequences, lengths, longest_batch, pad_collate
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    SubsetRandomSampler,
    TensorDataset,
)

import maxbatch
from maxbatch.step.data import DataSource, elements

CAPACITY = 2_000_000


def _loader(ds: Sequences, batch_size: int, seed: int = 0) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=pad_collate, generator=g)


def _epoch(model: torch.nn.Module, loader: DataLoader[Any]) -> tuple[int, int | None]:
    """Train one epoch inside the virtual device; return (steps done, length of the OOM batch)."""
    opt = torch.optim.AdamW(model.parameters())

    def step(batch: dict[str, torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        model(**batch)["loss"].backward()
        opt.step()

    steps, failed_at = 0, None
    with maxbatch.virtual_device(CAPACITY) as dev:
        dev.track(model)
        for batch in loader:
            try:
                step(batch)
            except torch.OutOfMemoryError:
                failed_at = batch["input_ids"].shape[1]
                break
            steps += 1
    return steps, failed_at


@pytest.mark.slow
def test_the_data_sets_ceiling_survives_a_shuffled_epoch_where_the_first_batchs_does_not() -> None:
    ds = Sequences(lengths())
    model, _ = encoder()
    from_data = maxbatch.find_batch_size(model, _loader(ds, 8), memory=CAPACITY, profile=False)
    from_longest = maxbatch.find_batch_size(model, longest_batch, memory=CAPACITY, profile=False)
    first = next(iter(_loader(ds, 8)))
    from_first = maxbatch.find_batch_size(model, first, memory=CAPACITY, profile=False)

    assert from_data.ceiling == from_longest.ceiling
    assert first["input_ids"].shape[1] < LONGEST
    assert from_first.ceiling > from_data.ceiling

    b = from_data.ceiling
    steps, failed_at = _epoch(model, _loader(ds, b, seed=1))
    assert failed_at is None and steps == -(-len(ds) // b)

    steps, failed_at = _epoch(model, _loader(ds, from_first.ceiling, seed=1))
    assert failed_at is not None and failed_at > first["input_ids"].shape[1]

    scan = from_data.data
    assert scan is not None
    assert scan.batch_size == b and scan.items == scan.scanned == len(ds)
    assert tuple(scan.sizes[:3]) == (2 * LONGEST,) * 3  # input_ids and labels: 2 elements a token
    assert sorted(scan.indices[:3]) == [i for i, n in enumerate(ds.sizes) if n == LONGEST]
    assert scan.seconds >= 0 and not scan.sampled
    assert any(n.startswith("worst case from the data: batch") for n in from_data.notes)


def test_a_dataset_with_collate_fn_and_size_fn() -> None:
    ds = Sequences(lengths(40, long=1))
    source = DataSource(ds, collate_fn=pad_collate, size_fn=lambda item: len(item["input_ids"]))
    batch = source(5)
    assert batch["input_ids"].shape == (5, LONGEST)
    report = source.report(5)
    assert report.size_of == "size_fn" and report.sizes[0] == LONGEST
    assert report.sizes == tuple(sorted(report.sizes, reverse=True))
    assert source.worst_indices(3) == list(report.indices[:3])


def test_fewer_items_than_the_batch_cycle() -> None:
    ds = TensorDataset(torch.arange(3.0).unsqueeze(1))
    source = DataSource(ds)
    assert source.worst_indices(7) == [0, 1, 2, 0, 1, 2, 0]
    (x,) = source(7)
    assert x.shape == (7, 1)


def test_scan_limit_reads_a_seeded_sample_and_says_so() -> None:
    ds = Sequences(lengths(300))
    seen: list[tuple[int, int]] = []
    source = DataSource(
        ds, collate_fn=pad_collate, scan_limit=50, on_progress=lambda d, t: seen.append((d, t))
    )
    scan = source.report(4)
    assert scan.scanned == 50 and scan.items == 300 and scan.sampled
    assert "a random sample: raise scan_limit" in scan.note
    assert seen[-1] == (50, 50) and len(seen) == 50
    assert DataSource(ds, scan_limit=50).report(4).indices == scan.indices  # seeded


def test_progress_is_logged_on_long_scans(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("maxbatch.step.data.LOG_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="maxbatch.step.data"):
        DataSource(Sequences(lengths(100))).scan()
    assert "scanned 100 of 100 items" in caplog.text


class Buckets(torch.utils.data.Sampler[list[int]]):
    """Batches of items of similar length: sorted by length, cut into groups of ``size``."""

    def __init__(self, sizes: list[int], size: int):
        self.order = sorted(range(len(sizes)), key=lambda i: sizes[i])
        self.size = size

    def __iter__(self) -> Any:
        for start in range(0, len(self.order), self.size):
            yield self.order[start : start + self.size]

    def __len__(self) -> int:
        return -(-len(self.order) // self.size)


def test_a_bucketing_batch_sampler_s_worst_case_is_its_largest_bucket() -> None:
    # Buckets of 4: [4 x 4], [4 x 5], [4 x 6], [4 x 20] and [64] alone: 4 x 20 tokens > 1 x 64.
    sizes = [4] * 4 + [5] * 4 + [6] * 4 + [20] * 4 + [LONGEST]
    loader = DataLoader(Sequences(sizes), batch_sampler=Buckets(sizes, 4), collate_fn=pad_collate)
    source = DataSource(loader)
    scan = source.report(4)
    assert scan.bucket is not None and sorted(scan.bucket) == [12, 13, 14, 15]
    assert sorted(source.worst_indices(4)) == [12, 13, 14, 15]  # not the longest item, #16
    assert source.worst_indices(6)[4:] == source.worst_indices(2)  # larger: cycled in the bucket
    assert source(4)["input_ids"].shape == (4, 20)
    assert "largest bucket" in scan.note


def test_a_loader_s_subset_sampler_limits_the_items() -> None:
    ds = Sequences(lengths(50))
    longest = max(range(50), key=lambda i: ds.sizes[i])
    keep = [i for i in range(50) if i != longest]
    loader = DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(keep), collate_fn=pad_collate)
    assert longest not in DataSource(loader).worst_indices(49)


class Stream(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Any:
        yield torch.zeros(3)


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        (Stream(), {}, maxbatch.ConfigError, "a Stream cannot be indexed"),
        (DataLoader(Stream(), batch_size=2), {}, maxbatch.ConfigError, "cannot be indexed"),
        (DataLoader([1, 2], batch_size=None), {}, maxbatch.ConfigError, "does not batch"),
        (
            DataLoader([1, 2], batch_size=2),
            {"collate_fn": pad_collate},
            maxbatch.ConfigError,
            "has its own; keep one",
        ),
        ([], {}, maxbatch.ConfigError, "the data set is empty"),
        (["a", "b"], {}, maxbatch.ConfigError, "pass size_fn"),
        ([1, 2], {"scan_limit": 0}, maxbatch.ConfigError, "scan_limit=0"),
        ([1, 2], {"size_fn": lambda it: -1}, maxbatch.ConfigError, "size_fn returned -1 for item"),
        ([1, 2], {"size_fn": lambda it: 1 / 0}, maxbatch.WorkloadError, "item 0 .* ZeroDivision"),
    ],
)
def test_bad_data(data: Any, kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DataSource(data, **kwargs).scan()


def test_a_stacking_collate_on_ragged_items_says_to_pad() -> None:
    model, _ = encoder()
    with pytest.raises(maxbatch.WorkloadError, match="need a collate_fn that pads") as info:
        maxbatch.find_batch_size(model, Sequences(lengths(20)), memory=CAPACITY, profile=False)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_elements_counts_tensors_arrays_and_numbers() -> None:
    import numpy as np

    item = {"ids": [1, 2, 3], "x": torch.zeros(2, 3), "a": np.zeros(4), "s": "text", "f": True}
    assert elements(item) == 3 + 6 + 4


@pytest.mark.slow
def test_the_estimate_takes_a_data_set_too() -> None:
    model, _ = encoder()
    loader = _loader(Sequences(lengths()), 8)
    est = maxbatch.estimate_batch_size(model, loader, memory=CAPACITY)
    probe = maxbatch.find_batch_size(model, longest_batch, memory=CAPACITY, profile=False)
    assert est.capacities[0].ceiling == probe.ceiling
    assert any(n.startswith("worst case from the data") for n in est.notes)


# -- the model file's `dataset` on the command line ---------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sequences.py"


@pytest.mark.slow
def test_cli_probe_and_estimate_take_a_model_file_s_dataset() -> None:
    from click.testing import CliRunner

    from maxbatch.cli import main

    probe = CliRunner().invoke(
        main, ["probe", str(EXAMPLE), "--memory", "16MiB", "--no-profile", "--json"]
    )
    assert probe.exit_code == 0, probe.output
    result = json.loads(probe.stdout)
    assert result["data"]["items"] == 2000 and result["data"]["batch_size"] == result["ceiling"]
    assert "read the data set: 2000 items" in probe.stderr
    estimate = CliRunner().invoke(main, ["estimate", str(EXAMPLE), "--memory", "16MiB", "--json"])
    assert estimate.exit_code == 0, estimate.output
    assert json.loads(estimate.stdout)["capacities"][0]["ceiling"] == result["ceiling"]


class Augmented(Dataset[torch.Tensor]):
    """Items drawn with random augmentation from torch, Python and NumPy."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> torch.Tensor:
        shift = random.random() + float(np.random.rand())
        return torch.randn(8) + shift


def test_reading_the_data_leaves_the_random_states_as_they_were() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    loader = DataLoader(Augmented(), batch_size=4, shuffle=True)
    maxbatch.find_batch_size(model, loader, memory="1MiB", profile=False)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(after, states[2], strict=True))
