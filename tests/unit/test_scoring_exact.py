"""Exact values of the scoring core (issue 18).

Where mathematics gives a number in closed form on a small case, the test pins it, so that the
formula and its near misses (a shifted constant, a stale cache, a swapped bound, a dropped
prompt) cannot both pass. Tolerances are round-off of a few float64 operations unless a comment
says otherwise: every near miss these tests guard against moves the value by 1% or more.
"""

from __future__ import annotations

import itertools
import math
import zlib
from unittest import mock

import numpy as np
import pytest
import torch

from subspace_sweep import linalg, scoring
from subspace_sweep.errors import InputError
from subspace_sweep.scoring import RestrictedNull, Target
from tests.strategies import DT, haar

# A few float64 operations on numbers of order 1: rounding is ~1e-16 relative; the near misses
# guarded against (d + 1 for d + 2, a missing factor 2, r for r + 1) are ≥ 1e-2 off.
EXACT = 1e-12


def diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=DT))


def e(d: int, *cols: int) -> torch.Tensor:
    """The standard basis vectors ``cols`` of R^d as a d x len(cols) basis."""
    return torch.eye(d, dtype=DT)[:, list(cols)]


def random_psd(d: int, seed: int) -> torch.Tensor:
    X = torch.randn(d, d + 2, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return X @ X.T


# ----------------------------------------------------------------------------- the exact null


@pytest.mark.parametrize("d", range(2, 8))
def test_null_moments_of_a_rank_one_target_are_the_beta_moments(d):
    """G = u uᵀ: e(B) = ‖Bᵀu‖² for B uniform among rank-r subspaces is Beta(r/2, (d − r)/2), whose
    mean is r/d and variance 2r(d − r)/(d²(d + 2)), for every r (0 and d included: variance 0)."""
    u = haar(d, 1, d)
    target = Target.from_gram("u", u @ u.T)
    for r in range(d + 1):
        mean, var = scoring.null_moments(target, r)
        assert mean == pytest.approx(r / d, rel=EXACT, abs=EXACT)
        assert var == pytest.approx(2 * r * (d - r) / (d**2 * (d + 2)), rel=EXACT, abs=EXACT)


def _quadrature_moments(target: Target, bases: list[torch.Tensor]) -> tuple[float, float]:
    es = torch.tensor([scoring.energy(target, B) for B in bases], dtype=DT)
    return float(es.mean()), float(((es - es.mean()) ** 2).mean())


@pytest.mark.parametrize("seed", range(3))
def test_null_moments_in_the_plane_equal_an_exact_quadrature(seed):
    """d = 2, r = 1: B = (cos θ, sin θ) with θ uniform. e(θ) and e(θ)² are trigonometric
    polynomials of degree ≤ 4, which the 16-point equally spaced rule integrates exactly."""
    target = Target.from_gram("g", random_psd(2, seed))
    thetas = [2 * math.pi * k / 16 + 0.1 for k in range(16)]
    bases = [torch.tensor([[math.cos(t)], [math.sin(t)]], dtype=DT) for t in thetas]
    mean, var = _quadrature_moments(target, bases)
    got = scoring.null_moments(target, 1)
    assert got[0] == pytest.approx(mean, rel=EXACT)
    assert got[1] == pytest.approx(var, rel=1e-10)  # a variance of terms ~1: cancellation to ~1e-14
    assert var > 1e-4  # not a degenerate (isotropic) case


def _icosahedron() -> list[torch.Tensor]:
    phi = (1 + math.sqrt(5)) / 2
    pts = []
    for a, b in itertools.product((-1.0, 1.0), (-phi, phi)):
        for v in ((0.0, a, b), (a, b, 0.0), (b, 0.0, a)):
            pts.append(torch.tensor(v, dtype=DT) / math.sqrt(1 + phi**2))
    return pts


@pytest.mark.parametrize("seed", range(3))
def test_null_moments_in_3d_equal_the_icosahedral_design(seed):
    """d = 3: the 12 vertices of the icosahedron are a spherical 5-design (their mean of any
    polynomial of degree ≤ 5 is its mean over the sphere). e(u)² is of degree 4, so the design
    gives the exact mean and variance for r = 1, and through u's orthogonal complement (a uniform
    plane) for r = 2."""
    target = Target.from_gram("g", random_psd(3, seed))
    lines = [u[:, None] for u in _icosahedron()]
    planes = [linalg.project_away(torch.eye(3, dtype=DT), u) for u in lines]
    for r, bases in ((1, lines), (2, planes)):
        assert all(B.shape == (3, r) for B in bases)
        mean, var = _quadrature_moments(target, bases)
        got = scoring.null_moments(target, r)
        assert got[0] == pytest.approx(mean, rel=EXACT)
        assert got[1] == pytest.approx(var, rel=1e-10)
        assert var > 1e-4


def test_null_moments_at_d_1_and_the_rank_range():
    """d = 1: the only rank-1 basis is the whole line (mean 1, variance 0); r outside [0, d] is an
    error, r = 0 and r = d are not."""
    one = Target.from_gram("one", diag(2.0))
    assert scoring.null_moments(one, 0) == (0.0, 0.0)
    assert scoring.null_moments(one, 1) == (1.0, 0.0)
    t = Target.from_gram("g", diag(3.0, 1.0, 0.0, 0.0))
    assert scoring.null_moments(t, 0) == (0.0, 0.0)
    assert scoring.null_moments(t, 4) == (1.0, 0.0)
    for r in (-1, 5):
        with pytest.raises(InputError, match="outside"):
            scoring.null_moments(t, r)


def test_isotropic_spread_pinned():
    """G = [[2, 1], [1, 0]]: t = 2, G − I = [[1, 1], [1, −1]], ‖·‖²_F / t² = 4/4 = 1; and
    diag(3, 1, 0, 0): t = 4, G − I = diag(2, 0, −1, −1), 6/16."""
    assert scoring.isotropic_spread(torch.tensor([[2.0, 1.0], [1.0, 0.0]], dtype=DT), 2.0) == pytest.approx(1.0, rel=EXACT)
    assert scoring.isotropic_spread(diag(3.0, 1.0, 0.0, 0.0), 4.0) == pytest.approx(6 / 16, rel=EXACT)
    assert scoring.isotropic_spread(torch.eye(5, dtype=DT) * 2, 10.0) == 0.0


# ----------------------------------------------------------------------------- one pinned target

# G = diag(3, 1, 0, 0), t = 4: e(e1) = 3/4, e(e2) = 1/4; spread = 6/16; Var[e] at r = 1 is
# 2·1·3/(4·3·6)·6/16 = 1/32, so z(e1) = (3/4 − 1/4)·√32 = 2√2 and z(e2) = 0.
PINNED = diag(3.0, 1.0, 0.0, 0.0)


def test_every_score_field_of_a_pinned_target():
    t = Target.from_gram("g", PINNED)
    s = scoring.score(t, e(4, 0))
    assert (s.rank, s.energy, s.oracle_energy) == (1, 0.75, 0.75)
    assert s.concentration == pytest.approx(3.0, rel=EXACT)
    assert s.z == pytest.approx(2 * math.sqrt(2), rel=EXACT)
    assert s.pct_oracle == pytest.approx(100.0, rel=EXACT)
    assert s.gain == pytest.approx(1.0, rel=EXACT)
    s = scoring.score(t, e(4, 1))
    assert s.concentration == pytest.approx(1.0, rel=EXACT)
    assert s.z == pytest.approx(0.0, abs=EXACT)
    assert s.pct_oracle == pytest.approx(100 / 3, rel=EXACT)
    # rank 2, [e1 e3]: e = 3/4, r/d = 1/2, e_max(2) = 1, Var = 2·2·2/(4·3·6)·6/16 = 1/24
    s = scoring.score(t, e(4, 0, 2))
    assert (s.rank, s.energy, s.oracle_energy) == (2, 0.75, 1.0)
    assert s.concentration == pytest.approx(1.5, rel=EXACT)
    assert s.z == pytest.approx(0.25 * math.sqrt(24), rel=EXACT)
    assert s.pct_oracle == pytest.approx(75.0, rel=EXACT)
    assert s.gain == pytest.approx(0.5, rel=EXACT)


def test_rank_zero_score_is_all_nan_but_rank_energy_and_oracle():
    s = scoring.score_energy(Target.from_gram("g", PINNED), 0, 0.0)
    assert (s.rank, s.energy, s.oracle_energy) == (0, 0.0, 0.0)
    assert all(math.isnan(x) for x in (s.concentration, s.z, s.pct_oracle, s.gain))


def test_score_at_d_1():
    s = scoring.score(Target.from_gram("one", diag(2.0)), torch.ones(1, 1, dtype=DT))
    assert (s.rank, s.energy, s.concentration, s.oracle_energy, s.pct_oracle) == (1, 1.0, 1.0, 1.0, 100.0)
    assert math.isnan(s.z) and math.isnan(s.gain)


def test_oracle_gain_isotropic_threshold_is_relative_to_max_of_e_max_and_one():
    """The gain is NaN where the attainable excess e_max − null mean is at most ISOTROPIC_TOL ×
    max(e_max, 1): round-off of the Ky Fan sum, not an excess. Excesses are powers of two so that
    e_max − mean is exact (2⁻⁴⁰ ≈ 0.91e-12, 2⁻³⁸ ≈ 3.6e-12, 2⁻³⁶ ≈ 14.6e-12)."""
    assert scoring.ISOTROPIC_TOL == 1e-12
    assert math.isnan(scoring.oracle_gain(0.6, 0.5, 0.5 + 2.0**-40))  # ≤ 1e-12 · 1
    assert scoring.oracle_gain(0.5 + 2.0**-40, 0.5, 0.5 + 2.0**-38) == 0.25
    assert scoring.oracle_gain(0.5 + 2.0**-40, 0.5, 0.5 + 2.0**-39) == 0.5  # 1.8e-12 > 1e-12 · 1
    assert math.isnan(scoring.oracle_gain(0.5e-12, 0.0, 1e-12))  # at the threshold itself: NaN
    assert math.isnan(scoring.oracle_gain(5.0, 4.0, 4.0 + 2.0**-38))  # ≤ 1e-12 · 4
    assert scoring.oracle_gain(4.0 + 2.0**-38, 4.0, 4.0 + 2.0**-36) == 0.25
    assert scoring.oracle_gain(0.5, 0.25, 0.75) == 0.5
    assert scoring.oracle_gain(0.0, 0.25, 0.75) == -0.5


# ----------------------------------------------------------------------------- Target


def test_from_gram_symmetrises_and_stores_trace_and_spread():
    t = Target.from_gram("g", torch.tensor([[2.0, 2.0], [0.0, 0.0]], dtype=DT))
    assert torch.equal(t.gram, torch.tensor([[2.0, 1.0], [1.0, 0.0]], dtype=DT))
    assert (t.trace, t.spread, t.d, t.factor, t.noise_floor) == (2.0, 1.0, 2, None, 0.0)
    assert t.gram.dtype == DT


@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (3,), (2, 2, 2)])
def test_non_square_gram_is_a_clear_error(shape):
    with pytest.raises(InputError, match="square"):
        Target.from_gram("g", torch.ones(shape, dtype=DT))


