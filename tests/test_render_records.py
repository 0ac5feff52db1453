"""The renderers take records: a result built in code and the same result read back from its
JSON (``from_dict``; ``load_report`` after the schema check) render the same text, Markdown, plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maxbatch.answers import AccumulationPlan, Advice, DataScan, LearningRates, NoiseScale
from maxbatch.buckets import Bucket, BucketProfile, LengthMemoryModel, LengthResult, LengthTrial
from maxbatch.results import (
    BatchSizeResult,
    CapacityAnswer,
    MemoryModel,
    MemoryPoint,
    ProfileAnswer,
    SearchAnswer,
    Skipped,
    Throughput,
    Trial,
)
from maxbatch.store.bucketreport import bucket_markdown, bucket_table, length_table
from maxbatch.store.report import closing_line, result_json, result_markdown, result_table
from maxbatch.store.reportcheck import load_report

MIB = 1024**2


def _result(*, noise: bool = True, precision: str | None = "bf16") -> BatchSizeResult:
    """A result with every part the renderers read: trials, peaks, timings, advice, data, notes."""
    trials = (
        Trial(batch_size=2, fits=True, peak_bytes=3 * MIB, seconds=0.25, state_bytes=MIB),
        Trial(batch_size=64, fits=True, peak_bytes=40 * MIB, seconds=0.5),
        Trial(batch_size=65, fits=False, peak_bytes=51 * MIB, seconds=0.125, oom=True),
    )
    points = tuple(
        Throughput(
            batch_size=b,
            samples_per_second=b / s,
            median_seconds=s,
            iqr_seconds=s / 10 * (3 if b == 32 else 1),
            replicates=5,
            noisy=b == 32,
        )
        for b, s in ((64, 0.02), (16, 0.01), (32, 0.012))
    )
    plan = AccumulationPlan(
        global_batch=128,
        micro_batch=64,
        accumulation_steps=2,
        effective_batch=128,
        exact=True,
        note="2 accumulation steps of 64 samples make exactly 128",
    )
    rates = LearningRates(base_lr=0.1, base_batch=32, batch=128, linear=0.4, square_root=0.2)
    advice = Advice(
        batch_size=64,
        ceiling=64,
        effective_batch=128,
        iterations_per_epoch=8,
        accumulation=plan,
        learning_rates=rates,
        notes=(plan.note, "an epoch of 1000 samples is 8 optimizer steps of 128"),
    )
    scan = DataScan(
        items=1000,
        scanned=1000,
        sampled=False,
        seconds=0.03,
        size_of="elements",
        bucket=None,
        batch_size=64,
        indices=(5, 7),
        sizes=(90, 88),
    )
    scale = NoiseScale(
        b_simple=177.1,
        std_error=6.6,
        trace_cov=25.65,
        grad_sq_norm=0.1448,
        b_small=32,
        b_big=256,
        draws=20,
        notes=("measured at the current weights",),
    )
    return BatchSizeResult(
        batch_size=64,
        pick_reason="the fastest of 3 sizes",
        device="cpu",
        device_name="a test CPU",
        mode="train",
        precision=precision,
        optimizer="AdamW" if precision else None,
        capacity=CapacityAnswer(
            capacity_bytes=50 * MIB, headroom_bytes=MIB, usable_bytes=49 * MIB, virtual=True
        ),
        search=SearchAnswer(
            ceiling=64,
            trials=trials,
            memory_model=MemoryModel(fixed_bytes=2.5 * MIB, bytes_per_sample=0.6 * MIB)
            if precision
            else None,
            complete=True,
            stop_reason="64 fits and 65 does not",
            memory=(MemoryPoint(batch_size=32, peak_bytes=21 * MIB),),
        ),
        profile=ProfileAnswer(
            throughput=points,
            stop_reason="no untimed size was left beside the best",
            skipped=(
                Skipped(batch_size=1, reason="below 16"),
                Skipped(batch_size=8, reason="below 16"),
                Skipped(batch_size=48, reason="between 32 and 64"),
            ),
            confidence="medium",
            confidence_reason="one timed size is noisy",
            seconds=1.5,
            budget_seconds=4.5,
        ),
        advice=advice,
        noise_scale=scale if noise else None,
        data=scan,
        seconds=3.25,
        notes=("a note", scan.note),
        world_size=1,
    )


def _renders(result: BatchSizeResult) -> list[str]:
    return [
        result_table(result, title="maxbatch probe model.py"),
        result_markdown(result, title="maxbatch: model.py", images=True),
        closing_line(result),
    ]


@pytest.mark.parametrize("noise", [True, False])
def test_a_result_and_its_json_render_the_same(noise: bool) -> None:
    result = _result(noise=noise)
    again = BatchSizeResult.from_dict(json.loads(result_json(result, model_file="model.py")))
    assert _renders(again) == _renders(result)
    text = _renders(result)[0]
    assert "global batch: 128 = 64 per rank x 1 rank(s) x 2 accumulation step(s)" in text
    assert "not timed: 1, 8: below 16" in text and "advice: an epoch of 1000" in text
    assert ("noise scale: B_simple ≈ 177.1 ± 6.6" in text) is noise


@pytest.mark.parametrize("precision", ["bf16", None])
def test_a_saved_report_reads_back_and_renders_the_same(tmp_path: Path, precision: str) -> None:
    # The schema check reads back what the renderers need, the noise scale included.
    result = _result(noise=True, precision=precision)
    path = tmp_path / "report.json"
    path.write_text(result_json(result, model_file="model.py") + "\n", encoding="utf-8")
    saved = load_report(str(path))
    assert saved.model_file == "model.py"
    assert saved.result.precision == precision and saved.result.trials == result.trials
    assert _renders(saved.result) == _renders(result)


def test_the_plots_of_a_result_and_of_its_saved_report_are_the_same(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from maxbatch.store.plots import write_plots

    result = _result(noise=False)
    path = tmp_path / "report.json"
    path.write_text(result_json(result, model_file="model.py"), encoding="utf-8")
    fresh = write_plots(result, tmp_path / "fresh")
    saved = write_plots(load_report(str(path)).result, tmp_path / "saved")
    assert [p.name for p in fresh] == ["memory.png", "throughput.png"]
    assert [p.read_bytes() for p in fresh] == [p.read_bytes() for p in saved]


def test_a_bucket_profile_and_its_json_render_the_same() -> None:
    model = LengthMemoryModel(fixed_bytes=2.5 * MIB, bytes_per_sample=0.0, bytes_per_token=10728.0)
    profile = BucketProfile(
        buckets=(
            Bucket(max_length=74, ceiling=81, min_length=32, items=897, share=0.45),
            Bucket(max_length=510, ceiling=11, min_length=76, items=172, share=0.086),
        ),
        memory_model=model,
        trials=(LengthTrial(batch_size=2, length=510, fits=True, peak_bytes=MIB, seconds=0.1),),
        seconds=4.1,
        device="cpu",
        usable_bytes=64 * MIB,
        histogram=((32, 74, 897), (76, 510, 172)),
        notes=("a note",),
    )
    again = BucketProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    for render in (bucket_table, bucket_markdown):
        assert render(again, title="t") == render(profile, title="t")
    text = bucket_table(profile)
    assert "bucket_duration_bins=[74, 510] bucket_batch_size=[81, 11]" in text
    assert "1 real trials in 4.1 s (budget 2 x buckets + 2 = 6)" in text
    longest = LengthResult(max_length=512, batch_size=8, length_multiple_of=8, memory_model=model)
    assert length_table(longest).startswith("longest length at batch size 8: 512 (multiples of 8)")


def test_a_report_without_the_keys_it_may_leave_out_still_renders(tmp_path: Path) -> None:
    # Older or hand-written reports: null or missing optional keys come back as the record's
    # None (``complete``, never rendered, as True): it renders as the result with them null.
    result = _result(noise=False)
    data = json.loads(result_json(result))
    for key in ("complete", "precision", "optimizer", "memory_model", "world_size"):
        del data[key]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    saved = load_report(str(path))
    assert saved.model_file is None and saved.result.search.complete
    back = saved.result
    assert back.precision is None and back.optimizer is None and back.memory_model is None
    nulled = dict.fromkeys(("precision", "optimizer", "memory_model"))
    assert _renders(back) == _renders(BatchSizeResult.from_dict({**result.to_dict(), **nulled}))
