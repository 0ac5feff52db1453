"""``--find length`` on a data set, for real: the search stays within its items.

A data set's batch "at length L" is made of its longest items not longer than L: it cannot be
longer than the data set's longest item, nor built below its shortest. The answer is the longest
item that fits (checked against every item length in turn), the trials run at their batches'
true lengths, and the answer says where the data set ends; where no honest answer can be given,
one line and exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from models import TinyEncoder
from sequences import Sequences, pad_collate

from maxbatch import ConfigError, find_bucket_sizes, find_max_length
from maxbatch.buckets import LengthResult
from maxbatch.cli import main
from maxbatch.run.lengthrun import LengthBatches, open_runner
from maxbatch.store.bucketreport import length_table
from maxbatch.store.reportcheck import load_report

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "sequences.py")
SIZES = [4 + (7 * i) % 61 for i in range(122)]  # every length from 4 to 64, twice
DATA: dict[str, Any] = {"size_fn": lambda item: len(item["input_ids"]), "collate_fn": pad_collate}


def _find(batch_size: int, **options: Any) -> LengthResult:
    return find_max_length(
        TinyEncoder(),
        Sequences(SIZES),
        batch_size=batch_size,
        memory="1MiB",
        optimizer="sgd",
        **DATA,
        **options,
    )


def _brute(batch_size: int) -> int:
    """Every item length from the shortest up, until the first whose batch does not fit."""
    batches = LengthBatches(Sequences(SIZES), **DATA)
    step = {"optimizer": "sgd"}
    with open_runner(
        TinyEncoder(), batches, device=None, memory="1MiB", headroom=None, step_options=step
    ) as runner:
        fitting = 0
        for n in sorted(set(SIZES)):
            if not runner.run(batch_size, n):
                break
            fitting = n
    return fitting


def test_the_longest_item_that_fits_equals_brute_force_over_the_items() -> None:
    result = _find(16)
    assert result.max_length == _brute(16) < max(SIZES)
    assert result.complete and result.longest_item == 64 and result.longest_item_fits is False
    seen = {t.length: t.fits for t in result.trials}
    assert seen[result.max_length] and not seen[result.max_length + 1]
    assert all(min(SIZES) <= t.length <= max(SIZES) for t in result.trials)
    assert "longest item that fits at batch size 16" in result.notes[0]


def test_a_data_set_that_fits_whole_ends_at_its_longest_item() -> None:
    result = _find(4)
    assert result.max_length == result.longest_item == max(SIZES)
    assert result.longest_item_fits is True and not result.complete
    assert max(t.length for t in result.trials) == max(SIZES)  # never past the data set
    assert any("holds nothing longer than 64" in n and "make_batch" in n for n in result.notes)
    data = result.to_dict()
    assert data["longest_item"] == 64 and data["longest_item_fits"] is True


def test_a_grid_off_the_longest_item_tries_that_item_too() -> None:
    """Multiples of 24 reach 48; the data set's longest item, 64, is run once more."""
    result = _find(4, length_multiple_of=24)
    assert [t.length for t in result.trials][-1] == 64
    assert all(t.length in (24, 48, 64) for t in result.trials)
    assert result.max_length == 64 and result.longest_item_fits is True
    assert "a data set's item; tried at multiples of 24" in length_table(result)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"length_multiple_of": 128}, "no multiple of length_multiple_of=128 lies within"),
        ({"max_length": 3}, "max_length=3 is shorter than every item of the data set"),
        ({"min_length": 2}, "min_length=2 is shorter than every item of the data set"),
    ],
)
def test_no_length_of_the_data_set_to_try_is_one_config_error(
    options: dict[str, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _find(4, **options)


def _probe(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["probe", EXAMPLE, "--find", "length", "--batch-size", "4", *args]
    )
    return result.exit_code, result.output


@pytest.mark.parametrize("limit", [[], ["--max-length", "2048"]], ids=["no-limit", "max-2048"])
def test_the_reported_example_stops_at_its_longest_item(limit: list[str], tmp_path: Path) -> None:
    """The report: a 24 MiB device "fit" length 16777216, and --max-length 2048 failed."""
    report = tmp_path / "r"
    code, out = _probe("--memory", "24MiB", *limit, "--json", "--report", str(report))
    assert code == 0, out
    data = json.loads(out[out.index("{") :])
    assert data["max_length"] == data["longest_item"] == 510  # 255 tokens: ids and labels
    assert data["longest_item_fits"] is True and data["complete"] is False
    assert max(t["length"] for t in data["trials"]) == 510
    assert any("lengths are the elements of an item's tensors" in n for n in data["notes"])
    saved = load_report(str(report / "report.json"))  # maxbatch report reads it back
    assert isinstance(saved.result, LengthResult) and saved.result.longest_item == 510


def test_a_grid_with_no_multiple_among_the_items_is_one_line_exit_2() -> None:
    code, out = _probe("--memory", "24MiB", "--length-multiple-of", "1024")
    assert code == 2
    assert out.count("\n") == 1 and "lower length_multiple_of" in out and "make_batch" in out


def test_a_bucket_below_the_shortest_item_names_the_shortest() -> None:
    with pytest.raises(ConfigError, match=r"as short as length 2 \(the shortest is 4\)"):
        find_bucket_sizes(
            TinyEncoder(), Sequences(SIZES), buckets=(2, 64), memory="1MiB", optimizer="sgd", **DATA
        )
