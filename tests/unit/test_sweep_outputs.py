"""The run folder of SPEC §7, produced by one offline demo sweep on the tiny model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import polars as pl
import pytest

from subspace_sweep import demo, publish, report
from subspace_sweep.report import GAIN_RESOLUTION
from subspace_sweep.candidates import ranking_pool
from subspace_sweep.demo import run_demo
from subspace_sweep.errors import InputError
from subspace_sweep.sweep import SweepConfig

EXPECTED_FILES = {
    "config.json", "manifest.json", "per_layer.csv", "summary.tsv", "summary_pct.tsv", "specific_per_layer.csv",
    "specific_summary.tsv", "definitions.md", "conclusion.md", "joint_act_weight_scatter.png",
    "joint_act_weight_scatter.pdf", "per_layer_heatmap.png", "per_layer_heatmap.pdf", "weight_oracles.safetensors",
    "scope.tsv", "spectra.tsv", "spectra.png", "spectra.pdf", "readout.tsv", "readout.png", "readout.pdf",  # SPEC §10
    "report.html",  # issue 33
}


def test_run_folder_has_every_output(demo_run):
    _, out = demo_run
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert [p.name for p in out.parent.iterdir()] == ["run"]  # the staging folder is gone


@pytest.mark.parametrize("name,min_w,min_h", [("joint_act_weight_scatter.png", 800, 400), ("per_layer_heatmap.png", 600, 400)])
def test_figures_are_valid_images_of_sensible_size(demo_run, name, min_w, min_h):
    import matplotlib.image as mpimg

    _, out = demo_run
    img = mpimg.imread(out / name)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h
    assert h <= 8000 and w <= 8000
    assert img.std() > 0.01  # not blank
    pdf = (out / name.replace(".png", ".pdf")).read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 2000


def test_definitions_list_every_candidate(demo_run):
    outcome, out = demo_run
    text = (out / "definitions.md").read_text()
    for c in outcome.result.candidates:
        assert f"| `{c.name}` |" in text
    assert len(outcome.result.candidates) >= 43 + 5  # 42 A-side + randn + TaskDiff_lora_fit + 4 oracles


def test_manifest_records_provenance(demo_run):
    outcome, out = demo_run
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["delta_sha256"]) == 64
    assert m["scored_layers"] == outcome.result.scored_layers == [1, 2]
    assert m["package_versions"]["torch"] and m["package_versions"]["transformers"]
    assert m["seed"] == 0 and m["null"] == "exact"
    assert set(m["timings_s"]) >= {"model_load", "captures", "candidates", "scoring", "report"}
    assert m["timings_s"]["report"] > 0  # measured inside the report, before the manifest is written last
    assert m["out"] == str(out.resolve()) and Path(m["delta"]).is_absolute() and Path(m["model"]).is_absolute()
    assert m["delta_weight_norm_ratio"] == pytest.approx(demo.PLANT_SCALE, rel=1e-5)  # each writer planted at 0.2‖W‖
    assert m["forward_passes"] == 6  # clean, persona+, persona-, the sink token, alpha=+1, alpha=-1


def test_per_layer_columns_and_rows(demo_run):
    outcome, out = demo_run
    per_layer = pl.read_csv(out / "per_layer.csv")
    for col in ["R_act", "z_act", "e_act", "R_w_o_proj", "z_w_o_proj", "R_w_down_proj", "R_w_combined",
                "z_w_combined", "pct_oracle_act", "pct_oracle_o_proj", "pct_oracle_down_proj", "pct_oracle_combined",
                "z_slice_w_combined", "cos_oracle_combined_mean", "cos_oracle_act_min", "rank", "expected_rank"]:
        assert col in per_layer.columns
    assert per_layer.height == len(outcome.result.candidates) * 2
    pct = per_layer.select(pl.col("^pct_oracle_.*$")).to_numpy()
    assert (pct[~(pct != pct)] <= 100.0 + 1e-6).all()  # no basis above any oracle


def test_rankings_keep_read_and_b_side_apart(demo_run):
    outcome, out = demo_run
    summary = pl.read_csv(out / "summary.tsv", separator="\t")
    joint = summary.filter(pl.col("panel") == "joint")
    assert set(joint["axis_kind"]) <= {"write", "mixed", "null"}
    assert set(joint["side"]) == {"A"}
    assert set(summary.filter(pl.col("panel") == "read")["axis_kind"]) == {"read"}
    assert set(summary.filter(pl.col("panel") == "reference")["side"]) == {"B"}
    assert summary["candidate"].n_unique() == summary.height
    names = {c.name for c in ranking_pool(outcome.result.candidates, "joint")}
    assert set(joint["candidate"]) == names
    # rank-fair order (SPEC §5): joint_gain on its tie grid, non-increasing; NaN last
    j = joint["joint_gain"].to_list()
    finite = [round(x / GAIN_RESOLUTION) for x in j if x is not None and not math.isnan(x)]
    assert finite == sorted(finite, reverse=True) and len(finite) >= 30
    assert all(x is None or math.isnan(x) for x in j[len(finite):])


def test_conclusion_has_bluf_and_caveats(demo_run):
    outcome, out = demo_run
    text = (out / "conclusion.md").read_text()
    best = outcome.result.ranking("joint").filter(pl.col("axis_kind").is_in(["write", "mixed"]))["candidate"][0]
    assert "## BLUF" in text and f"`{best}`" in text
    assert "Top-5 by gain_act" in text and "Overlap" in text and "Stouffer" in text
    assert "single delta" in text.lower() and "small probe set" in text.lower()


def test_demo_recovers_the_planted_candidate(demo_run):
    outcome, _ = demo_run
    assert outcome.recovered, outcome.verdict()
    assert outcome.pct_oracle_combined >= 95


def test_crash_while_writing_leaves_no_folder(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "heatmap_figure", boom)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        run_demo(SweepConfig(out=str(out), quiet=True))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_existing_run(tmp_path, demo_run):
    _, src = demo_run
    out = shutil.copytree(src, tmp_path / "run")
    (out / "stale.txt").write_text("old")
    snapshot = publish.check_destination(out, overwrite=True)
    publish.write_folder(out, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True, snapshot=snapshot)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_overwrite_refuses_a_folder_that_is_not_a_run_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a run folder"):
        publish.check_destination(out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_monte_carlo_null_cross_checks_the_exact_null(demo_run):
    """--null mc: z from seeded random subspaces agrees with the closed form within the MC error
    (n = 1000 draws: ~2% on the null SD, so a few % on z for |z| of a few)."""
    exact = demo_run[0].result.per_layer
    mc = run_demo(SweepConfig(out=None, quiet=True, null="mc", n_null=1000, n_boot=0)).result.per_layer
    assert mc["R_act"].to_list() == pytest.approx(exact["R_act"].to_list(), nan_ok=True)  # only z changes
    for col in ("z_act", "z_w_combined"):
        a, b = exact[col].to_numpy(), mc[col].to_numpy()
        ok = (a == a) & (abs(a) > 1)
        rel = abs(a[ok] - b[ok]) / abs(a[ok])
        assert rel.max() < 0.15 and rel.mean() < 0.05, (col, rel.max(), rel.mean())