def test_negative_trace_is_a_clear_error():
    with pytest.raises(InputError, match="zero"):
        Target.from_gram("g", diag(-1.0, 0.5))


def test_zero_label_rows_are_named():
    rows = torch.ones(3, 4, dtype=DT)
    rows[1] = 0.0
    with pytest.raises(InputError, match=r"rows \[1\] are zero"):
        Target.from_rows("act", rows)
    with pytest.raises(InputError, match=r"label rows \(none\) are zero"):
        Target.from_rows("act", torch.zeros(0, 4, dtype=DT))
    with pytest.raises(InputError, match=r"rows \[0\] are zero"):
        Target.from_rows("act", torch.zeros(1, 4, dtype=DT))
    with pytest.raises(InputError, match=r"rows \[0, 1\] are zero"):
        Target.from_rows("act", torch.zeros(2, 0, dtype=DT))  # zero-width rows: every row is zero


def test_zero_tensor_of_a_balanced_target_is_named():
    with pytest.raises(InputError, match="c/down_proj"):
        Target.balanced("c", {"o_proj": torch.ones(4, 4), "down_proj": torch.zeros(4, 8)})
    with pytest.raises(InputError, match="c/1"):
        Target.balanced("c", [torch.ones(4, 4), torch.zeros(4, 8)])
    with pytest.raises(InputError, match="no tensors"):
        Target.combine("c", [])


