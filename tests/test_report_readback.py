"""``maxbatch report`` reads back what the live run printed: the noise scale (non-finite numbers
saved as null included), a ``--buckets`` bucket profile and a ``--find length`` answer; a file that
is none of the reports, or a broken one, is refused with one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_render_records import _renders, _result

from maxbatch.answers import NoiseScale
from maxbatch.buckets import Bucket, BucketProfile, LengthMemoryModel, LengthResult, LengthTrial
from maxbatch.cli import main
from maxbatch.errors import ConfigError
from maxbatch.results import BatchSizeResult
from maxbatch.store.bucketreport import bucket_markdown, bucket_table, length_markdown, length_table
from maxbatch.store.report import result_json
from maxbatch.store.reportcheck import check_result, load_report

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MIB = 1024**2


def _saved(tmp_path: Path, data: dict[str, object], name: str = "report.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _with_noise(**changes: float) -> BatchSizeResult:
    result = _result(noise=True)
    assert result.noise_scale is not None
    return dataclasses.replace(
        result, noise_scale=dataclasses.replace(result.noise_scale, **changes)
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"b_simple": math.inf, "std_error": math.inf, "grad_sq_norm": -0.01},
        {"b_simple": math.nan, "std_error": math.nan},
    ],
    ids=["finite", "infinite", "nan"],
)
def test_a_saved_noise_scale_renders_as_the_live_one(tmp_path: Path, changes: dict) -> None:
    result = _with_noise(**changes)
    text = result_json(result, model_file="model.py")
    saved = load_report(str(_saved(tmp_path, json.loads(text))))
    assert saved.result.noise_scale is not None
    assert _renders(saved.result) == _renders(result)
    table = _renders(saved.result)[0]
    assert "noise scale: " in table and "critical batch ≈ " in table
    finite = not changes
    assert ("B_simple ≈ 177.1 ± 6.6" in table) is finite
    assert ("not resolved (the gradient was not above its noise)" in table) is not finite
    data = json.loads(text)["noise_scale"]
    assert (data["b_simple"] is None) is not finite  # to_dict's null, read back
    assert data["critical_batch"] == (177 if finite else None)  # derived: accepted, ignored


def test_a_noise_scale_read_back_keeps_its_fields(tmp_path: Path) -> None:
    result = _with_noise(data_rows=100, method="over steps")
    saved = load_report(str(_saved(tmp_path, result.to_dict())))
    assert saved.result.noise_scale == result.noise_scale


def test_a_cache_entry_with_a_non_finite_noise_scale_passes_the_check() -> None:
    # The cache checks its entries' results against the same schema, and keeps the noise scale.
    result = _with_noise(b_simple=math.inf, std_error=math.inf)
    data = json.loads(json.dumps(result.to_dict()))
    assert check_result(data, "result")["noise_scale"]["b_simple"] is None
    assert BatchSizeResult.from_dict(data).noise_scale == result.noise_scale


def test_a_null_estimate_reads_back_as_nan_and_renders(tmp_path: Path) -> None:
    # ``to_dict`` writes any non-finite float as null; tr(Σ) and |G|² come back as NaN, not None.
    data = _with_noise().to_dict()
    data["noise_scale"]["trace_cov"] = None
    scale = load_report(str(_saved(tmp_path, data))).result.noise_scale
    assert scale is not None and math.isnan(scale.trace_cov)
    assert (
        "tr(Σ) nan, |G|² 0.1448" in _renders(load_report(str(tmp_path / "report.json")).result)[0]
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("b_small", 0, "report.noise_scale.b_small should be at least 1"),
        ("b_simple", "big", "report.noise_scale.b_simple should be a number or null, not str"),
        ("notes", "one", "report.noise_scale.notes should be a list"),
        ("draws", None, "report.noise_scale.draws is missing"),
    ],
)
def test_a_broken_noise_scale_is_refused(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    data = _with_noise().to_dict()
    data["noise_scale"][key] = value
    with pytest.raises(ConfigError, match="not a maxbatch report") as info:
        load_report(str(_saved(tmp_path, data)))
    assert message in str(info.value)


def test_a_noise_scale_with_control_characters_is_cleaned(tmp_path: Path) -> None:
    data = _with_noise().to_dict()
    data["noise_scale"]["notes"] = ["\x1b[31mred"]
    scale = load_report(str(_saved(tmp_path, data))).result.noise_scale
    assert isinstance(scale, NoiseScale) and scale.notes == ("\\x1b[31mred",)


def _profile() -> BucketProfile:
    return BucketProfile(
        buckets=(
            Bucket(max_length=74, ceiling=81, min_length=32, items=897, share=0.45),
            Bucket(max_length=510, ceiling=11, min_length=76, pick=8, predicted_ceiling=12),
        ),
        memory_model=LengthMemoryModel(
            fixed_bytes=2.5 * MIB, bytes_per_sample=0.0, bytes_per_token=10728.0
        ),
        trials=(LengthTrial(batch_size=2, length=510, fits=True, peak_bytes=MIB, seconds=0.1),),
        seconds=4.1,
        device="cpu",
        usable_bytes=64 * MIB,
        histogram=((32, 74, 897), (76, 510, 172)),
        notes=("a note",),
    )


def test_a_saved_bucket_profile_renders_as_the_live_one(tmp_path: Path) -> None:
    profile = _profile()
    saved = load_report(str(_saved(tmp_path, {**profile.to_dict(), "model_file": "m.py"})))
    assert isinstance(saved.result, BucketProfile) and saved.model_file == "m.py"
    assert saved.result.buckets == profile.buckets and saved.result.notes == profile.notes
    for render in (bucket_table, bucket_markdown):
        assert render(saved.result, title="t") == render(profile, title="t")


def test_a_saved_longest_length_renders_as_the_live_one(tmp_path: Path) -> None:
    longest = LengthResult(
        max_length=512,
        batch_size=8,
        length_multiple_of=8,
        trials=(LengthTrial(batch_size=8, length=512, fits=True, peak_bytes=MIB, seconds=0.1),),
        seconds=1.5,
        device="cpu",
        usable_bytes=24 * MIB,
        memory_model=_profile().memory_model,
        complete=False,
        notes=("stopped at max_length=512",),
    )
    saved = load_report(str(_saved(tmp_path, longest.to_dict())))
    assert saved.result == longest and saved.model_file is None
    assert length_markdown(saved.result) == length_markdown(longest)
    assert length_table(saved.result, title="t") == length_table(longest, title="t")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"buckets": []}, "a bucket profile needs at least one bucket"),
        ({"buckets": "8,16"}, "report.buckets should be a list, not str"),
        ({"seconds": "long"}, "report.seconds should be a number, not str"),
        ({"trials": [{"batch_size": 2}]}, "report.trials[0].length is missing"),
    ],
)
def test_a_broken_bucket_report_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    path = _saved(tmp_path, {**_profile().to_dict(), **change})
    with pytest.raises(ConfigError, match="not a maxbatch bucket report") as info:
        load_report(str(path))
    assert message in str(info.value)


def test_report_refuses_a_broken_bucket_report_and_a_file_that_is_none(tmp_path: Path) -> None:
    rows = _profile().to_dict()["buckets"]
    rows[1]["pick"] = 99  # above its ceiling 11
    broken = _saved(tmp_path, {**_profile().to_dict(), "buckets": rows}, "broken.json")
    res = CliRunner().invoke(main, ["report", str(broken)])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "bucket pick 99 is not in 1..ceiling (11)" in res.stderr
    neither = _saved(tmp_path, {"hello": 1}, "neither.json")
    res = CliRunner().invoke(main, ["report", str(neither)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert "not a maxbatch report: neither a batch-size report" in res.stderr


def _live_and_again(args: list[str], out: Path) -> tuple[str, str, str]:
    """The live run's text, then ``maxbatch report``'s text and Markdown of its report.json."""
    live = CliRunner().invoke(main, ["probe", *args, "--report", str(out)])
    assert live.exit_code == 0, live.output
    again = CliRunner().invoke(main, ["report", str(out / "report.json")])
    markdown = CliRunner().invoke(main, ["report", str(out / "report.json"), "--markdown"])
    assert again.exit_code == 0 and markdown.exit_code == 0, again.output + markdown.output
    return live.stdout, again.stdout, markdown.stdout.removesuffix("\n")  # echo's newline


def _body(text: str) -> list[str]:
    """The lines after the title (the live run names its command, the re-render its file)."""
    return text.strip("\n").splitlines()[1:]


@pytest.mark.slow
def test_report_of_a_real_noise_scale_run_shows_the_noise_scale(tmp_path: Path) -> None:
    model = str(EXAMPLES / "noise_scale.py")
    args = [model, "--memory", "200MiB", "--max-batch", "1024", "--noise-scale", "--no-profile"]
    live, again, markdown = _live_and_again(args, tmp_path / "r")
    assert again.startswith(f"maxbatch: {model}\n") and _body(again) == _body(live)
    lines = [line for line in again.splitlines() if line.startswith(("noise scale", "critical"))]
    assert len(lines) >= 2 and "B_simple ≈ " in lines[0], again
    assert lines[1].startswith("critical batch ≈ ")
    saved = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    for line in lines:
        assert line in markdown and line in saved


@pytest.mark.slow
def test_report_of_a_real_buckets_run_renders_the_bucket_table(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model = str(EXAMPLES / "sequences.py")
    args = [model, "--buckets", "64,128,510", "--memory", "24MiB"]
    live, again, markdown = _live_and_again(args, tmp_path / "r")
    assert again.startswith(f"maxbatch: {model}\n") and _body(again) == _body(live)
    assert "lhotse/NeMo: bucket_duration_bins=[64, 128, 510]" in again
    saved = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert saved == markdown + "\n![ceiling against length](buckets.png)\n"


@pytest.mark.slow
def test_report_of_a_real_find_length_run_renders_the_longest_length(tmp_path: Path) -> None:
    model = str(EXAMPLES / "sequences.py")
    args = [model, "--find", "length", "--batch-size", "4", "--length-multiple-of", "64"]
    live, again, markdown = _live_and_again([*args, "--memory", "24MiB"], tmp_path / "r")
    assert _body(again) == _body(live) and again.startswith("maxbatch: ")
    assert "longest length at batch size 4: " in again
    assert (tmp_path / "r" / "report.md").read_text(encoding="utf-8") == markdown
