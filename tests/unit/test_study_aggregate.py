"""The study's aggregate statistics, exact on constructed job results (issue 32): known means,
Student-t intervals, verdicts against each claim's threshold, Kendall's W, winners, and the files
written (deterministic, no paths or timings)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import scipy.stats

from subspace_sweep.study_aggregate import (CLAIMS, GRAD_ROWS, NUMBER_COLUMNS, Claim, aggregate, average_ranks,
                                            conclusion_markdown, kendalls_w, t_interval, verdict, write_aggregate)


def test_t_interval_is_mean_plus_minus_t_sd_over_root_n():
    iv = t_interval([0.1, 0.2, 0.6])
    assert iv.mean == pytest.approx(0.3, abs=1e-15)
    sd = math.sqrt(((0.1 - 0.3) ** 2 + (0.2 - 0.3) ** 2 + (0.6 - 0.3) ** 2) / 2)
    assert iv.sd == pytest.approx(sd, rel=1e-14)
    half = 4.302652729749464 * sd / math.sqrt(3)  # t(0.975, 2)
    assert (iv.lo, iv.hi) == (pytest.approx(0.3 - half, rel=1e-12), pytest.approx(0.3 + half, rel=1e-12))
    assert scipy.stats.t.ppf(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-12)


def test_t_interval_edges():
    equal = t_interval([0.25, 0.25, 0.25])
    assert (equal.mean, equal.sd, equal.lo, equal.hi) == (0.25, 0.0, 0.25, 0.25)
    one = t_interval([0.4, math.nan, None])
    assert one.n == 1 and one.mean == 0.4 and math.isnan(one.lo) and math.isnan(one.hi)
    none = t_interval([])
    assert none.n == 0 and math.isnan(none.mean)
    # n = 2: t(0.975, 1) = 12.706...
    two = t_interval([1.0, 3.0])
    assert two.hi - two.mean == pytest.approx(12.706204736174707 * math.sqrt(2) / math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("above", [True, False])
def test_verdict_needs_the_whole_interval_on_one_side(above):
    c = Claim("k", "x", 0.5, above, "s", "o", "src")
    above_iv, below_iv, across = t_interval([0.8, 0.9, 0.85]), t_interval([0.1, 0.2, 0.15]), t_interval([0.1, 0.9, 0.5])
    assert verdict(c, above_iv) == ("holds" if above else "fails")
    assert verdict(c, below_iv) == ("fails" if above else "holds")
    assert verdict(c, across) == "undecided"
    assert verdict(c, t_interval([0.9])) == "undecided"  # one seed: no interval
    # exactly on the threshold is not "above" it
    assert verdict(c, t_interval([0.5, 0.5])) == "undecided"


def test_kendalls_w_identical_reversed_and_known_value():
    a = [1, 2, 3, 4]
    assert kendalls_w([a, a, a]) == pytest.approx(1.0)
    assert kendalls_w([a, a[::-1]]) == pytest.approx(0.0)
    # m = 3, n = 3: rank sums 4, 6, 8 -> S = 8; W = 12·8 / (9·24) = 0.4444...
    assert kendalls_w([[1, 2, 3], [2, 1, 3], [1, 3, 2]]) == pytest.approx(12 * 8 / (9 * 24), rel=1e-14)
    # ties: W = 12 S / (m²(n³−n) − m Σ T); rater 2 ties items 1 and 2 (T = 2³ − 2 = 6)
    R = [[1, 2, 3], [1.5, 1.5, 3]]
    sums = np.sum(R, axis=0)
    S = float(((sums - sums.mean()) ** 2).sum())
    assert kendalls_w(R) == pytest.approx(12 * S / (4 * 24 - 2 * 6), rel=1e-14)
    assert math.isnan(kendalls_w([a]))


def test_average_ranks_follow_the_order_restricted_to_the_items():
    assert average_ranks(["c", "x", "a", "b"], ["a", "b", "c"]) == [2.0, 3.0, 1.0]


def _row(model, family, seed, **values):
    base = {c: math.nan for c in NUMBER_COLUMNS}
    base.update(values)
    return {"model": model, "family": family, "seed": seed, "job": f"{model}/{family}/seed{seed}",
            "winner": values.pop("winner", "a"), "view": values.pop("view", "residual"), "best_share_candidate": "a",
            "top5_overlap_candidates": "", "ranking": values.pop("ranking", ["a", "b", "c"]), **base}


def test_aggregate_claims_per_family_and_across_families():
    rows = [
        _row("m", "lora", 0, best_share=0.10, cos_pos_neg=-0.6, winner="a", ranking=["a", "b", "c"]),
        _row("m", "lora", 1, best_share=0.12, cos_pos_neg=-0.7, winner="a", ranking=["a", "b", "c"]),
        _row("m", "lora", 2, best_share=0.11, cos_pos_neg=-0.65, winner="b", ranking=["b", "a", "c"]),
        _row("m", "ia3", 0, best_share=0.9, cos_pos_neg=0.3, winner="c", ranking=["c", "b", "a"]),
        _row("m", "ia3", 1, best_share=0.8, cos_pos_neg=0.2, winner="c", ranking=["c", "b", "a"]),
    ]
    agg = aggregate(rows)
    claims = {(r["family"], r["claim"]): r for r in agg.claims.iter_rows(named=True)}
    share = claims[("lora", "base_predicts_little")]
    assert share["n"] == 3 and share["mean"] == pytest.approx(0.11, abs=1e-15) and share["verdict"] == "holds"
    assert share["values"] == "0.1,0.12,0.11"
    ia3 = claims[("ia3", "base_predicts_little")]  # two seeds, t(0.975, 1) = 12.7: the interval reaches 0.22
    assert ia3["lo"] == pytest.approx(0.85 - 12.706204736174707 * math.sqrt(0.005) / math.sqrt(2), rel=1e-12)
    assert ia3["verdict"] == "undecided"
    assert claims[("lora", "adapters_opposite")]["verdict"] == "fails"
    # a claim whose statistic is missing in every job: no values, undecided
    assert claims[("lora", "winner_carries_behaviour")]["n"] == 0
    assert claims[("lora", "winner_carries_behaviour")]["verdict"] == "undecided"
    across = {r["claim"]: r for r in agg.across.iter_rows(named=True)}
    assert across["adapters_opposite"]["summary"] == "undecided for ia3; fails for lora"
    winners = agg.winners.filter(pl.col("family") == "lora")
    assert winners.rows() == [("m", "lora", "a", 2, 3), ("m", "lora", "b", 1, 3)]
    W = dict(zip(agg.kendall["family"], agg.kendall["W"]))
    assert W["ia3"] == pytest.approx(1.0)
    assert W["lora"] == pytest.approx(kendalls_w([[1, 2, 3], [1, 2, 3], [2, 1, 3]]))


def test_the_across_families_summary_names_the_flip():
    rows = [_row("m", f, s, best_share=v) for f, vals in (("lora", (0.1, 0.1, 0.12)), ("oft", (0.9, 0.95, 0.92)))
            for s, v in enumerate(vals)]
    agg = aggregate(rows)
    r = agg.across.filter(pl.col("claim") == "base_predicts_little").row(0, named=True)
    assert r["holds_for"] == "lora" and r["fails_for"] == "oft"
    assert r["summary"] == "flips: holds for lora; fails for oft"


def test_a_model_read_in_the_standardized_view_has_its_residual_claims_beside_marked():
    """SPEC §12: a group whose jobs lead with the standardized view is decided by those numbers; the
    residual twins stand beside them (claims_residual, one marked line per claim a view decides) for
    that group only, and the figures' rows say which view they show."""
    from subspace_sweep.study_aggregate import RESIDUAL_TWINS, _label, conclusion_markdown

    rows = [_row("g", "lora", s, view="standardized", best_share=v, best_share_residual=v + 0.4)
            for s, v in enumerate((0.07, 0.08, 0.075))]
    rows += [_row("m", "lora", s, best_share=v, best_share_residual=v) for s, v in enumerate((0.04, 0.04, 0.05))]
    agg = aggregate(rows)
    lead = {(r["model"], r["claim"]): r for r in agg.claims.iter_rows(named=True)}
    assert lead[("g", "base_predicts_little")]["view"] == "standardized"
    assert lead[("g", "base_predicts_little")]["mean"] == pytest.approx(0.075, abs=1e-15)
    assert lead[("m", "base_predicts_little")]["view"] == "residual"
    twin = agg.residual.filter((pl.col("model") == "g") & (pl.col("claim") == "base_predicts_little")).row(0, named=True)
    assert twin["statistic"] == "best_share_residual" and twin["mean"] == pytest.approx(0.475, abs=1e-15)
    assert twin["verdict"] == "holds" and twin["values"] == "0.47,0.48,0.475"
    assert set(agg.residual["statistic"]) == {f"{c}_residual" for c in RESIDUAL_TWINS}
    text = conclusion_markdown(agg, len(rows))
    marked = [line for line in text.splitlines() if line.startswith("In the residual view")]
    assert len(marked) == len(RESIDUAL_TWINS) and all(" g · lora: " in line for line in marked)
    assert "0.470, 0.480, 0.475; mean 0.475 [" in text and "| g | lora | standardized | 0.070, 0.080, 0.075 |" in text
    assert _label("g", "lora", "standardized") == "g · lora (standardized view)" and _label("m", "x", "residual") == "m · x"


