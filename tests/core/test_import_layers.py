"""Imports run one way: cli → experiment → eval/calib/heads/suites → merging/quant/models/data.

Every ``import epmq.X`` / ``from epmq.X import`` in the source, at module level or inside a
function, is checked: no package imports one of a higher layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import epmq

LAYERS: dict[str, int] = {
    "cli": 4,
    "__main__": 4,
    "experiment": 3,
    "eval": 2,
    "calib": 2,
    "heads": 2,
    "suites": 2,
    "merging": 1,
    "quant": 1,
    "models": 1,
    "data": 1,
    "export": 1,
    "atomic": 0,
    "devices": 0,
    "params": 0,
    "errors": 0,
    "identity": 0,
}

ROOT = Path(epmq.__file__).parent


def imported_packages(file: Path) -> set[str]:
    """The top-level ``epmq`` packages ``file`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("epmq.")}
    return found


def test_every_package_has_a_layer() -> None:
    packages = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert packages - {"__init__"} <= set(LAYERS)


def test_no_import_runs_back_up() -> None:
    upward = []
    for file in sorted(ROOT.rglob("*.py")):
        package = file.relative_to(ROOT).parts[0].removesuffix(".py")
        if package == "__init__":
            continue
        for target in imported_packages(file):
            if LAYERS[target] > LAYERS[package]:
                upward.append(f"{file.relative_to(ROOT)} imports epmq.{target}")
    assert upward == []


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    file = tmp_path / "m.py"
    file.write_text("def f():\n    from epmq.experiment.config import TaskSpec\n")
    assert imported_packages(file) == {"experiment"}
