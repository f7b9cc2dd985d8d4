"""The installed package ships only the method: the seed notebook's flawed methods live in tests/."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import subspace_sweep

LEGACY = ("legacy", "legacy_candidates")
PACKAGE_DIR = Path(subspace_sweep.__file__).resolve().parent


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_modules_are_not_in_the_package(name):
    assert importlib.util.find_spec(f"subspace_sweep.{name}") is None
    assert not (PACKAGE_DIR / f"{name}.py").exists()


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_modules_are_importable_from_tests(name):
    assert importlib.util.find_spec(f"tests.{name}") is not None


def _imported_modules(tree: ast.AST) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = "." * node.level + (node.module or "")
            out.add(mod)
            out.update(f"{mod}.{a.name}" if node.module else f"{mod}{a.name}" for a in node.names)
    return out


def test_no_package_module_imports_a_legacy_module():
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert files, PACKAGE_DIR
    offenders = []
    for f in files:
        for mod in _imported_modules(ast.parse(f.read_text(), filename=str(f))):
            if any(part in LEGACY for part in mod.split(".")):
                offenders.append(f"{f.relative_to(PACKAGE_DIR)}: {mod}")
    assert offenders == []


def _package_imports(name: str) -> set[str]:
    """The package modules ``name`` imports (relative imports resolved to bare module names)."""
    tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module] if node.module else [a.name for a in node.names])
    return out


def test_the_run_configuration_sits_below_the_a_side_and_the_sweep():
    """a_side.py and sweep.py read SweepConfig from config.py; neither imports the other's
    module above it, and config.py imports neither (the layers read top-down)."""
    from subspace_sweep import config, sweep

    assert "sweep" not in _package_imports("a_side")
    assert {"a_side", "sweep"}.isdisjoint(_package_imports("config"))
    assert "config" in _package_imports("a_side") and "config" in _package_imports("sweep")
    assert sweep.SweepConfig is config.SweepConfig  # the old import path keeps working