def test_the_gradient_bases_per_family_with_intervals_and_which_first_step_predicts_more():
    """gradients.tsv (issue 34): each variant's gain_w over seeds with its t-interval, the seed's best
    basis beside it, and the family variant against the full-weight gradient, exact."""
    lora = [(0.50, 0.56, 0.008), (0.52, 0.58, 0.009), (0.54, 0.57, 0.007)]  # grad, family, seed's best
    ia3 = [(0.40, 0.20, 0.01), (0.42, 0.25, 0.01)]
    rows = [_row("m", "lora", s, grad_gain_w=g, grad_family_gain_w=f, grad_family_minus_full=f - g, best_gain_w=b,
                 grad_kept=0.9) for s, (g, f, b) in enumerate(lora)]
    rows += [_row("m", "ia3", s, grad_gain_w=g, grad_family_gain_w=f, grad_family_minus_full=f - g, best_gain_w=b)
             for s, (g, f, b) in enumerate(ia3)]
    rows += [_row("m", "oft", 0, grad_gain_w=0.3, grad_family_gain_w=0.35, grad_family_minus_full=0.05)]
    agg = aggregate(rows)
    g = {(r["family"], r["statistic"]): r for r in agg.gradients.iter_rows(named=True)}
    assert [r["statistic"] for r in agg.gradients.iter_rows(named=True) if r["family"] == "lora"] == \
        [c for _, c in GRAD_ROWS]
    full = g[("lora", "grad_gain_w")]
    assert full["basis"] == "grad_behaviour" and full["n"] == 3 and full["values"] == "0.5,0.52,0.54"
    assert full["mean"] == pytest.approx(0.52, abs=1e-15) and full["sd"] == pytest.approx(0.02, abs=1e-15)
    half = 4.302652729749464 * 0.02 / math.sqrt(3)  # t(0.975, 2)
    assert (full["lo"], full["hi"]) == (pytest.approx(0.52 - half, abs=1e-12), pytest.approx(0.52 + half, abs=1e-12))
    assert g[("lora", "best_gain_w")]["mean"] == pytest.approx(0.008, abs=1e-15)
    assert g[("lora", "grad_kept")]["values"] == "0.9,0.9,0.9" and g[("ia3", "grad_kept")]["n"] == 0
    assert g[("lora", "grad_neutral_gain_w")]["n"] == 0
    text = conclusion_markdown(agg, 6)
    section = text[text.index("## The gradient bases"):]
    lines = {ln.split(" | ")[1]: ln for ln in section.splitlines() if ln.startswith("| m |")}
    assert lines["lora"].endswith("| the family variant |")  # +0.06, +0.06, +0.03: the interval above 0
    assert t_interval([0.20 - 0.40, 0.25 - 0.42]).hi > 0  # two seeds (t = 12.7): the interval reaches above 0
    assert lines["ia3"].endswith("| undecided |")
    assert lines["oft"].endswith("| one seed: no interval |") and "0.300 (one seed)" in lines["oft"]
    assert "0.520 [" in lines["lora"]


