"""SPEC §6 concern 14, outlier coordinates, on a toy built to have them: a tiny Gemma-2 (post-norm
writers) whose post-norm gains are ×300 on 4 coordinates, as real post-norm models' are on a
handful. The delta has a part planted in one candidate's span with exactly zero residual write on
those coordinates, and a generic rank-2 part drawn in the writers' own coordinates (as a LoRA
makes it) that the gains carry onto them (its residual energy 1000x the planted part's).

- The conclusion warns, naming the 4 coordinates and their norm gains.
- The residual view ties: every candidate spanning the outlier coordinates reaches the planted
  candidate's gain within the tie resolution, so it cannot say which explains the delta (the
  old method, a strict xfail below: it does not rank the plant first by a margin).
- The standardized view ranks the planted candidate first, clear of every candidate whose span
  does not contain it (a union containing it may match it).
"""

from __future__ import annotations

import polars as pl
import pytest
import torch

from subspace_sweep import linalg
from subspace_sweep.demo import OUTLIER_COORDINATES, OUTLIER_GENERIC_RATIO, outlier_toy, plant_away_from
from subspace_sweep.report import GAIN_RESOLUTION, rank_fair_order
from subspace_sweep.sweep import SweepConfig, sweep

OUTLIERS = list(OUTLIER_COORDINATES)
PLANTS = ["chars_clusters", "TaskDiff_contrast"]
#: How far ahead of every candidate not containing it the plant must rank (gain units): measured
#: 0.32 (chars_clusters) and 0.19 (TaskDiff_contrast) in the standardized view, ≤ 0.001 in the residual one.
MARGIN = 0.1
VIEWS = {"standardized": ("gain_w_combined_std", "z_w_combined_std"), "residual": ("gain_w_combined", "z_w_combined")}
LEGACY = pytest.mark.xfail(strict=True, reason="legacy (residual coordinates only): a few outlier coordinates decide "
                                               "the energy shares and every writer ties, SPEC §6 concern 14")


@pytest.fixture(scope="module")
def outlier_runs():
    config = SweepConfig(quiet=True)
    model, tok, layers, a_side = outlier_toy(config)
    by_name = {c.name: c for c in a_side.candidates}
    runs = {}
    for i, plant in enumerate(PLANTS):
        delta = plant_away_from(model, by_name[plant], layers, OUTLIERS, generic_ratio=OUTLIER_GENERIC_RATIO, seed=i)
        runs[plant] = sweep(model, tok, delta, config, a_side=a_side)
    return runs, by_name, layers, a_side


def _standing(run, by_name, layers, plant: str, view: str) -> tuple[int, float, list[str]]:
    """(the plant's place among the A-side rows on the view's weight gain, candidates whose span
    contains it left out (a union with it may take up a little more of the generic part), its lead
    over the best of the rest, the rest within the tie resolution of it)."""
    gain, z = VIEWS[view]
    # the seed's A-side bases (``by_name``; the gradient bases see behaviour data, not this planted delta)
    rows = rank_fair_order(run.summary.filter((pl.col("side") == "A") & pl.col("candidate").is_in(list(by_name))),
                           gain, z)
    mine = float(rows.filter(pl.col("candidate") == plant)[gain][0])

    def contains(name: str) -> bool:
        return all(float(linalg.principal_cosines(by_name[name].bases[l], by_name[plant].bases[l]).min()) > 1 - 1e-9
                   for l in layers)

    pool = rows.filter((pl.col("candidate") == plant) | ~pl.col("candidate").map_elements(contains, return_dtype=pl.Boolean))
    others = pool.filter(pl.col("candidate") != plant)
    lead = mine - float(others[gain].max())
    tied = others.filter((pl.col(gain) - mine).abs() <= GAIN_RESOLUTION)["candidate"].to_list()
    return pool["candidate"].to_list().index(plant) + 1, lead, tied


