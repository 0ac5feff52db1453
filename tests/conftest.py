import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# Property tests (issue 21): no example database in the checkout (a failure once found would fail
# every later run there, and a landing would hinge on a file nobody commits). Locally each run draws
# fresh examples; with CI set the draws are derandomized (a fixed sequence), so CI is red only for a
# change, never for a seed. HYPOTHESIS_PROFILE picks either by name.
settings.register_profile("dev", database=None, deadline=None, print_blob=True)
settings.register_profile("ci", database=None, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# One intra-op thread: the tests' models are tiny, and on a 2-core CI machine OpenMP threads that
# spin against each other (or against a second process) make steps 10-50x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def own_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own empty result cache (the CLI caches by default): none is shared."""
    path = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path / "maxbatch"


@pytest.fixture
def children_import_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Child processes (``--isolate``'s) import this checkout's maxbatch, on one thread."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