def test_a_study_without_gradient_numbers_has_no_gradient_section():
    agg = aggregate([_row("m", "lora", s, best_share=0.1) for s in range(2)])
    assert agg.gradients.height == len(GRAD_ROWS)
    assert "## The gradient bases" not in conclusion_markdown(agg, 2)


def test_every_claim_reads_a_per_job_column():
    assert {c.column for c in CLAIMS} <= set(NUMBER_COLUMNS)


def test_the_written_aggregate_is_deterministic_and_holds_no_path_or_time(tmp_path):
    rows = [_row("m", "lora", s, best_share=0.1 + s / 100, top5_overlap=1.0) for s in range(3)]
    gains = [{"model": "m", "family": "lora", "candidate": c, "gain_w_combined": g} for c, g in (("a", 0.1), ("b", 0.2))]
    outs = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        write_aggregate(aggregate(rows, gains), folder, {"kind": "study_aggregate"}, 3)
        outs.append(folder)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
    text = (outs[0] / "conclusion.md").read_text()
    assert str(tmp_path) not in text and "holds" in text


def test_the_aggregate_rebuilds_byte_for_byte_from_its_own_inputs(tmp_path):
    """inputs.json holds everything the tables, figures and conclusion are made of: the shipped real
    study is checked this way (tests/golden/test_golden_study.py) without rerunning it."""
    from subspace_sweep.study_aggregate import INPUTS, rebuild

    rows = [_row("m", f, s, best_share=0.1 + s / 50, top5_overlap=float(s % 2), winner_kept=0.2, oracle_kept=0.9)
            for f in ("lora", "oft") for s in range(3)]
    gains = [{"model": "m", "family": f, "candidate": c, "gain_w_combined": g}
             for f in ("lora", "oft") for c, g in (("a", 0.1), ("b", math.nan))]
    failed = [{"job": "m/dora/seed0", "step": "train", "error": "boom"}]
    first = tmp_path / "first"
    first.mkdir()
    write_aggregate(aggregate(rows, gains, failed), first, {"kind": "study_aggregate"}, 7,
                    inputs={"rows": rows, "gains": gains, "failed": failed})
    again = tmp_path / "again"
    again.mkdir()
    rebuild(first / INPUTS, again, {"kind": "study_aggregate"})
    assert _tree(first) == _tree(again)
    assert "m/dora/seed0" in (again / "conclusion.md").read_text()
    assert "6 of 7 jobs finished; 1 failed (listed at the end)." in (again / "conclusion.md").read_text()


def _tree(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
