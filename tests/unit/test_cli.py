"""The command line's successful paths (bad input is in test_cli_errors.py)."""

from __future__ import annotations

import dataclasses

import pytest

from subspace_sweep import cli, demo
from subspace_sweep.candidates import A_SIDE_NAMES, get_spec


@pytest.mark.parametrize("name", ["write_not_downstream_read", "oracle_combined", "chars_clusters"])
def test_explain_prints_the_definition(capsys, name):
    assert cli.main(["explain", name]) == 0
    out = capsys.readouterr().out
    spec = get_spec(name)
    assert spec.definition in out and spec.family in out and spec.axis_kind in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "run" in capsys.readouterr().out


def test_demo_exits_nonzero_when_the_plant_is_not_recovered(monkeypatch, demo_run, capsys):
    outcome, _ = demo_run
    missed = dataclasses.replace(outcome, rank_on_w=3)
    monkeypatch.setattr(demo, "run_demo", lambda config, plant: missed)
    assert cli.main(["demo", "--out", "unused", "--quiet"]) == cli.EXIT_DEMO_NOT_RECOVERED
    assert "NOT RECOVERED" in capsys.readouterr().out


def test_demo_outcome_reports_recovery(demo_run, capsys):
    outcome, _ = demo_run
    assert outcome.recovered and "RECOVERED" in outcome.verdict()
    assert len(A_SIDE_NAMES) == 43  # 42 SPEC candidates + randn_orthogonal


def test_library_deprecation_notices_are_hidden_unless_verbose(lora_pair, tmp_path):
    """Issue 26: peft/transformers' deprecation notices (e.g. is_gradient_checkpointing) are not
    reprinted as the tool's own warning lines; --verbose shows them; the tool's own warnings stay."""
    import os
    import subprocess
    import sys

    model_dir, pos, neg = lora_pair
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def delta(out, *extra):
        return subprocess.run([sys.executable, "-m", "subspace_sweep.cli", "delta", "--model", str(model_dir),
                               "--adapter-pos", str(pos), "--adapter-neg", str(neg), "--out", str(out), *extra],
                              env=env, capture_output=True, text=True)

    quiet, verbose = delta(tmp_path / "a.safetensors"), delta(tmp_path / "b.safetensors", "--verbose")
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    noise = [ln for ln in verbose.stderr.splitlines() if "warning:" in ln and "deprecated" in ln]
    assert noise, verbose.stderr  # the notice exists (the test has teeth)
    assert not [ln for ln in quiet.stderr.splitlines() if "deprecated" in ln], quiet.stderr


def test_is_library_deprecation():
    from subspace_sweep.cli import is_library_deprecation
    from subspace_sweep import cli

    assert is_library_deprecation(FutureWarning, "/x/site-packages/transformers/modeling_utils.py")
    assert is_library_deprecation(DeprecationWarning, "/x/site-packages/peft/tuners/lora.py")
    assert not is_library_deprecation(UserWarning, "/x/site-packages/transformers/modeling_utils.py")
    assert not is_library_deprecation(FutureWarning, cli.__file__)  # a deprecation of ours would be shown