def test_concern14_the_warning_names_the_outlier_coordinates_and_their_gains(outlier_runs):
    runs, _, layers, _ = outlier_runs
    for run in runs.values():
        line = run.outlier_warning
        assert line is not None and "the weight target at 2 of 2 scored layers" in line
        for j in OUTLIERS:
            assert f"{j}: down_proj's post-norm gain" in line
        top8 = run.spectra.filter(pl.col("target") == "combined_top8_coordinates")
        assert top8["layer"].to_list() == list(layers)
        assert float(top8["energy"].min()) > 0.5
        for coords in top8["coordinates"]:
            assert set(OUTLIERS) <= {int(j) for j in coords.split()}


def test_concern14_the_residual_view_ties(outlier_runs):
    runs, by_name, layers, _ = outlier_runs
    for plant, run in runs.items():
        _, lead, tied = _standing(run, by_name, layers, plant, "residual")
        assert lead <= GAIN_RESOLUTION and len(tied) >= 3, (plant, lead, tied)


@pytest.mark.parametrize("view", ["standardized", pytest.param("residual", marks=LEGACY, id="legacy_residual")])
@pytest.mark.parametrize("plant", PLANTS)
def test_concern14_a_delta_planted_away_from_outlier_coordinates_ranks_its_candidate_first(outlier_runs, plant, view):
    runs, by_name, layers, _ = outlier_runs
    place, lead, _ = _standing(runs[plant], by_name, layers, plant, view)
    assert place == 1 and lead >= MARGIN, (place, lead)


def test_concern14_the_scales_come_from_the_residual_and_see_the_outliers(outlier_runs):
    """The view's scales (the A-side's coordinate RMS over the persona captures' real tokens) put
    the planted coordinates far above the median: the gains in front of every writer make the
    residual large there (and every other coordinate within a few times the median)."""
    _, _, layers, a_side = outlier_runs
    for layer in layers:
        rms = a_side.coordinate_rms[layer]
        ratio = rms / rms.median()
        assert float(ratio[OUTLIERS].min()) > 100.0
        rest = torch.ones(rms.shape[0], dtype=torch.bool)
        rest[OUTLIERS] = False
        assert float(ratio[rest].max()) < 10.0


# ----------------------------------------------------------------------------- which view leads (SPEC §12, issue 31)


@pytest.fixture(scope="module")
def outlier_report(tmp_path_factory):
    """The chars_clusters plant's sweep with the causal check (the top 2 of each view), written as
    a run folder, the figures' views recorded."""
    from subspace_sweep import report

    config = SweepConfig(quiet=True, causal=2, causal_null=5, causal_strength="grid", causal_alpha=(1.0,),
                         n_boot=0)
    model, tok, layers, a_side = outlier_toy(config)
    plant = {c.name: c for c in a_side.candidates}["chars_clusters"]
    delta = plant_away_from(model, plant, layers, OUTLIERS, generic_ratio=OUTLIER_GENERIC_RATIO, seed=0)
    result = sweep(model, tok, delta, config, a_side=a_side)
    drawn = {}
    real_scatter, real_heatmap = report.scatter_figure, report.heatmap_figure
    mp = pytest.MonkeyPatch()
    mp.setattr(report, "scatter_figure", lambda ranked, png, pdf, view="residual": (
        drawn.__setitem__("scatter", view), real_scatter(ranked, png, pdf, view)))
    mp.setattr(report, "heatmap_figure", lambda per_layer, order, png, pdf, ends=(), view="residual": (
        drawn.__setitem__("heatmap", (view, order)), real_heatmap(per_layer, order, png, pdf, ends, view)))
    out = tmp_path_factory.mktemp("outlier-report") / "run"
    try:
        report.write_run(result, config, out, {})
    finally:
        mp.undo()
    return result, out, drawn