def test_activation_target_keeps_its_factor_only_below_d_rows():
    gen = torch.Generator().manual_seed(0)
    for n, kept in ((1, True), (3, True), (5, False), (9, False)):
        rows = torch.randn(n, 5, generator=gen, dtype=DT)
        t = Target.from_rows("act", rows)
        assert (t.factor is not None) is kept, n
        assert t.name == "act"
        if kept:
            assert t.factor.shape == (5, n)
            torch.testing.assert_close(t.factor @ t.factor.T, t.gram, rtol=0, atol=1e-15)
        unit = rows / rows.norm(dim=1, keepdim=True)
        torch.testing.assert_close(t.gram, unit.T @ unit / n, rtol=0, atol=1e-15)
        assert t.trace == pytest.approx(1.0, rel=EXACT)


def test_one_row_label():
    """n = 1: G = u uᵀ/‖u‖² (rank 1, from a 1-column factor); its oracle is ±u/‖u‖ at any rank."""
    t = Target.from_rows("act", torch.tensor([[3.0, 4.0, 0.0]], dtype=DT))
    u = torch.tensor([[0.6], [0.8], [0.0]], dtype=DT)
    assert t.factor.shape == (3, 1)
    torch.testing.assert_close(t.eigenvalues(), torch.ones(1, dtype=DT), rtol=0, atol=1e-15)
    assert t.numerical_rank() == 1 and t.rank(3) == 1 and t.rank(0) == 0
    evals, evecs = t.spectrum(3)
    torch.testing.assert_close(evals, torch.tensor([1.0, 0.0, 0.0], dtype=DT), rtol=0, atol=1e-15)
    torch.testing.assert_close(evecs, u, rtol=0, atol=1e-15)
    torch.testing.assert_close(t.oracle_basis(2), u, rtol=0, atol=1e-15)
    s = scoring.score(t, t.oracle_basis(2))
    assert s.energy == pytest.approx(1.0, rel=EXACT) and s.gain == pytest.approx(1.0, rel=EXACT)
    assert scoring.row_fractions(torch.tensor([[3.0, 4.0, 0.0]], dtype=DT), e(3, 1)).tolist() == pytest.approx([0.64], rel=EXACT)


def test_combine_is_the_sum_of_trace_normalised_grams():
    gs = [random_psd(4, s) for s in range(3)]
    ts = [Target.from_gram(f"g{i}", g, noise_floor=0.5 * (i + 1)) for i, g in enumerate(gs)]
    c = Target.combine("c", ts)
    torch.testing.assert_close(c.gram, sum(g / torch.trace(g) for g in gs), rtol=1e-14, atol=0)
    assert c.trace == pytest.approx(3.0, rel=EXACT)
    assert c.noise_floor == pytest.approx(sum(0.5 * (i + 1) / float(torch.trace(g)) for i, g in enumerate(gs)), rel=EXACT)


