"""Edge cases of the scoring core."""

from __future__ import annotations

import math

import pytest
import torch

from subspace_sweep import linalg, scoring
from subspace_sweep.errors import InputError
from subspace_sweep.scoring import Target
from tests.strategies import DT, haar

D = 12


@pytest.fixture
def target():
    gen = torch.Generator().manual_seed(0)
    return Target.from_matrix("o_proj", torch.randn(D, 30, generator=gen, dtype=DT))


def test_rank_zero_basis_scores_without_crashing(target):
    s = scoring.score(target, linalg.empty_basis(D))
    assert s.rank == 0 and s.energy == 0.0
    assert math.isnan(s.concentration) and math.isnan(s.z) and math.isnan(s.pct_oracle)


def test_full_rank_basis_has_zero_null_variance_and_nan_z(target):
    s = scoring.score(target, torch.eye(D, dtype=DT))
    assert s.energy == pytest.approx(1.0)
    assert s.concentration == pytest.approx(1.0)
    assert scoring.null_moments(target, D)[1] == 0.0
    assert math.isnan(s.z)
    assert s.pct_oracle == pytest.approx(100.0)


def test_isotropic_target_has_zero_variance_and_nan_z():
    s = scoring.score(Target.from_gram("iso", torch.eye(D, dtype=DT)), haar(D, 3, 1))
    assert s.concentration == pytest.approx(1.0)
    assert math.isnan(s.z)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Target.from_matrix("w", torch.zeros(D, 5)),
        lambda: Target.from_gram("g", torch.zeros(D, D)),
        lambda: Target.balanced("c", {"o_proj": torch.randn(D, D), "down_proj": torch.zeros(D, 3 * D)}),
        lambda: Target.from_rows("act", torch.zeros(4, D)),
        lambda: Target.from_rows("act", torch.zeros(0, D)),
    ],
)
def test_zero_target_is_a_clear_error(make):
    with pytest.raises(InputError, match="zero"):
        make()