def test_concern14_the_report_leads_with_the_standardized_view(outlier_report):
    """Where the warning fires: the BLUF's first numbers are the standardized view's best, the
    residual ones beside them marked as decided by the named coordinates; the scatter and the
    heatmap are drawn in the standardized view (its R columns, its order)."""
    result, out, drawn = outlier_report
    assert result.leading_view == "standardized" and set(result.outlier_coordinates) >= set(OUTLIERS)
    coords = ", ".join(str(j) for j in result.outlier_coordinates)
    bluf = (out / "conclusion.md").read_text().split("## BLUF", 1)[1].split("##", 1)[0]
    best = result.ranking("joint", "standardized").filter(pl.col("axis_kind").is_in(["write", "mixed"])).row(0, named=True)
    assert best["candidate"] == "chars_clusters"
    assert bluf.lstrip().startswith("The standardized view leads this report")
    table = [ln for ln in bluf.splitlines() if ln.startswith("| standardized") or ln.startswith("| residual")]
    assert table == [f"| standardized (leads) | {best['joint_gain_std']:.3f} | {best['gain_act_std']:.3f} | "
                     f"{best['gain_w_combined_std']:.3f} | {best['R_act_std']:.2f} | {best['z_act_std']:.1f} | "
                     f"{best['R_w_combined_std']:.2f} | {best['z_w_combined_std']:.1f} | "
                     f"{best['pct_oracle_act_std']:.1f} | {best['pct_oracle_combined_std']:.1f} |",
                     f"| residual (decided by coordinates {coords}) | {best['joint_gain']:.3f} | {best['gain_act']:.3f} | "
                     f"{best['gain_w_combined']:.3f} | {best['R_act']:.2f} | {best['z_act']:.1f} | "
                     f"{best['R_w_combined']:.2f} | {best['z_w_combined']:.1f} | {best['pct_oracle_act']:.1f} | "
                     f"{best['pct_oracle_combined']:.1f} |"]
    assert "In residual coordinates (the seed's view; decided by coordinates" in bluf
    assert "Top-5 by gain_act_std" in bluf and "Top-5 by gain_w_combined_std" in bluf
    assert drawn["scatter"] == "standardized"
    view, order = drawn["heatmap"]
    std_joint = result.ranking("joint", "standardized")["candidate"].to_list()
    assert view == "standardized" and order[:len(std_joint)] == std_joint


def test_concern14_the_causal_check_tests_both_views_top_candidates(outlier_report):
    """The views' top 2 differ on this toy (the residual view ties): the check tests the
    standardized view's first (the verdict's winner, then its second) and the residual view's
    others beside them."""
    result, out, _ = outlier_report
    std = result.ranking("joint", "standardized")["candidate"].to_list()[:2]
    res = result.ranking("joint")["candidate"].to_list()[:2]
    both = std + [n for n in res if n not in std]
    assert len(both) > 2 and std[0] == "chars_clusters"
    assert result.causal.top == both
    assert result.causal.table.filter(pl.col("kind") == "candidate")["name"].to_list() == both
    text = (out / "conclusion.md").read_text()
    assert f"The delta restricted to the winner `{std[0]}`" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("The residual view's") or ln.startswith("Both views'"))
    assert line.startswith("Both views' best candidate is the same") == (res[0] == std[0]), line


def test_the_figures_plot_the_leading_views_columns(outlier_report, tmp_path, monkeypatch):
    """scatter_figure in the standardized view puts each candidate at (R_act_std, R_w_combined_std)."""
    import matplotlib.axes
    import numpy as np

    from subspace_sweep import report

    result, _, _ = outlier_report
    ranked = report.ranked_summary(result)
    seen = []
    real = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", lambda self, x, y, *a, **k: (
        seen.append((np.asarray(x, dtype=float), np.asarray(y, dtype=float))), real(self, x, y, *a, **k))[1])
    report.scatter_figure(ranked, tmp_path / "s.png", tmp_path / "s.pdf", "standardized")
    xs = np.concatenate([x for x, _ in seen])
    want = np.asarray(ranked["R_act_std"].to_numpy(), dtype=float)
    assert set(np.round(xs[np.isfinite(xs)], 9)) <= set(np.round(want[want > 0], 9))
    assert not set(np.round(xs[np.isfinite(xs)], 9)) <= set(np.round(ranked["R_act"].to_numpy(), 9))