def test_balanced_mapping_and_sequence_agree():
    gen = torch.Generator().manual_seed(1)
    o, down = torch.randn(5, 5, generator=gen, dtype=DT), torch.randn(5, 15, generator=gen, dtype=DT)
    a = Target.balanced("c", {"o_proj": o, "down_proj": down})
    b = Target.balanced("c", [o, down])
    assert a.name == b.name == "c"
    torch.testing.assert_close(a.gram, b.gram, rtol=0, atol=0)
    torch.testing.assert_close(a.gram, o @ o.T / (o**2).sum() + down @ down.T / (down**2).sum(), rtol=1e-14, atol=0)


def test_restrict_is_the_compression_in_the_subspace_coordinates():
    t = Target.from_gram("g", random_psd(5, 2))
    S = haar(5, 2, 3)
    inner = t.restrict(S)
    assert inner.name == "g|S" and t.restrict(S, name="x").name == "x"
    torch.testing.assert_close(inner.gram, S.T @ t.gram @ S, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(("dtype", "u"), [
    (torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11), (torch.float32, 2.0**-24), (torch.float64, 2.0**-53),
])
def test_unit_roundoff_of_each_storage_format(dtype, u):
    assert scoring.unit_roundoff(dtype) == u


# ----------------------------------------------------------------------------- spectrum, ranks


def planted(d: int = 6, seed: int = 0) -> torch.Tensor:
    """Q diag(5, 3, 2, 0, …) Qᵀ, t = 10: Ky Fan energies 0.5, 0.8, 1.0 at ranks 1, 2, 3."""
    Q = haar(d, d, seed)
    s = torch.zeros(d, dtype=DT)
    s[:3] = torch.tensor([5.0, 3.0, 2.0], dtype=DT)
    return Q @ torch.diag(s) @ Q.T


def test_oracle_of_a_planted_rank_reaches_the_ky_fan_value():
    t = Target.from_gram("g", planted())
    ky_fan = [0.0, 0.5, 0.8, 1.0, 1.0, 1.0, 1.0]
    for r in (1, 4, 2, 6, 3, 0, 5):  # in no particular order: the cache must not matter
        assert t.rank(r) == min(r, 3), r
        B = t.oracle_basis(r)
        assert B.shape == (6, min(r, 3))
        assert t.oracle_energy(r) == pytest.approx(ky_fan[r], rel=EXACT, abs=EXACT)
        assert scoring.energy(t, B) == pytest.approx(ky_fan[r], rel=EXACT, abs=EXACT)
        if r:
            assert scoring.score(t, B).gain == pytest.approx(1.0, rel=1e-9)
    assert t.numerical_rank() == 3


def test_rank_capped_at_r_grows_with_r_on_a_fresh_target():
    """rank(r) asks for a spectrum of size r: a rank-3 target has rank(2) = 2, not 1."""
    for r, want in ((2, 2), (3, 3), (5, 3)):
        assert Target.from_gram("g", planted()).rank(r) == want


def _spectrum_close(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Well-separated eigenvalues (gaps ≥ 1 of 10): eigenvectors are determined to ~1e-15; two
    # LAPACK subset solves of different size agree to round-off, not bit for bit.
    assert a[0].shape == b[0].shape and a[1].shape == b[1].shape
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "factored"])
def test_spectrum_grown_in_steps_equals_a_fresh_one(kind):
    gen = torch.Generator().manual_seed(3)
    if kind == "dense":
        Q = haar(7, 7, 4)
        make = lambda: Target.from_gram("g", Q @ diag(8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5) @ Q.T)  # noqa: E731
    else:
        rows = torch.randn(4, 7, generator=gen, dtype=DT) * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DT)[:, None]
        make = lambda: Target.from_rows("act", rows)  # noqa: E731
    grown = make()
    assert (grown.factor is not None) == (kind == "factored")
    for k in (1, 2, 5, 7, 3, 9, 0):
        _spectrum_close(grown.spectrum(k), make().spectrum(k))
        assert grown.spectrum(k)[0].shape == (min(k, 7),)
    assert grown.spectrum(-1)[0].shape == (0,) and grown.spectrum(-1)[1].shape == (7, 0)


def test_spectrum_is_computed_once_per_size():
    t = Target.from_gram("g", planted())
    tops, values = [], []
    real_top, real_values = linalg.SymmetricEigen.top, linalg.SymmetricEigen.values
    with mock.patch.object(linalg.SymmetricEigen, "top", lambda self, *a, **k: tops.append(a) or real_top(self, *a, **k)), \
            mock.patch.object(linalg.SymmetricEigen, "values", lambda self: values.append(1) or real_values(self)):
        t.spectrum(3)
        t.spectrum(2)
        t.spectrum(3)
        t.oracle_basis(1)
        assert tops == [(3,)]
        t.spectrum(4)
        assert tops == [(3,), (4,)]
        t.eigenvalues()
        t.numerical_rank()
        assert len(values) == 1


