"""Properties that hold for every input hypothesis can think of (issue 11's property suite)."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxbatch.errors import ConfigError, DoesNotFitError
from maxbatch.grid import Grid
from maxbatch.results import (
    BatchSizeResult,
    CapacityAnswer,
    MemoryModel,
    ProfileAnswer,
    SearchAnswer,
    Throughput,
    Trial,
)
from maxbatch.search.probe import search
from maxbatch.settings import SearchSettings
from maxbatch.step.batching import batch_size_of, resize_batch
from maxbatch.store.report import result_markdown, result_table
from maxbatch.store.reportfiles import load_report
from maxbatch.units import _UNITS, format_bytes, parse_bytes

# -- byte sizes ------------------------------------------------------------------------------------


@given(
    number=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from(sorted(_UNITS)),
    upper=st.booleans(),
    space=st.sampled_from(["", " ", "  "]),
)
def test_a_size_with_any_unit_parses_exactly(
    number: int, unit: str, upper: bool, space: str
) -> None:
    text = f" {number}{space}{unit.upper() if upper else unit} "
    assert parse_bytes(text) == number * _UNITS[unit]


@given(st.integers(min_value=0, max_value=2**60))
def test_formatted_sizes_parse_back_within_their_rounding(n: int) -> None:
    back = parse_bytes(format_bytes(n))
    assert abs(back - n) <= max(1, 0.005 * n)  # two decimals of the unit shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.08 KiB", 1106),  # 1105.92 B: hypothesis found it truncated to 1105 (issue 21)
        ("1.5 B", 2),  # a half rounds up
        ("0.4", 0),
        ("0.1 KB", 100),  # decimal arithmetic: no 99.99999 from binary floats
        ("1.1 TB", 1_100_000_000_000),
        ("0.001 KiB", 1),
    ],
)
def test_a_fraction_of_a_byte_rounds_to_the_nearest_byte(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("n", [1070, 1111, 1152, 1024, 1535, 3 * 1024**2 - 1])
def test_the_sizes_hypothesis_drew_against_truncation_parse_back(n: int) -> None:
    assert abs(parse_bytes(format_bytes(n)) - n) <= max(1, 0.005 * n)


def test_property_tests_keep_no_example_database_and_ci_draws_are_fixed() -> None:
    from hypothesis import settings as current

    assert current.default.database is None  # nothing under .hypothesis/ can fail later runs
    assert current.default.deadline is None  # no wall-clock assert on a loaded machine
    assert current.get_profile("ci").derandomize


@given(st.text(max_size=12))
def test_anything_else_is_a_config_error_or_a_size(text: str) -> None:
    try:
        value = parse_bytes(text)
    except ConfigError as e:
        assert "is not a size" in str(e)
    else:
        assert isinstance(value, int) and value >= 0


@given(st.one_of(st.integers(max_value=-1), st.floats(max_value=-1e-9, allow_nan=False)))
def test_negative_numbers_are_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="negative"):
        parse_bytes(value)


# -- resizing random nested batches ---------------------------------------------------------------

Pair = namedtuple("Pair", ["left", "right"])


def _batches(n: int) -> st.SearchStrategy[Any]:
    """Nested structures whose tensors all have ``n`` rows, with unbatched leaves among them."""
    tensor = st.builds(
        lambda shape, dtype: torch.arange(n * math.prod(shape), dtype=dtype).reshape(n, *shape),
        st.lists(st.integers(1, 3), max_size=2),
        st.sampled_from([torch.float32, torch.int64, torch.bfloat16]),
    )
    leaf = st.one_of(
        tensor,
        tensor,
        st.integers(),
        st.text(max_size=3),
        st.none(),
        st.builds(lambda x: torch.tensor(x), st.floats(-1, 1)),  # 0-dim: carried along
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(st.text(max_size=3), inner, max_size=3),
            st.builds(Pair, inner, inner),
        ),
        max_leaves=8,
    )


def _check_resized(original: Any, resized: Any, n: int, b: int) -> None:
    assert type(resized) is type(original)
    if isinstance(original, torch.Tensor):
        if original.dim() == 0:
            assert resized is original
            return
        assert resized.shape == (b, *original.shape[1:]) and resized.dtype == original.dtype
        assert torch.equal(resized, original[torch.arange(b) % n])
        assert resized.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
    elif isinstance(original, dict):
        assert list(resized) == list(original)
        for key in original:
            _check_resized(original[key], resized[key], n, b)
    elif isinstance(original, (list, tuple)):
        assert len(resized) == len(original)
        for x, y in zip(original, resized, strict=True):
            _check_resized(x, y, n, b)
    else:
        assert resized == original


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data(), n=st.integers(1, 5), b=st.integers(1, 12))
def test_resizing_any_nested_batch(data: st.DataObject, n: int, b: int) -> None:
    sample = data.draw(_batches(n))
    has_rows = any(
        isinstance(t, torch.Tensor) and t.dim() > 0
        for t in torch.utils._pytree.tree_flatten(sample)[0]
    )
    if not has_rows:
        with pytest.raises(Exception, match="no tensor with a batch dimension"):
            resize_batch(sample, b)
        return
    resized = resize_batch(sample, b)
    _check_resized(sample, resized, n, b)
    assert batch_size_of(resized) == b


# -- report JSON round trips -----------------------------------------------------------------------

_sizes = st.integers(1, 10**6)
_bytes = st.integers(0, 2**50)
_text = st.text(max_size=20)


def _trial(b: int, fits: bool) -> st.SearchStrategy[Trial]:
    return st.builds(
        Trial,
        batch_size=st.just(b),
        fits=st.just(fits),
        peak_bytes=_bytes,
        seconds=st.floats(0, 1e4),
        oom=st.booleans(),
        reserved_bytes=st.none() | _bytes,
        alloc_retries=st.none() | st.integers(0, 99),
    )


@st.composite
def _results(draw: st.DrawFn) -> BatchSizeResult:
    ceiling = draw(_sizes)
    trials = (draw(_trial(ceiling, True)), draw(_trial(ceiling + 1, False)))
    points = draw(
        st.lists(
            st.builds(
                lambda b, s, iqr, noisy: Throughput(
                    batch_size=b,
                    samples_per_second=b / s,
                    median_seconds=s,
                    iqr_seconds=iqr,
                    replicates=5,
                    noisy=noisy,
                ),
                st.integers(1, ceiling),
                st.floats(1e-6, 10),
                st.floats(0, 1),
                st.booleans(),
            ),
            max_size=4,
        )
    )
    model = draw(st.none() | st.builds(MemoryModel, fixed_bytes=_bytes, bytes_per_sample=_bytes))
    return BatchSizeResult(
        batch_size=draw(st.integers(1, ceiling)),
        device=draw(st.sampled_from(["cpu", "cuda:0", "mps"])),
        device_name=draw(_text),
        mode=draw(st.sampled_from(["train", "inference"])),
        precision=draw(st.none() | st.sampled_from(["bf16", "fp16"])),
        optimizer=draw(st.none() | _text),
        capacity=CapacityAnswer(
            capacity_bytes=draw(_bytes),
            headroom_bytes=draw(_bytes),
            usable_bytes=draw(_bytes),
            virtual=draw(st.booleans()),
        ),
        search=SearchAnswer(
            ceiling=ceiling,
            trials=trials,
            memory_model=model,
            complete=draw(st.booleans()),
            stop_reason=draw(_text),
        ),
        profile=ProfileAnswer(throughput=tuple(points)),
        pick_reason=draw(_text),
        notes=tuple(draw(st.lists(_text, max_size=3))),
        seconds=draw(st.floats(0, 1e5)),
    )


def _clean(text: str) -> bool:
    return not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(result=_results())
def test_a_saved_report_renders_as_the_result_did(tmp_path: Path, result: BatchSizeResult) -> None:
    data = {**result.to_dict(), "model_file": "model.py"}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    saved = load_report(str(path))
    assert saved.model_file == "model.py"
    text, markdown = result_table(saved.result), result_markdown(saved.result)
    assert not any(c in text + markdown for c in "\x1b\x07\x9b")
    strings = [result.device_name, result.stop_reason, result.pick_reason, *result.notes]
    if all(_clean(s) for s in [*strings, result.optimizer or ""]):
        assert text == result_table(result) and markdown == result_markdown(result)


# -- the ceiling search on random monotone memory curves -----------------------------------------


@st.composite
def _curves(draw: st.DrawFn) -> tuple[list[int], int, int]:
    """Peaks of batch sizes 1..len, non-decreasing, and the usable bytes."""
    base = draw(st.integers(0, 10**6))
    steps = draw(st.lists(st.integers(0, 10**5), min_size=1, max_size=300))
    peaks, total = [], base + draw(st.integers(1, 10**5))
    for step in steps:
        total += step
        peaks.append(total)
    usable = draw(st.integers(peaks[0], peaks[-1] + 10**5))
    return peaks, usable, base


@settings(deadline=None, max_examples=300)
@given(curve=_curves(), start=st.integers(1, 64), m=st.sampled_from([1, 1, 2, 8]))
def test_the_search_is_exact_with_few_trials_on_any_monotone_curve(
    curve: tuple[list[int], int, int], start: int, m: int
) -> None:
    peaks, usable, base = curve
    top = len(peaks)  # sizes above the curve's end do not fit (the step "runs out" there)

    def peak(b: int) -> int:
        return peaks[b - 1] if b <= top else peaks[-1] + usable + 1

    def run(b: int) -> Trial:
        p = peak(b)
        return Trial(batch_size=b, fits=p <= usable, peak_bytes=p, seconds=0.0, oom=p > usable)

    fitting = [b for b in range(m, top + 1, m) if peak(b) <= usable]
    try:
        out = search(
            run,
            start=start,
            usable_bytes=usable,
            base_bytes=base,
            settings=SearchSettings(grid=Grid(multiple_of=m)),
        )
    except DoesNotFitError:
        assert not fitting
        return
    assert out.ceiling == max(fitting)
    tried = {t.batch_size: t.fits for t in out.trials}
    assert tried[out.ceiling] is True and tried[out.ceiling + m] is False
    # No scan: jumps (the memory model's, or doubling) up to a failing size, then bisection in
    # the bracket, so the trials grow with the logarithm of the largest size tried, which the
    # first jump bounds: every byte above ``base`` per-sample, at least one byte per sample.
    sizes = [t.batch_size for t in out.trials]
    assert max(sizes) <= 2 * (start + m) * (usable + 1), sizes
    assert len(sizes) <= 2 * math.log2(max(sizes) / m + 1) + 6, sizes
