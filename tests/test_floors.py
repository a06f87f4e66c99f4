"""The house's floor rule: imports point down (shards 1 <- synth 2 <- distill 3 <- pipelines 4). Every module of
every package is parsed (not imported), so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"shards": 1, "synth": 2, "distill": 3, "pipelines": 4}


def imported_packages(path: Path, root: Path) -> set[tuple[str, int]]:
    """(d4ir package, line) of every import in `path`, a module under `root`: absolute `d4ir.X...` names and
    relative imports resolved against the module's own package path."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(root).with_suffix("").parts  # ("distill", "registry")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from ..x import y: climb from the module's package
                base = list(parts[:-1])[: len(parts) - node.level]
                names = [".".join(["d4ir", *base, *(node.module.split(".") if node.module else [])])]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            bits = name.split(".")
            if bits[0] == "d4ir" and len(bits) > 1 and bits[1] in FLOORS:
                found.add((bits[1], node.lineno))
            elif bits[0] in FLOORS:  # a bare `import synth` would find another package once installed
                found.add((f"bare {bits[0]}", node.lineno))
    return found


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for package, floor in FLOORS.items():
        for path in sorted((root / package).rglob("*.py")):
            for target, line in imported_packages(path, root):
                if target.startswith("bare "):
                    bad.append(f"{path.relative_to(root)}:{line} imports {target[5:]} without the d4ir prefix")
                elif FLOORS[target] > floor:
                    bad.append(f"{path.relative_to(root)}:{line} ({package}, floor {floor}) imports {target} "
                               f"(floor {FLOORS[target]})")
    return bad


def test_no_import_points_up_a_floor():
    assert upward_imports() == []


@pytest.mark.parametrize("line, caught", [
    ("from d4ir.distill.registry import build", True),  # shards -> distill: up two floors
    ("from ...pipelines import cli", True),  # relative, resolved against shards/sub/mod.py
    ("import synth.ccd", True),  # a bare name: another package once installed
    ("from d4ir.shards.io import read_json", False),
])
def test_the_floor_check_catches_an_upward_import(tmp_path, line, caught):
    """The check itself: a module planted on floor 1 that imports upward is reported; one that does not is not."""
    for package in FLOORS:
        (tmp_path / package).mkdir()
    (tmp_path / "shards" / "sub").mkdir()
    (tmp_path / "shards" / "sub" / "mod.py").write_text(line + "\n")
    assert bool(upward_imports(tmp_path)) is caught