def test_shared_reductions_reduce_each_target_once_with_the_same_bits():
    """Inside ``shared_reductions`` a target's spectra at several k and its eigenvalues come from
    one tridiagonal reduction, bit-identical to fresh solves; the reduction is gone after the
    block (also when it raises) and a target with a factor is not given one."""
    if linalg.gil_free_syevr_steps(np.float64) is None:
        pytest.skip("SciPy without a bundled OpenBLAS: every request is a whole syevr (see QUARANTINES.md)")
    g = torch.Generator().manual_seed(5)
    M = torch.randn(60, 3, generator=g, dtype=DT) @ torch.randn(3, 90, generator=g, dtype=DT)
    fresh = [Target.from_matrix("w", M) for _ in range(3)]
    want = (fresh[0].spectrum(2), fresh[1].spectrum(5), fresh[2].eigenvalues())
    t = Target.from_matrix("w", M)
    act = Target.from_rows("act", torch.randn(4, 60, generator=g, dtype=DT))
    calls = []
    real = linalg._SyevrSteps.reduce
    with mock.patch.object(linalg._SyevrSteps, "reduce", lambda self, A: calls.append(A.shape) or real(self, A)):
        with scoring.shared_reductions([t, act]):
            got = (t.spectrum(2), t.spectrum(5), t.eigenvalues())
            assert "eigen" in t._spectrum and "eigen" not in act._spectrum
            act.spectrum(3)
    assert calls == [(60, 60), (4, 4)] and "eigen" not in t._spectrum  # the act target: its 4 x 4 kernel
    for (a, A), (b, B) in zip(got[:2], want[:2]):
        assert torch.equal(a, b) and torch.equal(A, B)
    assert torch.equal(got[2], want[2])
    with pytest.raises(RuntimeError, match="inside"):
        with scoring.shared_reductions([t]):
            raise RuntimeError("inside")
    assert "eigen" not in t._spectrum


def test_factored_spectrum_pads_zero_eigenvalues_and_only_determined_vectors():
    """n = 2 orthonormal rows in d = 6: G = (u₁u₁ᵀ + u₂u₂ᵀ)/2, eigenvalues ½, ½, 0, …; only the two
    eigenvectors of the nonzero eigenvalues are determined, and the kernel gives exactly m = 2
    values."""
    U = haar(6, 2, 5)
    t = Target.from_rows("act", U.T)
    with mock.patch.object(linalg, "top_eigh_rows", wraps=linalg.top_eigh_rows) as kernel_side:
        evals, evecs = t.spectrum(4)
        assert kernel_side.call_count == 1
    torch.testing.assert_close(evals, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=DT), rtol=0, atol=1e-15)
    assert evecs.shape == (6, 2)
    assert linalg.principal_cosines(evecs, U).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    torch.testing.assert_close(t.eigenvalues(), torch.tensor([0.5, 0.5], dtype=DT), rtol=0, atol=1e-15)
    dense = Target.from_gram("dense", t.gram)
    torch.testing.assert_close(dense.eigenvalues()[:2], t.eigenvalues(), rtol=0, atol=1e-14)
    assert dense.eigenvalues().shape == (6,)


def test_eigenvalues_are_clipped_at_zero():
    """An indefinite input (t = 1.5 > 0 is all from_gram checks) has its negative eigenvalue
    reported as 0, in the spectrum and in the values-only list."""
    t = Target.from_gram("g", diag(2.0, -0.5))
    assert t.spectrum(2)[0].tolist() == [2.0, 0.0]
    assert t.eigenvalues().tolist() == [2.0, 0.0]


def test_numerical_rank_thresholds_are_strict():
    """An eigenvalue AT the storage noise floor, or at RANK_TOL × the largest, is rounding, not a
    direction (diagonal Grams: LAPACK returns the diagonal exactly)."""
    assert Target.from_gram("g", diag(1.0, 0.25, 2.0**-10, 0.0), noise_floor=0.25).numerical_rank() == 1
    assert Target.from_gram("g", diag(1.0, 0.25, 2.0**-10, 0.0), noise_floor=0.2).numerical_rank() == 2
    assert Target.from_gram("g", diag(1.0, 0.25, 2.0**-10, 0.0)).numerical_rank() == 3
    tol = linalg.RANK_TOL
    assert Target.from_gram("g", diag(1.0, tol, 0.0)).numerical_rank() == 1
    assert Target.from_gram("g", diag(1.0, 2 * tol, 0.0)).numerical_rank() == 2
    assert Target.from_gram("g", diag(1.0, 0.25, 2.0**-10, 0.0), noise_floor=0.25).rank(4) == 1
    assert Target.from_gram("g", diag(2.0, 1.0, tol, 0.0)).rank(4) == 2


def test_factored_oracle_spans_the_top_eigenspace():
    """The n x n kernel route gives the same oracle as the dense Gram for n < d rows."""
    gen = torch.Generator().manual_seed(6)
    rows = torch.randn(3, 8, generator=gen, dtype=DT) * torch.tensor([3.0, 2.0, 1.0], dtype=DT)[:, None]
    t = Target.from_rows("act", rows)
    dense = Target.from_gram("dense", t.gram)
    for r in (1, 2, 3, 5):
        assert t.rank(r) == dense.rank(r) == min(r, 3)
        cos = linalg.principal_cosines(t.oracle_basis(r), dense.oracle_basis(r))
        assert cos.tolist() == pytest.approx([1.0] * min(r, 3), abs=1e-10)


# ----------------------------------------------------------------------------- energies


