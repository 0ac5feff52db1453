"""The integrations import their framework only when imported themselves, and say how to get it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_maxbatch_imports_no_framework() -> None:
    code = (
        "import sys, maxbatch, maxbatch.integrations; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') "
        "if m in sys.modules))"
    )
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "pip"),
    [
        ("lightning", ("lightning", "pytorch_lightning"), "maxbatch[lightning]"),
        ("transformers", ("transformers",), "maxbatch[transformers]"),
    ],
)
def test_a_missing_framework_names_the_extra(
    module: str, blocked: tuple[str, ...], pip: str
) -> None:
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in blocked)
    out = run(f"import sys; {block}; import maxbatch.integrations.{module}")
    assert out.returncode != 0
    assert "ImportError" in out.stderr and f"pip install '{pip}'" in out.stderr
