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


def test_the_gradient_bases_sit_below_the_sweep_and_beside_the_a_side():
    """Issue 34: sweep.py builds the gradient bases (gradients.py), which build their targets with the
    delta's own target functions (delta.weight_targets) and never import the sweep or the A-side; the
    A-side imports neither them nor the delta's module. Both keep their entries in the one on-disk
    cache (cache.py: the lookup, the keys' common part, the verified metadata), which imports neither."""
    from subspace_sweep import delta, gradients, sweep

    assert "gradients" in _package_imports("sweep")
    assert {"sweep", "a_side", "report"}.isdisjoint(_package_imports("gradients"))
    assert {"gradients", "delta"}.isdisjoint(_package_imports("a_side") | _package_imports("candidates")
                                             | _package_imports("scoring"))
    assert gradients.weight_targets is delta.weight_targets is sweep.weight_targets
    assert "cache" in _package_imports("a_side") & _package_imports("gradients")
    assert {"a_side", "gradients", "sweep", "delta", "report"}.isdisjoint(_package_imports("cache"))


def test_provenance_helpers_sit_below_everything_that_records_provenance():
    """Issue 26: the A-side (the hypotheses) reads neither the run's report nor the delta's module,
    not even for a digest or the package versions; those live in provenance.py, which imports no
    package module, and report / delta-side / A-side code reads them there."""
    a_side = _package_imports("a_side") | _package_imports("cache")  # (its cache's key and entries)
    assert {"report", "delta", "sweep"}.isdisjoint(a_side), a_side
    assert "provenance" in _package_imports("cache")
    assert _package_imports("provenance") == set()
    for name in ("report", "sweep", "compare", "gguf_models"):
        assert "provenance" in _package_imports(name), name
    import subspace_sweep.delta as delta
    import subspace_sweep.report as report

    assert not hasattr(delta, "sha256_file")  # one home for each helper
    assert report.package_versions.__module__ == "subspace_sweep.provenance"


def _calls_before(func_source: str, stop: str) -> list[str]:
    """The names called in ``func_source`` (in source order) before the first call of ``stop``."""
    tree = ast.parse(func_source)
    calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    out = []
    for c in calls:
        name = c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
        if name == stop:
            return out
        out.append(name)
    raise AssertionError(f"{stop} is never called")


def test_every_pre_load_check_of_a_command_lives_in_one_preflight_function():
    """Issue 26: run, delta and train call exactly one preflight sequence before the first
    weights load (the sequence's own order is in preflight.py); the tests of test_faults_exits.py
    hold that each bad input of that sequence fails before any load."""
    import inspect

    from subspace_sweep import cli, preflight, sweep, train_command

    run = [c for c in _calls_before(inspect.getsource(sweep.run_sweeps), "load_model") if c != "perf_counter"]
    assert run == ["check_run"], run
    from subspace_sweep import delta as delta_module, study

    delta = _calls_before(inspect.getsource(cli.cmd_delta), "write_pair_delta")
    assert delta == ["check_delta_command"], delta
    # a study's delta step is the same sequence (one writer of a pair's delta: w, midpoint, adapter record)
    step = [c for c in _calls_before(inspect.getsource(study._delta_step), "write_pair_delta") if c != "str"]
    assert step == ["check_delta_command"], step
    assert _calls_before(inspect.getsource(delta_module.write_pair_delta), "save_delta")[0] == "pair_from_peft"
    train = _calls_before(inspect.getsource(train_command.train_pair_folder), "write_folder")
    assert train[0] == "check_train" and "model_shape" not in train and "check_destination" not in train, train
    assert "preflight" in _package_imports("sweep")
    for name in ("check_run", "check_delta_command", "check_train"):
        assert callable(getattr(preflight, name))


def test_the_trainer_sits_below_its_checks_and_the_train_command_above_them():
    """Issue 35: lora_train.py imported check_train from preflight.py, which imports the families,
    the argument checks and the default layers from lora_train.py: a circle. The checks sit above
    what they check; the command that trains (train_command.py) calls them, then the trainer."""
    assert "preflight" not in _package_imports("lora_train")
    assert "train_command" not in _package_imports("lora_train") | _package_imports("preflight")
    assert "lora_train" in _package_imports("preflight")
    assert {"preflight", "lora_train"} <= _package_imports("train_command")
    assert "train_command" in _package_imports("cli")


def test_the_package_has_no_import_circle():
    """No module reaches itself through the package's own imports (at module level or inside a
    function: a lazy import is still a dependency)."""
    modules = sorted(f.stem for f in PACKAGE_DIR.glob("*.py"))
    graph = {m: {i.split(".")[0] for i in _package_imports(m)} & set(modules) for m in modules}
    circles = []
    for start in modules:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    circles.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert circles == [], circles