def test_energies_of_empty_and_mixed_bases():
    t = Target.from_gram("g", PINNED)
    assert scoring.energies(t, []).shape == (0,)
    assert scoring.energies(t, [linalg.empty_basis(4), linalg.empty_basis(4)]).tolist() == [0.0, 0.0]
    got = scoring.energies(t, [e(4, 0), linalg.empty_basis(4), e(4, 1, 2), e(4, 0, 1)])
    assert got.tolist() == pytest.approx([0.75, 0.0, 0.25, 1.0], rel=EXACT, abs=EXACT)
    with pytest.raises(InputError, match="rows"):
        scoring.energies(t, [e(4, 0), torch.ones(4, dtype=DT)])


def test_row_fractions_pinned():
    """‖Bᵀu_i‖²/‖u_i‖² per row, whatever the row's scale; their mean is the activation energy."""
    rows = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0], [1.0, 1.0, 1.0]], dtype=DT)
    B = e(3, 0, 2)
    got = scoring.row_fractions(rows, B)
    assert got.tolist() == pytest.approx([9 / 25, 1.0, 2 / 3], rel=EXACT)
    assert float(got.mean()) == pytest.approx(scoring.energy(Target.from_rows("act", rows), B), rel=EXACT)


# ----------------------------------------------------------------------------- restricted nulls


def test_restricted_moments_pinned():
    """G = diag(3, 1, 0, 0) (t = 4) inside S:
    - S = [e1 e2]: G_S = diag(3, 1), ratio 1, spread (1 + 1)/16 = 1/8: mean 1/2, Var
      2·1·1/(2·1·4)·1/8 = 1/32 (by hand: e = (1 + 2cos²θ)/4, Var[cos²θ] = 1/8);
    - S = [e2 e3]: G_S = diag(1, 0), ratio 1/4, spread 1/2: mean 1/8, Var (1/4)(1/2)/16 = 1/128;
    - r = D: mean tr(G_S)/t, variance 0; r > D or r = 0: undefined."""
    t = Target.from_gram("g", PINNED)
    a = RestrictedNull.inside(t, e(4, 0, 1))
    assert (a.dim, a.trace_s) == (2, 4.0) and a.spread_s == pytest.approx(1 / 8, rel=EXACT)
    assert a.moments(1) == pytest.approx((0.5, 1 / 32), rel=EXACT)
    assert a.moments(2) == (1.0, 0.0)
    assert a.moments(0) is None and a.moments(3) is None
    b = RestrictedNull.inside(t, e(4, 1, 2))
    assert b.moments(1) == pytest.approx((1 / 8, 1 / 128), rel=EXACT)
    assert b.moments(2) == (0.25, 0.0)
    assert b.z_of(1, 1 / 4) == pytest.approx((1 / 4 - 1 / 8) / math.sqrt(1 / 128), rel=EXACT)
    assert b.z(e(4, 1)) == pytest.approx((1 / 4 - 1 / 8) / math.sqrt(1 / 128), rel=EXACT)
    assert scoring.restricted_z(t, e(4, 1), e(4, 1, 2)) == b.z(e(4, 1))
    assert math.isnan(b.z_of(2, 0.25)) and math.isnan(b.z_of(3, 0.25))


def test_restricted_null_of_an_asymmetric_round_off_compression_is_symmetrised():
    """Sᵀ G S of a rotated S is symmetric only to round-off; the spread is the one of its
    symmetric part (a rotation of the pinned case: same moments)."""
    t = Target.from_gram("g", PINNED)
    R = haar(2, 2, 9)
    rotated = RestrictedNull.inside(t, e(4, 0, 1) @ R)
    assert rotated.moments(1) == pytest.approx((0.5, 1 / 32), rel=1e-12)


def test_one_column_restriction():
    """D = 1: the only rank-1 subspace of S is S itself: mean e(S), variance 0, z undefined."""
    t = Target.from_gram("g", PINNED)
    one = RestrictedNull.inside(t, e(4, 0))
    assert (one.dim, one.trace_s, one.spread_s) == (1, 3.0, 0.0)
    assert one.moments(1) == (0.75, 0.0)
    assert math.isnan(one.z(e(4, 0)))


def test_subspace_where_the_target_vanishes_or_is_empty():
    t = Target.from_gram("g", PINNED)
    vanishing = RestrictedNull.inside(t, e(4, 2, 3))
    assert (vanishing.dim, vanishing.trace_s, vanishing.spread_s) == (2, 0.0, 0.0)
    assert vanishing.moments(1) is None and math.isnan(vanishing.z(e(4, 2)))
    empty = RestrictedNull.inside(t, linalg.empty_basis(4))
    assert (empty.dim, empty.trace_s, empty.spread_s) == (0, 0.0, 0.0)
    assert empty.target is t and vanishing.target is t
    assert empty.moments(1) is None


