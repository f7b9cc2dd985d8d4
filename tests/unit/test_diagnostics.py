"""The successors' diagnostics (SPEC §10, issue 17): scope and spectra, with their exact nulls."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from subspace_sweep import linalg
from subspace_sweep.capture import capture_labels
from subspace_sweep.delta import random_delta
from subspace_sweep.diagnostics import (
    overlap_null,
    participation_rank,
    principal_overlap,
    scope_rows,
    topk_energy,
)
from subspace_sweep.scoring import Target
from tests.helpers_model import small_probes
from tests.strategies import DT, haar, targets


def test_at_the_first_delta_layer_the_two_labels_coincide(tiny):
    """Nothing upstream of layer 1 is steered, so the block input there does not move: the
    cumulative and block-local labels are equal at layer 1 and differ after it."""
    model, tok = tiny
    delta = random_delta(model, [1, 2], rank=2, seed=0, scale=0.2)
    labels = capture_labels(model, tok, delta, small_probes(n_fit=3, n_eval=4))
    torch.testing.assert_close(labels.eval_cumulative[1], labels.eval_local[1], atol=1e-5, rtol=1e-5)
    assert float((labels.eval_cumulative[2] - labels.eval_local[2]).norm()) > 1e-2
    assert float(labels.eval_cumulative[0].abs().max()) == 0.0  # before the first steered layer: nothing
    combined = {layer: Target.balanced("c", {"o": delta[f"model.layers.{layer}.self_attn.o_proj.weight"]})
                for layer in (1, 2)}
    rows = scope_rows([1, 2], combined, labels.eval_cumulative, labels.eval_local, r=3)
    assert rows[0]["overlap_cumulative_local"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["norm_ratio_local_cumulative"] == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=8)
@given(st.integers(6, 20), st.data())
def test_the_overlap_null_is_the_random_subspaces_mean_and_spread(d, data):
    r_a, r_b = data.draw(st.integers(1, d - 1)), data.draw(st.integers(1, d - 1))
    A = haar(d, r_a, data.draw(st.integers(0, 2**31 - 1)))
    mean, sd = overlap_null(r_a, r_b, d)
    assert mean == pytest.approx(r_a * r_b / (d * min(r_a, r_b)), rel=1e-12)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    n = 1500
    draws = torch.tensor([principal_overlap(A, linalg.random_orthonormal(d, r_b, gen)) for _ in range(n)], dtype=DT)
    assert abs(float(draws.mean()) - mean) <= 5 * sd / math.sqrt(n) + 1e-12
    assert float(draws.std()) == pytest.approx(sd, rel=5 * math.sqrt(2 / (n - 1)) * 1.5)


def test_a_label_of_the_deltas_own_writes_overlaps_its_weight_oracle_exactly():
    """Exact relation: if each block-local label row is the delta's own write u_i = ΔW z_i (a linear
    block), the label's oracle lies in col(ΔW), the weight oracle's span: overlap 1 (rank ≤ r)."""
    gen = torch.Generator().manual_seed(3)
    dW = torch.randn(32, 3, generator=gen, dtype=DT) @ torch.randn(3, 40, generator=gen, dtype=DT)
    rows = (dW @ torch.randn(40, 12, generator=gen, dtype=DT)).T
    w = Target.from_matrix("w", dW).oracle_basis(8)
    label = Target.from_rows("u", rows).oracle_basis(8)
    assert w.shape[1] == label.shape[1] == 3
    assert principal_overlap(w, label) == pytest.approx(1.0, abs=1e-10)
    assert principal_overlap(w, haar(32, 3, 1)) < 0.9


@pytest.mark.parametrize("k, d", [(1, 5), (3, 8), (8, 8), (5, 40)])
def test_participation_rank_of_an_isotropic_rank_k_target_is_k(k, d):
    Q = haar(d, k, k)
    assert participation_rank(Target.from_gram("iso", 2.5 * Q @ Q.T)) == pytest.approx(k, rel=1e-12)


@settings(max_examples=20)
@given(targets(max_d=16))
def test_energy_curves_are_monotone_and_reach_one(target):
    ks = list(range(1, 33))
    curve = topk_energy(target, ks)
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
    assert curve[-1] == pytest.approx(1.0, abs=1e-9) and curve[0] > 0
    assert 1.0 - 1e-9 <= participation_rank(target) <= target.d + 1e-9


def test_run_folder_has_the_scope_and_spectra_tables_figure_and_verdict(demo_run):
    _, out = demo_run
    scope = pl.read_csv(out / "scope.tsv", separator="\t")
    assert scope["layer"].to_list() == [1, 2]
    assert scope["overlap_cumulative_local"][0] == pytest.approx(1.0, abs=1e-6)
    spectra = pl.read_csv(out / "spectra.tsv", separator="\t")
    targets = ("act", "o_proj", "down_proj", "combined")
    assert set(spectra["target"]) == {*targets, "w_combined_in_act_topk", *(f"{t}_top8_coordinates" for t in targets)}
    # the concentration rows (concern 14) agree with the target's own diagonal: pinned in test_outliers
    top8 = spectra.filter(pl.col("target").str.ends_with("_top8_coordinates"))
    assert top8["k"].to_list() == [8] * 8 and top8["layer"].to_list() == [1] * 4 + [2] * 4
    assert all(len(str(c).split()) == 8 for c in top8["coordinates"])
    assert (out / "spectra.png").is_file() and (out / "spectra.pdf").is_file()
    assert "## Scope" in (out / "conclusion.md").read_text()


# ----------------------------------------------------------------------------- readout


@pytest.fixture(scope="module")
def reader(tiny):
    from subspace_sweep.causal import answer_tokens
    from subspace_sweep.diagnostics import Readout

    model, tok = tiny
    a = answer_tokens(tok)
    return Readout.of(model, a.yes_id, a.no_id, chunk=100)  # several chunks on the toy's 512 rows


def test_token_energy_of_a_random_direction_is_one_in_expectation(tiny, reader):
    model, _ = tiny
    d = model.config.hidden_size
    # exact: E[v̂v̂ᵀ] = I/d, so E = d·tr(ÛᵀÛ)/(d·tr(ÛᵀÛ)) = 1; and tr(ÛᵀÛ) = Σ‖unit rows‖² = V
    # up to the float32 normalisation of each row (~1e-7 relative)
    assert float(torch.trace(reader.unit_gram)) == pytest.approx(reader.vocab, rel=1e-6)
    d_ = reader.unit_gram.shape[0]
    assert sum(reader.token_energy(e) for e in torch.eye(d_, dtype=DT)) / d_ == pytest.approx(1.0, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    vals = torch.tensor([reader.token_energy(torch.randn(d, generator=gen, dtype=DT)) for _ in range(3000)])
    assert abs(float(vals.mean()) - 1.0) <= 5 * float(vals.std()) / math.sqrt(3000)
    # the unembedding's own top direction is read far more than a random one
    top = torch.linalg.eigh(reader.unit_gram)[1][:, -1]
    assert reader.token_energy(top) > 2.0


def test_the_logit_lens_at_the_last_layer_is_the_models_first_order_logit_change(tiny, reader):
    """A small delta: the lens of the label at the last block = E(w), the real forward pass's
    change of logit(Yes) − logit(No) between α = +1 and −1 (a central difference: first order)."""
    from subspace_sweep.causal import BehaviourSet, answer_tokens, effect

    model, tok = tiny
    delta = random_delta(model, [2, 3], rank=2, seed=1, scale=1e-3)
    probes = small_probes(n_fit=2, n_eval=5)
    labels = capture_labels(model, tok, delta, probes)
    last = model.config.num_hidden_layers - 1
    lens = reader.logit_lens(labels.eval[last], labels.eval_midpoint[last])
    # at the label's position (the raw probe's last token), where the lens reads the residual
    raw = BehaviourSet.from_probes(tok, probes.eval, answer_tokens(tok), raw=True)
    real = effect(model, tok, delta, probes.eval, raw)[0]
    assert abs(real) > 1e-4
    assert lens == pytest.approx(real, rel=2e-3)
    assert reader.logit_lens(labels.eval[last], labels.eval_midpoint[last] * 3.0) != pytest.approx(real, rel=2e-3)


def test_readout_share_is_one_inside_and_zero_orthogonal(reader):
    r = reader.direction / reader.direction.norm()
    assert reader.share(r[:, None]) == pytest.approx(1.0, abs=1e-12)
    Q = linalg.orthonormalize(torch.cat([r[:, None], torch.randn(r.shape[0], 3, dtype=DT)], 1))[:, 1:]
    assert reader.share(Q) == pytest.approx(0.0, abs=1e-12)


def test_run_folder_has_the_readout_table_and_figure(demo_run):
    _, out = demo_run
    t = pl.read_csv(out / "readout.tsv", separator="\t")
    assert set(t["kind"]) == {"layer", "candidate"}
    shares = t.filter(pl.col("kind") == "candidate")["readout_share"].to_numpy()
    assert ((shares >= 0) & (shares <= 1 + 1e-12)).all()
    assert (out / "readout.png").is_file() and (out / "readout.pdf").is_file()
