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