def test_top_eigenspace_pinned():
    """diag(3, 1, 0, 0), D = 3: G_S has eigenvalues 3, 1, 0 (t_S = 4, mean 4/3), spread
    ((5/3)² + (1/3)² + (4/3)²)/16 = 7/24: the same as inside(S = [e1 e2 e3]); D = 0 is empty; D
    outside [0, d] is an error."""
    t = Target.from_gram("g", PINNED)
    top = RestrictedNull.top_eigenspace(t, 3)
    assert (top.dim, top.trace_s) == (3, 4.0) and top.spread_s == pytest.approx(7 / 24, rel=EXACT)
    assert top.moments(2) == pytest.approx(RestrictedNull.inside(t, e(4, 0, 1, 2)).moments(2), rel=EXACT)
    zero = RestrictedNull.top_eigenspace(t, 0)
    assert (zero.dim, zero.trace_s, zero.spread_s) == (0, 0.0, 0.0) and zero.moments(1) is None
    assert zero.target is t and top.target is t
    one = RestrictedNull.top_eigenspace(t, 1)  # the top eigenvector alone: e(e1) = 3/4, no spread
    assert (one.dim, one.trace_s, one.spread_s) == (1, 3.0, 0.0) and one.moments(1) == (0.75, 0.0)
    full = RestrictedNull.top_eigenspace(t, 4)
    assert full.spread_s == pytest.approx(t.spread, rel=EXACT)
    for dim in (-1, 5):
        with pytest.raises(InputError, match="outside"):
            RestrictedNull.top_eigenspace(t, dim)


def test_top_eigenspace_of_a_factored_target_counts_the_zeros_past_its_kernel():
    """Two orthonormal rows in d = 6: eigenvalues ½, ½ from the 2 x 2 kernel; D = 4 adds two
    zeros: t_S = 1, spread (2·(¼)² + 2·(¼)²)/1 = ¼, as for any 4-dimensional S containing them."""
    U = haar(6, 2, 5)
    t = Target.from_rows("act", U.T)
    assert t.factor is not None and t.eigenvalues().shape == (2,)
    top = RestrictedNull.top_eigenspace(t, 4)
    assert top.trace_s == pytest.approx(1.0, rel=EXACT) and top.spread_s == pytest.approx(0.25, rel=EXACT)
    S = linalg.union(U, haar(6, 2, 6))
    inside = RestrictedNull.inside(t, S)
    assert inside.spread_s == pytest.approx(0.25, rel=1e-10)
    assert top.moments(1) == pytest.approx(inside.moments(1), rel=1e-10)


# ----------------------------------------------------------------------------- seeded functions


def test_stable_seed_is_crc32_of_the_joined_parts():
    """CRC-32 (IEEE) of "123456789" is the standard check value 0xCBF43926; the seed keeps its
    low 31 bits. Parts are joined with the unit separator \\x1f, so ("1234", "56789") differs."""
    assert scoring.stable_seed("123456789") == 0xCBF43926 & 0x7FFFFFFF == 0x4BF43926
    assert scoring.stable_seed(1234, "56789") == zlib.crc32(b"1234\x1f56789") & 0x7FFFFFFF
    assert scoring.stable_seed(1234, "56789") != scoring.stable_seed("123456789")
    assert scoring.stable_seed() == 0  # CRC-32 of the empty string


def test_monte_carlo_null_is_the_unbiased_sample_moments_of_its_seeded_draws():
    t = Target.from_gram("g", random_psd(5, 7))
    draws = scoring.random_energies(t, 2, 50, torch.Generator().manual_seed(11))
    mean, var = scoring.monte_carlo_null(t, 2, 50, seed=11)
    assert mean == pytest.approx(float(draws.sum()) / 50, rel=EXACT)
    assert var == pytest.approx(float(((draws - draws.mean()) ** 2).sum()) / 49, rel=1e-10)
    Bs = linalg.random_orthonormal(5, 2, torch.Generator().manual_seed(11), batch=50)
    assert draws.tolist() == pytest.approx([scoring.energy(t, B) for B in Bs], rel=1e-12)


