"""The house rules: imports point down between wings, no circles, small modules, one map."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "maxbatch"

# Wings from the bottom up: a module may import from its own wing and the wings below it only.
# "" is the bottom (maxbatch/*.py); "face" is maxbatch/__init__.py, the public face.
LAYERS = [
    "",
    "devices",
    "step",
    "search",
    "profile",
    "estimate",
    "stats",
    "train",
    "store",
    "run",
    "face",
    "cli",
    "integrations",
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()

# Debts the refactor of issue 19 is paying off: each is expected to fail (strict), so that fixing
# one fails the test until its name leaves the list. The lists only ever shrink.
TOO_BIG: set[str] = set()
POSITIONAL: set[str] = set()


def _debt(modules: set[str], listed: set[str]) -> list[object]:
    assert listed <= modules, f"listed but gone: {sorted(listed - modules)}"
    return [
        pytest.param(m, marks=pytest.mark.xfail(strict=True, reason="a listed debt"))
        if m in listed
        else m
        for m in sorted(modules)
    ]


def _wing(module: str) -> str:
    if module == "maxbatch":
        return "face"
    if module == "maxbatch.__main__":
        return "cli"
    parts = module.split(".")
    if (PKG / parts[1]).is_dir():
        return parts[1]
    return ""


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The maxbatch modules ``path`` imports (``from maxbatch import x``: the module x, if one)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not node.module.startswith("maxbatch"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("maxbatch"))
    return {m for m in found if m in MODULES}


def test_every_module_is_in_a_known_wing():
    assert {_wing(m) for m in MODULES} <= set(LAYERS)


def test_imports_point_down_between_wings():
    upward = []
    for module, path in MODULES.items():
        here = LAYERS.index(_wing(module))
        for target in _imports(path, top_level_only=False):
            if LAYERS.index(_wing(target)) > here:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_circle_between_modules():
    graph = {m: _imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
    # A package's __init__ importing its own modules is no circle: count module -> package arrows
    # only where the package is not the module's own parent.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                circles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module)
    assert circles == []


@pytest.mark.parametrize("module", _debt(set(MODULES), TOO_BIG))
def test_modules_and_functions_stay_small(module):
    path = MODULES[module]
    text = path.read_text()
    assert len(text.splitlines()) <= 300, f"{module} has {len(text.splitlines())} lines"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            # The body after the docstring.
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                body_start = node.body[1].lineno if len(node.body) > 1 else node.end_lineno
            else:
                body_start = first.lineno
            if node.end_lineno - body_start + 1 > 60:
                long.append(f"{node.name}: {node.end_lineno - body_start + 1} lines")
    assert long == []


@pytest.mark.parametrize("module", _debt(set(MODULES), POSITIONAL))
def test_records_are_keyword_only(module):
    if module.endswith("__main__") or module.endswith("isotrial"):
        pytest.skip("running it is what importing it does")
    mod = importlib.import_module(module)
    wide = []
    for name, obj in vars(mod).items():
        if (
            isinstance(obj, type)
            and dataclasses.is_dataclass(obj)
            and obj.__module__ == module
            and any(f.init and not f.kw_only for f in dataclasses.fields(obj))
        ):
            wide.append(name)
    assert wide == []


def _map() -> dict[str, set[str]]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## The module map", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        wing = cells[0].strip("`").rstrip("/")
        wing = "" if wing == "maxbatch" else wing
        rows[wing] = set(re.findall(r"`([a-z_0-9]+)\.py`", cells[1]))
        if "maxbatch/__main__.py" in cells[1]:
            rows[""].add("__main__")
    return rows


def test_the_map_names_every_module_and_only_modules_that_exist():
    named = {
        ("maxbatch." + f"{wing}." * bool(wing) + name).replace(".__init__", "")
        for wing, names in _map().items()
        for name in names
    }
    wings = {m for m in MODULES if m.count(".") == 1 and (PKG / m.split(".")[1]).is_dir()}
    named -= wings  # a wing's __init__.py
    actual = set(MODULES) - {"maxbatch"} - wings
    assert sorted(actual - named) == [], "modules the map does not name"
    assert sorted(named - actual) == [], "modules the map names that do not exist"
