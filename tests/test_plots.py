"""The report plots: both PNGs are written and are valid images of a sensible size."""

from __future__ import annotations

from pathlib import Path

import pytest
from models import mlp

from maxbatch import find_batch_size

pytest.importorskip("matplotlib")


def test_write_plots_from_a_real_result(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from maxbatch.store.plots import write_plots

    model, sample = mlp()
    result = find_batch_size(model, sample, memory=200_000)
    written = write_plots(result, tmp_path / "out")
    assert sorted(p.name for p in written) == ["memory.png", "throughput.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        height, width = image.shape[:2]
        assert width > 400 and height > 250
        assert image.std() > 0.01  # not a blank canvas


def test_without_throughput_only_the_memory_plot(tmp_path: Path) -> None:
    from maxbatch.store.plots import write_plots

    model, sample = mlp()
    result = find_batch_size(model, sample, memory=200_000, profile=False)
    assert [p.name for p in write_plots(result, tmp_path)] == ["memory.png"]
