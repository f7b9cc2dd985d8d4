"""The standardized view and the concentration diagnostic (SPEC §5, §6 concern 14; ``outliers.py``).

Exact values where the definition gives them, and the view held to the modules it describes:
a reader's basis must transform so that what the module reads of a residual change is unchanged
(a covector), a writer's so that what it writes stays inside it (a vector). A swapped transform,
a wrong median, a concentration on the wrong axis each fail a test here.
"""

from __future__ import annotations

import math
from dataclasses import replace

import polars as pl
import pytest
import torch

from subspace_sweep import linalg, outliers, scoring
from subspace_sweep.candidates import FAMILY_AXIS
from subspace_sweep.outliers import StandardizedView, standard_scales, top_coordinates
from subspace_sweep.scoring import Target
from subspace_sweep.toy import build_tiny_decoder, plant_outlier_gains
from tests.helpers_outliers import check_coordinate_rms_against_the_forward, check_transforms_against_the_modules

D64 = torch.float64


def _scales(d: int, seed: int, outliers_at=(1, 5), factor=300.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rms = torch.exp(0.5 * torch.randn(d, generator=gen, dtype=D64))
    rms[list(outliers_at)] *= factor
    return rms


def test_standard_scales_floor_every_coordinate_at_the_median():
    # torch's median of an even count is the lower middle value: 2 here
    assert standard_scales(torch.tensor([1.0, 2.0, 3.0, 100.0])).tolist() == [2.0, 2.0, 3.0, 100.0]
    assert standard_scales(torch.tensor([5.0, 0.5, 0.5])).tolist() == [5.0, 0.5, 0.5]
    # a residual with a zero median is measured in units of its largest coordinate
    assert standard_scales(torch.tensor([0.0, 0.0, 4.0])).tolist() == [4.0, 4.0, 4.0]
    assert standard_scales(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_top_coordinates_is_the_share_of_the_largest_diagonal_entries():
    G = torch.diag(torch.tensor([1.0, 5.0, 2.0, 5.0, 0.5, 0.5], dtype=D64))
    G[0, 1] = G[1, 0] = 0.7  # off-diagonal entries play no part
    share, coords = top_coordinates(Target.from_gram("t", G), k=3)
    assert coords == [1, 3, 2]  # ties to the lower index
    assert share == pytest.approx(12.0 / 14.0, abs=1e-15)


def test_an_isotropic_target_holds_k_over_d_on_any_k_coordinates():
    d = 40
    share, _ = top_coordinates(Target.from_gram("iso", torch.eye(d, dtype=D64)))
    assert share == pytest.approx(outliers.TOP_COORDINATES / d, abs=1e-15)


def test_a_reader_reads_the_same_of_every_change_in_both_coordinates():
    """Covector pairing: (D⁻¹r)ᵀ(D u) = rᵀu for every reader row r and residual change u."""
    gen = torch.Generator().manual_seed(0)
    view = StandardizedView.of(_scales(24, 1))
    R, U = torch.randn(7, 24, generator=gen, dtype=D64), torch.randn(24, 5, generator=gen, dtype=D64)
    D_inv_R = R * view.scales[None, :]  # rows as covectors
    assert torch.allclose(D_inv_R @ view.vectors(U), R @ U, rtol=1e-13, atol=1e-13)


def test_read_bases_are_covectors_and_write_bases_vectors_against_the_modules():
    """On a tiny Gemma-2 (random norm gains, post-norm writers) with outlier gains planted
    (``check_transforms_against_the_modules``; the real model's in the real tier)."""
    model, _ = build_tiny_decoder("gemma2", seed=3, n_layers=2)
    plant_outlier_gains(model, [2, 9, 30], factor=50.0)
    check_transforms_against_the_modules(model, 0, StandardizedView.of(_scales(64, 4, outliers_at=(2, 9))))


def test_every_family_has_its_transform_and_reads_are_covectors():
    assert set(outliers.FAMILY_TRANSFORM) <= set(FAMILY_AXIS)
    for family, axis in FAMILY_AXIS.items():
        want = "covector" if axis == "read" or family == "W:QK" else "uniform" if axis == "null" else "vector"
        assert outliers.transform_of(family) == want, family
    # the uniform baseline is its own draw, not mapped (a uniform law is the same in any orthonormal coordinates)
    B = linalg.random_orthonormal(4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(StandardizedView.of(torch.tensor([1.0, 50.0, 2.0, 3.0])).basis(B, "uniform"), B)
    with pytest.raises(ValueError, match="transform 'row'"):
        StandardizedView.of(torch.ones(4)).basis(torch.eye(4)[:, :2], "row")


def test_standardized_targets_are_built_from_the_scaled_rows():
    d = 12
    gen = torch.Generator().manual_seed(2)
    view = StandardizedView.of(_scales(d, 3))
    labels = torch.randn(5, d, generator=gen, dtype=D64)
    M_o, M_down = torch.randn(d, 6, generator=gen), torch.randn(d, 9, generator=gen).to(torch.bfloat16)
    t = view.targets(7, labels, {"o_proj": M_o, "down_proj": M_down})
    Dl = labels / view.scales[None, :]
    Dl = Dl / Dl.norm(dim=1, keepdim=True)
    assert torch.allclose(t["act"].gram, Dl.T @ Dl / 5, rtol=0, atol=1e-14)
    parts = [(M.double() / view.scales[:, None]) for M in (M_o, M_down)]
    want = sum(P @ P.T / float((P ** 2).sum()) for P in parts)
    assert torch.allclose(t["combined"].gram, want, rtol=0, atol=1e-13)
    assert t["combined"].name == "combined_std@7"
    # the storage floor follows each tensor's dtype, in its own normalisation (bf16: u = 2⁻⁸)
    assert t["combined"].noise_floor == pytest.approx(scoring.unit_roundoff(torch.float32) ** 2 + 2.0 ** -16, rel=1e-12)
    assert set(view.targets(7, labels, {})) == {"act"}


def test_source_of_names_norm_gains_and_massive_activations():
    gains = {"down_proj": torch.tensor([1.0, 1.0, 30.0, 1.0, 9.0]), "o_proj": torch.tensor([1.0, 12.0, 1.0, 1.0, 1.0])}
    rms = torch.tensor([2.0, 2.0, 2.0, 2.0, 50.0])
    assert outliers.source_of(2, rms, gains) == "down_proj's post-norm gain 30x median"
    assert outliers.source_of(1, rms, gains) == "o_proj's post-norm gain 12x median"
    assert outliers.source_of(4, rms, gains) == "residual RMS 25x median (a massive activation)"
    gains["o_proj"][4] = 11.0
    assert outliers.source_of(4, rms, gains) == "o_proj's post-norm gain 11x median, residual RMS 25x median (a massive activation)"
    assert outliers.source_of(3, rms, gains) is None  # nothing ≥ 10x; 9x (coordinate 4's gain) is not named
    assert outliers.source_of(0, None, {}) is None


def test_warning_line_counts_layers_and_names_the_most_frequent_coordinates():
    C = outliers.Concentration
    assert outliers.warning_line([], 4, 64, {}) is None
    flags = [C(1, "combined", 0.9, [7, 3, 5]), C(2, "combined", 0.7, [3, 7, 6]), C(2, "act", 0.6, [3, 1])]
    line = outliers.warning_line(flags, 4, 64, {3: "a norm gain", 7: None})
    assert "the weight target at 2 of 4 scored layers (up to 0.90)" in line
    assert "the activation target at 1 of 4 scored layers (up to 0.60)" in line
    assert "8/d = 0.1250" in line
    assert "Coordinates met most often: 3: a norm gain; also 7, 1, 5, 6 (no norm gain" in line


def test_concentrated_flags_only_targets_above_the_share():
    d = 16
    G = torch.eye(d, dtype=D64)
    G[4, 4] = 100.0
    targets = {"act": Target.from_gram("a", torch.eye(d, dtype=D64)), "combined": Target.from_gram("w", G),
               "o_proj": Target.from_gram("o", G)}
    flags = outliers.concentrated(3, targets)
    assert [(f.layer, f.target) for f in flags] == [(3, "combined")]  # o_proj is shown, not flagged
    assert flags[0].share == pytest.approx(107.0 / 115.0)
    # the threshold is the share 0.5 (d = 32: 31 unit entries and one large): 0.66 is flagged, 0.41 not
    for big, flagged in ((40.0, True), (10.0, False)):
        G = torch.eye(32, dtype=D64)
        G[4, 4] = big
        share = (big + 7) / (big + 31)
        assert (share > 0.5) == flagged
        assert [f.target for f in outliers.concentrated(3, {"act": Target.from_gram("a", G)})] == (["act"] if flagged else [])


@pytest.fixture(scope="module")
def plain_runs(tiny):
    """The sweep on the tiny Qwen3 (planted in mlp_write), with the A-side's own scales and with
    every coordinate given the same scale."""
    from subspace_sweep.a_side import build_a_side_for
    from subspace_sweep.demo import default_layers, planted_delta
    from subspace_sweep.prompts import load_probe_set
    from subspace_sweep.sweep import SweepConfig, sweep

    model, tok = tiny
    config = SweepConfig(quiet=True)
    layers = default_layers(model.config.num_hidden_layers)
    a_side = build_a_side_for(model, tok, config, layers, load_probe_set(config.n_fit))
    delta = planted_delta(model, tok, "mlp_write", layers, config)
    equal = replace(a_side, coordinate_rms={layer: torch.full_like(v, 3.0) for layer, v in a_side.coordinate_rms.items()})
    return sweep(model, tok, delta, config, a_side=a_side), sweep(model, tok, delta, config, a_side=equal)


def test_equal_scales_make_the_standardized_view_the_residual_view(plain_runs):
    """The relation the view is built on: where every coordinate has the same scale, D = I/σ and
    every share, null and oracle is the residual view's (to float64 round-off)."""
    _, equal = plain_runs
    frame = equal.per_layer
    for std, res in (("act_std", "act"), ("w_combined_std", "w_combined")):
        for k in ("e", "R", "z", "gain"):
            a, b = frame[f"{k}_{std}"].to_numpy(), frame[f"{k}_{res}"].to_numpy()
            assert ((abs(a - b) <= 1e-9 * (1 + abs(b))) | (a != a) & (b != b)).all(), f"{k}_{std}"
    s = equal.summary
    assert (s["joint_gain_std"] - s["joint_gain"]).abs().max() < 1e-9


def test_without_outliers_the_views_agree_where_they_must(plain_runs):
    """On the tiny Qwen3 (no outlier coordinates): no warning, every concentration below the share,
    and the planted candidate (a write basis: a vector family) keeps gain 1 in both views, since
    span(D·B) contains D·B·c."""
    run, _ = plain_runs
    assert run.outlier_warning is None
    top8 = run.spectra.filter(pl.col("target").str.ends_with("_top8_coordinates"))
    assert top8.height == 4 * len(run.scored_layers) and float(top8["energy"].max()) < outliers.OUTLIER_SHARE
    row = run.summary.filter(pl.col("candidate") == "mlp_write").row(0, named=True)
    assert row["gain_w_combined"] == pytest.approx(1.0, abs=1e-9)
    assert row["gain_w_combined_std"] == pytest.approx(1.0, abs=1e-9)
    assert run.ranking("joint", "standardized")["candidate"][0] == "mlp_write" == run.ranking("joint")["candidate"][0]
    # the uniform baseline is its own draw in both views: its weight energy differs only by the target
    base = run.per_layer.filter(pl.col("candidate") == "randn_orthogonal")
    assert base["rank"].to_list() == [8] * len(run.scored_layers)
    assert math.isfinite(float(base["z_w_combined_std"].mean()))


def test_coordinate_rms_is_the_rms_over_the_persona_prompts_real_tokens_as_the_model_computes_them(tiny):
    """Against the model's own forward (``check_coordinate_rms_against_the_forward``): a mean that
    counted the zero padding rows, or one prompt set only, fails."""
    from subspace_sweep.a_side import build_a_side_for
    from subspace_sweep.prompts import load_probe_set
    from subspace_sweep.sweep import SweepConfig

    model, tok = tiny
    config = SweepConfig(quiet=True)
    probes = load_probe_set(config.n_fit)
    check_coordinate_rms_against_the_forward(model, tok, build_a_side_for(model, tok, config, [0, 2], probes), probes)


def test_the_causal_check_takes_both_views_top_candidates_when_they_differ():
    """SPEC §12 (issue 31): the leading view's top k first (its first is the winner), then the other
    view's top k not among them, then the rest of the leading view's order; one list when they agree."""
    from subspace_sweep.sweep import causal_candidates, leading_view

    summary = pl.DataFrame({
        "candidate": ["a", "b", "c", "d"], "rank": [8.0] * 4,
        "joint_gain": [0.9, 0.8, 0.1, 0.0], "z_act": [5.0] * 4, "z_w_combined": [5.0] * 4,
        "joint_gain_std": [0.1, 0.2, 0.9, 0.5], "z_act_std": [5.0] * 4, "z_w_combined_std": [5.0] * 4,
    })
    pool = {"a", "b", "c", "d"}
    assert causal_candidates(summary, pool, 1, "standardized") == (["c", "a", "d", "b"], 2)
    assert causal_candidates(summary, pool, 2, "standardized") == (["c", "d", "a", "b"], 4)
    assert causal_candidates(summary, pool, 1, "residual") == (["a", "c", "b", "d"], 2)
    agree = summary.with_columns(joint_gain_std=pl.col("joint_gain"))
    assert causal_candidates(agree, pool, 2, "standardized") == (["a", "b", "c", "d"], 2)
    assert causal_candidates(summary, {"a", "b"}, 1, "standardized") == (["b", "a"], 2)
    assert leading_view("Outlier coordinates ...") == "standardized" and leading_view(None) == "residual"
