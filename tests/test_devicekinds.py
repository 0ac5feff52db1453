"""Device kinds as data: one table says what a kind can do, and the code asks it, not the name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from maxbatch.devicekinds import CPU, CUDA, KINDS, MPS, DeviceKind, kind_of
from maxbatch.devices.host import beyond_host
from maxbatch.results import DeviceInfo
from maxbatch.search.meter import CountingMeter, meter_for
from maxbatch.stats.noisestats import accumulator_dtype

PKG = Path(__file__).resolve().parents[1] / "maxbatch"


@pytest.mark.parametrize(
    ("device", "kind"),
    [
        (torch.device("cpu"), CPU),
        (torch.device("cuda", 1), CUDA),
        (torch.device("mps"), MPS),
        ("cuda", CUDA),
        ("cuda:3", CUDA),
        ("cpu", CPU),
    ],
)
def test_a_device_or_a_name_finds_its_kind(device: object, kind: DeviceKind) -> None:
    assert kind_of(device) is kind  # type: ignore[arg-type]


def test_an_unknown_kind_can_do_nothing_special() -> None:
    meta = kind_of(torch.device("meta"))
    assert meta.name == "meta" and meta.counted
    assert not (meta.events or meta.nvml or meta.empties_cache or meta.own_rng or meta.indexed)
    assert meta.rounding == 1


def test_the_table_says_what_each_kind_can_do() -> None:
    assert {k: (v.counted, v.events, v.nvml, v.empties_cache) for k, v in KINDS.items()} == {
        "cpu": (True, False, False, False),
        "cuda": (False, True, True, True),
        "mps": (True, False, False, True),
        "xpu": (True, False, False, True),
    }
    assert CUDA.rounding == 512 and CPU.rounding == MPS.rounding == 1
    assert CUDA.estimate_target == "cuda" and CPU.estimate_target == "cpu"


def test_kind_records_are_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        DeviceKind("cpu")  # type: ignore[misc]
    with pytest.raises(AttributeError):
        CPU.counted = False  # type: ignore[misc]


def test_the_meter_follows_the_kind() -> None:
    cpu = torch.device("cpu")
    assert isinstance(meter_for(cpu, virtual=False), CountingMeter)
    # CUDA keeps its own counters (AllocatorMeter); under a cap it is counted, rounded like CUDA.
    capped = meter_for(torch.device("cuda", 0), virtual=True)
    assert isinstance(capped, CountingMeter) and capped.counter.round_to == 512


def test_capacity_and_host_limits_follow_the_kind() -> None:
    def info(kind: str) -> DeviceInfo:
        return DeviceInfo(
            device=kind,
            kind=kind,
            name="x",
            total_bytes=100,
            free_bytes=60,
            process_bytes=30,
        )

    assert info("cuda").capacity_bytes == 90  # the allocator's cache is room for a step
    assert info("cpu").capacity_bytes == 60
    # Only a kind whose memory is the host's is checked against this machine's limits.
    assert beyond_host(2**62, 0, torch.device("cuda", 0)) is None
    assert beyond_host(2**62, 0, torch.device("cpu")) is not None


def test_the_noise_scale_sums_in_float64_where_the_kind_has_it() -> None:
    assert accumulator_dtype(torch.device("cpu")) is torch.float64
    assert accumulator_dtype(torch.device("mps")) is torch.float32


def _compares_with_cuda(node: ast.AST) -> bool:
    if not isinstance(node, ast.Compare) or not any(
        isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops
    ):
        return False
    operands = [node.left, *node.comparators]
    return any(isinstance(o, ast.Constant) and o.value == "cuda" for o in operands)


def test_no_module_compares_a_kind_with_the_string_cuda() -> None:
    found = [
        f"{path.relative_to(PKG)}:{node.lineno}"
        for path in sorted(PKG.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if _compares_with_cuda(node)
    ]
    assert found == []
