"""``maxbatch probe --find length`` and ``--buckets`` in-process, by their JSON and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from maxbatch.cli import main

MODEL_FILE = """
import torch
from torch import nn

VOCAB = 64


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, VOCAB)

    def forward(self, tokens):
        x = self.emb(tokens)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = x + torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
        return nn.functional.cross_entropy(self.out(h).flatten(0, 1), tokens.flatten())


torch.manual_seed(0)
model = Attention()


def make_batch(batch_size, length):
    return torch.randint(0, VOCAB, (batch_size, length))


def loss(output, batch):
    return output
"""


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "model.py"
    path.write_text(MODEL_FILE)
    return str(path)


def _probe(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["probe", *args])
    return result.exit_code, result.output


@pytest.mark.slow
def test_find_length_prints_max_length_in_json(model_file: str) -> None:
    code, out = _probe(
        model_file,
        "--find",
        "length",
        "--batch-size",
        "8",
        "--memory",
        "1MiB",
        "--optimizer",
        "sgd",
        "--length-multiple-of",
        "4",
        "--json",
    )
    assert code == 0, out
    data = json.loads(out[out.index("{") :])
    assert data["max_length"] % 4 == 0
    assert data["batch_size"] == 8
    lengths = {t["length"]: t["fits"] for t in data["trials"]}
    assert lengths[data["max_length"]] and not lengths[data["max_length"] + 4]


@pytest.mark.slow
def test_buckets_print_a_table_and_write_a_report(model_file: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    code, out = _probe(
        model_file,
        "--buckets",
        "8,16,32",
        "--memory",
        "1MiB",
        "--optimizer",
        "sgd",
        "--report",
        str(tmp_path / "r"),
    )
    assert code == 0, out
    assert "bucket_batch_size=" in out
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [b["max_length"] for b in data["buckets"]] == [8, 16, 32]
    assert (tmp_path / "r" / "buckets.png").stat().st_size > 0
    assert "| lengths |" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--find", "length"], "--find length needs --batch-size"),
        (["--buckets", "8"], "needs the data set's lengths"),
        (["--buckets", "0"], "--buckets '0'"),
        (["--buckets", "8,16", "--isolate"], "--isolate does not run the length axis"),
    ],
)
def test_length_axis_errors_are_one_line(model_file: str, args: list[str], message: str) -> None:
    code, out = _probe(model_file, "--memory", "1MiB", *args)
    assert code != 0
    assert message in out
    assert "Traceback" not in out
