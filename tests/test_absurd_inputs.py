"""Absurd sizes and a model without weights: a ConfigError (exit 2) before anything runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from maxbatch import ConfigError, estimate_batch_size, find_batch_size, virtual_device
from maxbatch.cli import main
from maxbatch.units import MAX_BYTES, parse_bytes

REPO = Path(__file__).resolve().parent.parent
MLP = str(REPO / "examples" / "mlp.py")
DIGITS = "9" * 400

ABSURD = [DIGITS, f"{DIGITS}GiB", "1" + "0" * 30, "2EB", math.inf, -math.inf, math.nan, 10**400]
ABSURD += [1e300, MAX_BYTES + 1, "inf", "nan", "1e300"]


@pytest.mark.parametrize("value", ABSURD, ids=lambda v: str(v)[:16])
def test_absurd_sizes_are_config_errors(value: object) -> None:
    with pytest.raises(ConfigError, match="memory="):
        parse_bytes(value, name="memory")  # type: ignore[arg-type]


def test_the_largest_size_still_parses() -> None:
    assert parse_bytes(MAX_BYTES) == MAX_BYTES == parse_bytes(f"{1024**2}TiB")
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes(".5k") == 500


@pytest.mark.parametrize("value", [math.inf, math.nan, DIGITS, 10**400])
def test_virtual_device_refuses_absurd_capacities(value: object) -> None:
    with pytest.raises(ConfigError, match="capacity="), virtual_device(value):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize("value", [math.inf, math.nan, DIGITS])
def test_the_library_refuses_absurd_memory(value: object) -> None:
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="memory="):
        find_batch_size(model, torch.randn(2, 4), memory=value, profile=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="memory="):
        estimate_batch_size(model, torch.randn(2, 4), memory=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["probe", "estimate"])
@pytest.mark.parametrize("value", [DIGITS, "inf", "nan", f"{DIGITS}MiB"])
def test_absurd_memory_on_the_command_line_is_one_line_and_exit_2(command: str, value: str) -> None:
    res = CliRunner().invoke(main, [command, MLP, "--memory", value])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maxbatch: error: memory="), lines
    assert len(lines[0]) < 200  # 400 digits are not echoed back


def _meta_model() -> torch.nn.Module:
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))


def test_a_model_without_weights_is_refused_early() -> None:
    with pytest.raises(ConfigError, match="meta device.*only estimate") as info:
        find_batch_size(_meta_model(), torch.randn(2, 8), memory="1MiB", profile=False)
    assert "0.weight" in str(info.value) and "Cannot copy" not in str(info.value)


@pytest.mark.slow
def test_estimate_runs_a_model_without_weights() -> None:
    assert estimate_batch_size(_meta_model(), torch.randn(2, 8), memory="1MiB").ceiling >= 2


def test_a_model_partly_on_the_meta_device_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    model[1].to_empty(device="meta")  # type: ignore[operator]
    with pytest.raises(ConfigError, match="1.weight"):
        find_batch_size(model, torch.randn(2, 8), memory="1MiB", profile=False)


@pytest.mark.parametrize("isolate", [[], ["--isolate"]])
def test_a_model_file_without_weights_exits_2_with_one_line(
    tmp_path: Path, isolate: list[str]
) -> None:
    path = tmp_path / "meta.py"
    path.write_text(
        "import torch\nwith torch.device('meta'):\n    model = torch.nn.Linear(8, 2)\n"
        "sample = torch.randn(2, 8)\n"
    )
    argv = ["probe", str(path), "--memory", "1MiB", "--no-profile", *isolate]
    res = CliRunner().invoke(main, argv)  # --isolate: refused before any child starts
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "meta device" in lines[0] and "maxbatch estimate" in lines[0]
