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
