"""Line coverage of maxbatch's CUDA-only code by the contract tests, on a machine without a GPU.

CUDA-only lines, found from the source: the bodies of functions and classes named after CUDA or
NVML (``CudaPeak``, ``_nvml_other_processes``), the bodies of ``if`` / ``elif`` / conditional
expressions whose test mentions CUDA (``if dev.type == "cuda":``), and simple statements that
call through a CUDA name (``torch.cuda.empty_cache()``, ``peak = self.cuda.read()``). Some of
these also run on the CPU (a one-line conditional): line coverage cannot tell. The script runs
``tests/test_cuda_contract.py`` under ``coverage`` and prints, per module, how many of those lines
ran, and the ones that did not. Other test files may be named to run with them: the one line the
contract tests leave, a one-line conditional in ``noise.py``, runs in tests/test_noise.py.

    pip install coverage && python benchmarks/cuda_coverage.py [more test files]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "maxbatch"
sys.path.insert(0, str(ROOT))  # this checkout's maxbatch, also under an editable install elsewhere


_WORDS = ("cuda", "nvml")


def _mentions_cuda(node: ast.AST, *, strings: bool = True) -> bool:
    """Whether a name, attribute (or, with ``strings``, a string) in ``node`` says CUDA or NVML."""
    for sub in ast.walk(node):
        text = (
            sub.id
            if isinstance(sub, ast.Name)
            else sub.attr
            if isinstance(sub, ast.Attribute)
            else sub.value
            if strings and isinstance(sub, ast.Constant) and isinstance(sub.value, str)
            else ""
        )
        if any(word in text.lower() for word in _WORDS):
            return True
    return False


def _docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


_COMPOUND = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef, ast.ClassDef)


def cuda_lines(path: Path) -> set[int]:
    """The executable lines of ``path`` that only CUDA runs (see the module doc)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines: set[int] = set()

    def body_lines(body: list[ast.stmt]) -> None:
        for stmt in body:
            for sub in ast.walk(stmt):
                if isinstance(sub, ast.stmt) and not _docstring(sub):
                    lines.add(sub.lineno)

    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            if any(word in node.name.lower() for word in _WORDS):
                body_lines(node.body)
        elif isinstance(node, ast.If) and _mentions_cuda(node.test):
            # ``if device.type != "cuda":`` guards the other devices: its ``else`` is CUDA's.
            negated = any(isinstance(op, ast.NotEq) for op in ast.walk(node.test))
            body_lines(node.orelse if negated else node.body)
        elif isinstance(node, ast.IfExp) and _mentions_cuda(node.test):
            lines.add(node.body.lineno)
        elif isinstance(node, ast.stmt) and not isinstance(node, _COMPOUND):
            calls = [c.func for c in ast.walk(node) if isinstance(c, ast.Call)]
            if any(_mentions_cuda(func, strings=False) for func in calls):
                lines.add(node.lineno)
    return lines


def main() -> int:
    import coverage  # noqa: PLC0415 - an optional tool, only this script needs it
    import pytest

    cov = coverage.Coverage(data_file=None, include=[str(PACKAGE / "*")])  # no .coverage file
    cov.start()
    tests = [str(ROOT / "tests/test_cuda_contract.py"), *sys.argv[1:]]
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not slow", *tests])
    cov.stop()
    if code != 0:
        print("some tests failed: the coverage below is of what ran", file=sys.stderr)
    total = ran = 0
    print(f"{'module':<28} {'CUDA lines':>10} {'run':>5}  not run")
    for path in sorted(PACKAGE.rglob("*.py")):
        wanted = cuda_lines(path)
        if not wanted:
            continue
        _, statements, _, missing, _ = cov.analysis2(str(path))
        wanted &= set(statements)
        missed = sorted(wanted & set(missing))
        total += len(wanted)
        ran += len(wanted) - len(missed)
        name = str(path.relative_to(ROOT))
        print(f"{name:<28} {len(wanted):>10} {len(wanted) - len(missed):>5}  {missed or ''}")
    share = f"{100 * ran / total:.1f} %"
    print(f"CUDA-only lines run by the tests: {ran} of {total} ({share})")
    return int(code != 0)


if __name__ == "__main__":
    raise SystemExit(main())