def test_the_monte_carlo_null_is_drawn_once_per_rank_and_seed_on_a_target(monkeypatch):
    """Kept on the target: a second candidate of the same rank reads the same (mean, variance) as a
    fresh target's draws, bit for bit, without drawing again; another rank or seed draws anew."""
    gram = random_psd(6, 3)
    t = Target.from_gram("g", gram)
    calls = []
    real = scoring.random_energies
    monkeypatch.setattr(scoring, "random_energies", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    first = scoring.monte_carlo_null(t, 2, 40, seed=5)
    assert scoring.monte_carlo_null(t, 2, 40, seed=5) == first and calls == [(2, 40)]
    assert scoring.monte_carlo_null(Target.from_gram("g", gram), 2, 40, seed=5) == first
    assert scoring.monte_carlo_null(t, 3, 40, seed=5) != first and scoring.monte_carlo_null(t, 2, 40, seed=6) != first
    assert calls == [(2, 40), (2, 40), (3, 40), (2, 40)]
    B = linalg.orthonormalize(torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert scoring.mc_score_z(t, B, 40, seed=5) == scoring._z(scoring.energy(t, B), *first)
    assert len(calls) == 4


def test_random_energies_inside_a_subspace_use_bases_drawn_in_its_coordinates():
    t = Target.from_gram("g", random_psd(6, 8))
    S = haar(6, 3, 2)
    draws = scoring.random_energies(t, 2, 7, torch.Generator().manual_seed(4), S=S)
    Bs = linalg.random_orthonormal(3, 2, torch.Generator().manual_seed(4), batch=7)
    assert draws.tolist() == pytest.approx([scoring.energy(t, S @ B) for B in Bs], rel=1e-12)


def test_mc_score_z_standardises_against_its_seeded_null():
    t = Target.from_gram("g", random_psd(6, 9))
    B = haar(6, 2, 1)
    mean, var = scoring.monte_carlo_null(t, 2, 300, seed=5)
    assert scoring.mc_score_z(t, B, 300, seed=5) == pytest.approx((scoring.energy(t, B) - mean) / math.sqrt(var), rel=EXACT)
    assert math.isnan(scoring.mc_score_z(t, linalg.empty_basis(6), 300, seed=5))
    b = haar(6, 1, 2)  # rank 1 is a rank like any other
    mean1, var1 = scoring.monte_carlo_null(t, 1, 300, seed=5)
    assert scoring.mc_score_z(t, b, 300, seed=5) == pytest.approx((scoring.energy(t, b) - mean1) / math.sqrt(var1), rel=EXACT)
    # 4000 draws: the sample SD is within ~3% (5 standard errors of √(1/(2n))·√(1 + κ/2)) and the
    # sample mean within 5·SD/√n of the exact ones, so the MC z is within ~5% + 0.08 of the exact z
    exact = scoring.score(t, B).z
    assert scoring.mc_score_z(t, B, 4000, seed=5) == pytest.approx(exact, rel=0.05, abs=0.08)


def test_random_orthonormal_is_the_sign_fixed_qr_of_the_seeded_gaussian():
    """Q with X = QR and diag(R) > 0 for X = randn(d, r) from the seeded generator: QᵀX is upper
    triangular with a positive diagonal. The same for each matrix of a batch."""
    X = torch.randn(5, 3, generator=torch.Generator().manual_seed(42), dtype=DT)
    Q = linalg.random_orthonormal(5, 3, torch.Generator().manual_seed(42))
    R = Q.T @ X
    torch.testing.assert_close(torch.tril(R, -1), torch.zeros(3, 3, dtype=DT), rtol=0, atol=1e-14)
    assert bool((torch.diagonal(R) > 0).all())
    torch.testing.assert_close(Q @ R, X, rtol=0, atol=1e-14)
    Xb = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(43), dtype=DT)
    Qb = linalg.random_orthonormal(5, 3, torch.Generator().manual_seed(43), batch=4)
    assert Qb.shape == (4, 5, 3)
    for k in range(4):
        Rk = Qb[k].T @ Xb[k]
        torch.testing.assert_close(torch.tril(Rk, -1), torch.zeros(3, 3, dtype=DT), rtol=0, atol=1e-14)
        assert bool((torch.diagonal(Rk) > 0).all())


# ----------------------------------------------------------------------------- bootstrap


def _reference_bootstrap(V: torch.Tensor, n_boot: int, seed: int, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same resamples by indexing: n prompts drawn with replacement from all n, per resample."""
    n = V.shape[1]
    idx = torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    means = V[:, idx].mean(dim=-1)  # (m, n_boot)
    a = (1 - level) / 2
    return torch.quantile(means, a, dim=1), torch.quantile(means, 1 - a, dim=1)


@pytest.mark.parametrize("level", [0.95, 0.5])
def test_bootstrap_interval_is_the_percentile_interval_of_the_seeded_resamples(level):
    V = torch.randn(3, 9, generator=torch.Generator().manual_seed(0), dtype=DT)
    lo, hi = scoring.bootstrap_mean_ci(V, 400, seed=7, level=level)
    want_lo, want_hi = _reference_bootstrap(V, 400, 7, level)
    torch.testing.assert_close(lo, want_lo, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hi, want_hi, rtol=1e-12, atol=1e-14)
    assert bool((lo < hi).all())


def test_bootstrap_resamples_every_prompt():
    """Row j = indicator of prompt j: its resampled mean is (times prompt j was drawn)/n, which is
    0 in about (1 − 1/n)ⁿ ≈ 35% of resamples, so the 95% upper bound is > 0 for every prompt
    (0 for a prompt never drawn), and a constant row's interval is the constant."""
    n = 6
    V = torch.cat([torch.eye(n, dtype=DT), torch.full((1, n), 2.5, dtype=DT)])
    lo, hi = scoring.bootstrap_mean_ci(V, 300, seed=1)
    assert bool((hi[:n] > 0).all()), hi
    assert bool((lo[:n] == 0).all())
    assert float(lo[n]) == pytest.approx(2.5, rel=EXACT) and float(hi[n]) == pytest.approx(2.5, rel=EXACT)


def test_bootstrap_nan_rows_and_input_errors():
    V = torch.randn(2, 5, generator=torch.Generator().manual_seed(2), dtype=DT)
    V[1, 3] = float("nan")
    lo, hi = scoring.bootstrap_mean_ci(V, 50, seed=0)
    assert math.isnan(float(lo[1])) and math.isnan(float(hi[1]))
    assert not math.isnan(float(lo[0])) and float(lo[0]) <= float(hi[0])
    assert scoring.bootstrap_mean_ci(V[:, :2], 1, seed=0)[0].shape == (2,)  # the smallest valid case
    for bad in (dict(values=V[:, :1], n_boot=10), dict(values=V, n_boot=0)):
        with pytest.raises(InputError, match="bootstrap needs"):
            scoring.bootstrap_mean_ci(bad["values"], bad["n_boot"], seed=0)