def test_nonfinite_target_is_a_clear_error():
    G = torch.eye(D, dtype=DT)
    G[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN/Inf"):
        Target.from_gram("g", G)


def test_basis_of_wrong_width_is_a_clear_error(target):
    with pytest.raises(InputError, match="rows"):
        scoring.energy(target, haar(D + 1, 2, 0))


def test_rank_outside_zero_to_d_is_a_clear_error(target):
    with pytest.raises(InputError, match="outside"):
        scoring.null_moments(target, D + 1)


def test_activation_target_has_unit_trace_and_ignores_row_scale():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(7, D, generator=gen, dtype=DT)
    a = Target.from_rows("act", rows)
    b = Target.from_rows("act", rows * torch.linspace(0.1, 100, 7, dtype=DT)[:, None])
    assert a.trace == pytest.approx(1.0)
    assert torch.allclose(a.gram, b.gram, atol=1e-12)


def test_restricted_z_inside_the_targets_own_column_space():
    """LoRA-slice null: a target living in S; the oracle basis is far above random bases in S."""
    gen = torch.Generator().manual_seed(2)
    S = haar(D, 4, 3)
    M = S @ torch.randn(4, 20, generator=gen, dtype=DT)
    t = Target.from_matrix("w", M)
    z_oracle = scoring.restricted_z(t, t.oracle_basis(1), S)
    z_ambient = scoring.score(t, t.oracle_basis(1)).z
    assert z_oracle > 0
    assert z_oracle < z_ambient  # random bases inside S already catch much of the energy
    assert math.isnan(scoring.restricted_z(t, haar(D, 5, 0), S))  # r > D


def test_stable_seed_distinguishes_its_parts():
    # Process independence is tested across processes in test_reproducibility.py.
    seeds = {scoring.stable_seed(layer, r, name) for layer in range(4) for r in (1, 8) for name in ("o_proj", "down_proj")}
    assert len(seeds) == 16
    assert all(0 <= s < 2**31 for s in seeds)


def test_col_gram_in_chunks_equals_the_direct_product(monkeypatch):
    from subspace_sweep import linalg

    gen = torch.Generator().manual_seed(5)
    M = torch.randn(1000, 24, generator=gen)
    direct = linalg.as64(M).T @ linalg.as64(M)
    monkeypatch.setattr(linalg, "GRAM_CHUNK_ROWS", 128)
    torch.testing.assert_close(linalg.col_gram(M), direct, rtol=1e-5, atol=1e-3)
    half = linalg.col_gram(M.bfloat16())  # chunk-wise float32, no full float32 copy
    ref = linalg.as64(M.bfloat16().float())
    torch.testing.assert_close(half, ref.T @ ref, rtol=1e-5, atol=1e-3)


def test_specificity_equals_scoring_inside_the_complement_coordinates():
    """Specificity scores in ambient coordinates with the complement's dimension; the same numbers
    as mapping label rows and the projected basis into an explicit basis of the complement of C."""
    from subspace_sweep.candidates import Candidate
    from subspace_sweep.sweep import Specificity

    gen = torch.Generator().manual_seed(4)
    d, n = 24, 7
    C = haar(d, 3, 1)
    rows = torch.randn(n, d, generator=gen, dtype=DT)
    bases = {1: haar(d, 5, 2), 2: torch.cat([C[:, :2], haar(d, 2, 3)], dim=1)}  # one overlaps C
    cands = [Candidate(name=f"c{k}", family="baseline", definition="", side="A", bases={0: B}, expected_rank=B.shape[1])
             for k, B in bases.items()]
    got = Specificity.at_layer(rows, C, 0).rows(cands, 0)
    comp = torch.linalg.qr(C, mode="complete")[0][:, 3:]  # d x (d - 3)
    inner = Target.from_rows("in", rows @ comp)
    for row, c in zip(got, cands):
        B = linalg.project_away(c.bases[0], C)
        want = scoring.score(inner, comp.T @ B)
        assert row["specific_rank"] == B.shape[1]
        assert row["specific_e_act"] == pytest.approx(want.energy, rel=1e-10)
        assert row["specific_R_act"] == pytest.approx(want.concentration, rel=1e-10)
        assert row["specific_z_act"] == pytest.approx(want.z, rel=1e-8)


def test_oracle_gain_pinned_values():
    """G = diag(3, 1, 0, 0) (t = 4): e(e1) = 3/4, e(e2) = 1/4, e(e3) = 0; r/d = 1/4; e_max(1) = 3/4,
    e_max(2) = 1, so gain(e1) = 1, gain(e2) = 0, gain(e3) = −1/2, gain([e1 e3]) = (3/4 − 1/2)/(1 − 1/2)."""
    t = Target.from_gram("g", torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=DT)))
    e = torch.eye(4, dtype=DT)
    assert scoring.score(t, e[:, [0]]).gain == pytest.approx(1.0, abs=1e-15)
    assert scoring.score(t, e[:, [1]]).gain == pytest.approx(0.0, abs=1e-15)
    assert scoring.score(t, e[:, [2]]).gain == pytest.approx(-0.5, abs=1e-15)
    assert scoring.score(t, e[:, [0, 2]]).gain == pytest.approx(0.5, abs=1e-15)
    assert scoring.score(t, e[:, [0, 1]]).gain == pytest.approx(1.0, abs=1e-15)
    assert math.isnan(scoring.score(t, e).gain)  # r = d: e_max = r/d
    assert math.isnan(scoring.score(t, linalg.empty_basis(4)).gain)
    iso = Target.from_gram("iso", torch.eye(4, dtype=DT))
    assert math.isnan(scoring.score(iso, e[:, [0]]).gain)


def test_null_spread_keeps_its_digits_for_a_near_isotropic_target():
    """G = I + ε·diag(1, −1, 0, …): ‖G − (t/d)I‖²_F/t² = 2ε²/d² exactly, which the difference
    tr(G²)/t² − 1/d rounds to 0 in float64 for ε = 1e-9 (its terms are ~1/d apart from 2ε²/d²)."""
    eps = 1e-9
    G = torch.eye(D, dtype=DT)
    G[0, 0] += eps
    G[1, 1] -= eps
    t = Target.from_gram("near_iso", G)
    assert t.spread == pytest.approx(2 * eps**2 / D**2, rel=1e-6)
    difference = float((t.gram * t.gram).sum()) / t.trace**2 - 1.0 / D
    assert abs(difference - 2 * eps**2 / D**2) >= 0.5 * 2 * eps**2 / D**2  # the old form: no correct digit
    mean, var = scoring.null_moments(t, 3)
    assert var == pytest.approx(2 * 3 * (D - 3) / (D * (D - 1) * (D + 2)) * 2 * eps**2 / D**2, rel=1e-6)


def test_noise_floor_follows_the_stored_precision():
    """u² · tr(M Mᵀ) for one tensor; the balanced combination adds each tensor's floor / its trace."""
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(D, 20, generator=gen)
    N = torch.randn(D, 5, generator=gen)
    a = Target.from_matrix("m", M.to(torch.bfloat16))
    assert a.noise_floor == pytest.approx(2.0**-16 * a.trace, rel=1e-12)
    b = Target.from_matrix("n", N.to(torch.float16))
    c = Target.combine("c", [a, b])
    assert c.noise_floor == pytest.approx(2.0**-16 + 2.0**-22, rel=1e-12)
    assert Target.from_matrix("m64", M.double()).noise_floor == pytest.approx(2.0**-106 * float((M.double() ** 2).sum()))
