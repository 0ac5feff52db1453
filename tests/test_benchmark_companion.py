"""The companion overhead benchmark runs every variant on a bundled example and renders it."""

from scripts import benchmark_script


def test_every_variant_is_measured_and_rendered() -> None:
    with benchmark_script("companion_overhead") as bench:
        times = bench.measure("mlp", rounds=2, steps=1)
        assert set(times) == set(bench.VARIANTS)
        assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in times.values())
        lines = bench.render("mlp", times)
    assert len(lines) == len(times)
    assert lines[0].split()[:2] == ["mlp", "plain"]
    assert "ms" in lines[1]
