"""Golden snapshots of the offline demo sweep (tiny Qwen3, delta planted in mlp_write).

Numbers: pytest-regressions ``num_regression`` with per-column tolerances (BLAS differences
between machines move the last digits; a methodology change moves far more).
Rankings: syrupy snapshots of the exact orderings.

Regenerate ONLY for a deliberate methodology change, and say so in the commit message:
    .venv/bin/pytest tests/golden --force-regen --snapshot-update
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import polars as pl

NUMERIC = ["R_act", "z_act", "R_w_o_proj", "z_w_o_proj", "R_w_down_proj", "z_w_down_proj", "R_w_combined",
           "z_w_combined", "pct_oracle_act", "pct_oracle_combined", "joint", "rank", "joint_gain", "gain_act",
           "gain_w_combined", "gain_w_o_proj", "gain_w_down_proj", "z_slice_w_combined",
           # the standardized view (SPEC §5, concern 14; added 2026-12-06)
           "joint_gain_std", "gain_act_std", "gain_w_combined_std", "z_act_std", "z_w_combined_std"]
TOLERANCES = {
    **{c: {"rtol": 1e-4, "atol": 1e-6} for c in NUMERIC},
    # z divides by a small null SD: relative error is amplified
    **{c: {"rtol": 1e-3, "atol": 1e-4} for c in NUMERIC if c.startswith("z_")},
    # gains near 0 (random-like bases) have no relative scale
    **{c: {"rtol": 1e-4, "atol": 1e-5} for c in NUMERIC if "gain" in c},
}


def _summary(demo_run) -> pl.DataFrame:
    _, out = demo_run
    return pl.read_csv(out / "summary_pct.tsv", separator="\t").join(
        pl.read_csv(out / "summary.tsv", separator="\t").select("candidate", "z_act", "R_w_o_proj", "z_w_o_proj",
                                                                 "R_w_down_proj", "z_w_down_proj", "z_w_combined",
                                                                 "gain_w_o_proj", "gain_w_down_proj",
                                                                 "z_slice_w_combined", "joint_gain_std", "gain_act_std",
                                                                 "gain_w_combined_std", "z_act_std", "z_w_combined_std"),
        on="candidate",
    ).sort("candidate")


def test_summary_numbers(demo_run, num_regression):
    s = _summary(demo_run)
    data = {c: np.nan_to_num(s[c].cast(pl.Float64).to_numpy(), nan=-999.0) for c in NUMERIC}
    data["candidate_index"] = np.arange(s.height, dtype=float)
    num_regression.check(data, tolerances=TOLERANCES)


def test_candidate_order_of_the_numbers_table(demo_run, snapshot):
    # pins which row of the numeric golden belongs to which candidate
    assert _summary(demo_run)["candidate"].to_list() == snapshot


def test_rankings(demo_run, snapshot):
    outcome, _ = demo_run
    panels = {p: outcome.result.ranking(p)["candidate"].to_list() for p in ("joint", "read")}
    panels["references"] = outcome.result.references()["candidate"].to_list()
    panels["joint_standardized"] = outcome.result.ranking("joint", "standardized")["candidate"].to_list()
    assert panels == snapshot


def test_two_processes_write_byte_identical_summary(demo_run, tmp_path):
    """Review concern 7 end to end: `subspace-sweep demo` in a separate process, under another hash
    seed than this one's, writes the same bytes as the shared in-process demo run."""
    _, here = demo_run
    ours = os.environ.get("PYTHONHASHSEED")  # unset: this process's seed is random, 1 is another one
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONHASHSEED="2" if ours == "1" else "1")
    subprocess.run([sys.executable, "-m", "subspace_sweep.cli", "demo", "--out", str(out), "--quiet"],
                   env=env, check=True, capture_output=True)
    for name in ("summary.tsv", "summary_pct.tsv", "per_layer.csv", "specific_summary.tsv"):
        assert (here / name).read_bytes() == (out / name).read_bytes(), name
