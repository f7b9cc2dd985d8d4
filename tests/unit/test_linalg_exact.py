"""Exact values and boundaries of the basis operations (issue 18).

Small inputs whose answer is known in closed form: the bisector of two planted planes, the
tolerance boundaries of orthonormalize and top_eigvecs at exactly representable values, the
float32 solve's accuracy, empty bases. Tolerances: round-off of a few float64 operations unless
a comment says otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from subspace_sweep import linalg
from tests.strategies import DT, haar


def diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=DT))


def e(d: int, *cols: int) -> torch.Tensor:
    return torch.eye(d, dtype=DT)[:, list(cols)]


def orthonormality_error(B: torch.Tensor) -> float:
    return float((B.T @ B - torch.eye(B.shape[1], dtype=DT)).abs().max())


# ----------------------------------------------------------------------------- signs, orthonormality


def test_fix_signs_makes_the_largest_entry_positive_first_on_ties():
    B = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, -2.0, 0.0]], dtype=DT)
    assert linalg.fix_signs(B).tolist() == [[1.0, 1.0, -0.5, 0.0], [-1.0, -1.0, 2.0, 0.0]]
    assert linalg.fix_signs(linalg.empty_basis(3)).shape == (3, 0)


def test_is_orthonormal_uses_its_tolerance():
    B = e(3, 0, 1).clone()
    assert linalg.is_orthonormal(B, 0.0)
    B[0, 1] = 1e-3
    assert not linalg.is_orthonormal(B)  # default 1e-4
    assert linalg.is_orthonormal(B, 1e-3)
    assert linalg.is_orthonormal(linalg.empty_basis(3))
    assert not linalg.is_orthonormal(2 * e(3, 0))


def test_as64_and_empty_basis():
    x = torch.ones(2, 3, dtype=torch.float32, requires_grad=True)
    y = linalg.as64(x)
    assert y.dtype == DT and not y.requires_grad and y.device.type == "cpu"
    assert linalg.empty_basis(4).shape == (4, 0) and linalg.empty_basis(4).dtype == DT


# ----------------------------------------------------------------------------- orthonormalize

TOL = 2.0**-20  # a power of two: tol · norm is exact, so the boundaries below are exact


def test_orthonormalize_drops_a_column_negligible_against_the_largest():
    """Kept iff its norm is ABOVE tol × the largest column norm (here 2: scale matters)."""
    at = linalg.orthonormalize(torch.cat([2 * e(3, 0), 2 * TOL * e(3, 1)], dim=1), tol=TOL)
    above = linalg.orthonormalize(torch.cat([2 * e(3, 0), 4 * TOL * e(3, 1)], dim=1), tol=TOL)
    assert at.shape == (3, 1) and above.shape == (3, 2)
    torch.testing.assert_close(above, e(3, 0, 1), rtol=0, atol=0)


def test_orthonormalize_drops_a_column_dependent_on_earlier_ones_relative_to_its_own_norm():
    """Kept iff its residual is ABOVE tol × its own norm: a small column (1/8 of the largest) with
    residual TOL/8 is dependent, one with residual 2·TOL/8 is not."""
    col = lambda r: (e(3, 0) + r * e(3, 1)) / 8  # noqa: E731 ; norm ≈ 1/8, residual r/8
    dep = linalg.orthonormalize(torch.cat([e(3, 0), col(0.5 * TOL)], dim=1), tol=TOL)
    indep = linalg.orthonormalize(torch.cat([e(3, 0), col(2 * TOL)], dim=1), tol=TOL)
    assert dep.shape == (3, 1) and indep.shape == (3, 2)
    torch.testing.assert_close(indep, e(3, 0, 1), rtol=0, atol=1e-15)


def test_orthonormalize_dependency_boundary_is_exact():
    """Column (4, 3) after 5·e0 (tol 0.6, scale 5): residual 3 = 0.6 × its norm 5 exactly (0.6·5
    rounds to 3.0): at the tolerance is dependent."""
    M = torch.tensor([[5.0, 4.0], [0.0, 3.0], [0.0, 0.0]], dtype=DT)
    assert float(torch.tensor(0.6, dtype=DT) * 5.0) == 3.0
    assert linalg.orthonormalize(M, tol=0.6).shape == (3, 1)
    assert linalg.orthonormalize(M, tol=0.59).shape == (3, 2)


def test_orthonormalize_reorthogonalises_nearly_dependent_columns():
    """Columns 1e-5 apart: one Gram-Schmidt pass leaves a component along the first of ~ε/1e-5 ≈
    1e-11; the second pass brings it to round-off (< 1e-14)."""
    Q = haar(6, 2, 1)
    a, b = Q[:, 0], Q[:, 1]
    M = torch.stack([a + 0.3 * b, a + (0.3 + 1e-5) * b, a - b], dim=1)
    B = linalg.orthonormalize(M)
    assert B.shape == (6, 2)
    assert orthonormality_error(B) < 1e-14


def test_orthonormalize_empty_and_zero_inputs():
    assert linalg.orthonormalize(linalg.empty_basis(4)).shape == (4, 0)
    assert linalg.orthonormalize(torch.zeros(4, 3, dtype=DT)).shape == (4, 0)
    assert linalg.orthonormalize(torch.cat([torch.zeros(4, 1, dtype=DT), 3 * e(4, 2)], dim=1)).tolist() == e(4, 2).tolist()


# ----------------------------------------------------------------------------- eigensolver


def test_top_eigh_pinned_on_a_diagonal():
    G = diag(1.0, 4.0, 2.0, 3.0)
    vals, vecs = linalg.top_eigh(G, 2)
    assert vals.tolist() == [4.0, 3.0] and vecs.tolist() == e(4, 1, 3).tolist()
    vals, vecs = linalg.top_eigh(G, 2, largest=False)
    assert vals.tolist() == [1.0, 2.0] and vecs.tolist() == e(4, 0, 2).tolist()
    vals, vecs = linalg.top_eigh(G, 9)
    assert vals.tolist() == [4.0, 3.0, 2.0, 1.0] and vecs.shape == (4, 4)
    for k in (0, -1):
        vals, vecs = linalg.top_eigh(G, k)
        assert vals.shape == (0,) and vecs.shape == (4, 0) and vecs.dtype == DT
    bad = G.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="^matrix has NaN/Inf entries$"):
        linalg.top_eigh(bad, 2)
    with pytest.raises(ValueError, match="^matrix has NaN/Inf entries$"):
        linalg.eigenvalues(bad)


def _spread_spectrum_gram(d: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    Q = haar(d, d, seed)
    s = torch.logspace(0, -3, d, dtype=DT)
    return Q @ torch.diag(s) @ Q.T, s


def test_float64_solve_is_accurate_to_float64_and_the_float32_one_to_float32():
    """eigenvalues of a float64 solve agree with eigvalsh to ~1e-15 of the largest; a float32
    solve (single=True) only to ~1e-7, but its vectors are re-orthonormalised in float64 (to
    ~1e-15, not float32's ~1e-7) and span the same top eigenspace to float32 accuracy."""
    G, s = _spread_spectrum_gram()
    vals64, vecs64 = linalg.top_eigh(G, 5)
    vals32, vecs32 = linalg.top_eigh(G, 5, single=True)
    assert float((vals64 - s[:5]).abs().max()) < 1e-13
    assert 1e-10 < float((vals32 - s[:5]).abs().max()) < 1e-5
    assert vals32.dtype == vecs32.dtype == DT
    assert orthonormality_error(vecs64) < 1e-13
    assert orthonormality_error(vecs32) < 1e-13
    cos = linalg.principal_cosines(vecs32, vecs64)
    assert float((1 - cos).abs().max()) < 1e-5
    # each float32 vector stays on the side of its float64 counterpart (signs fixed, order kept)
    assert bool(((vecs32 * vecs64).sum(0) > 0.99).all())


def test_top_eigvecs_passes_its_options_to_the_solver():
    """top_eigvecs is top_eigh's vectors (bit for bit) with the null directions dropped, for the
    float32 solve and for the bottom directions too."""
    G, _ = _spread_spectrum_gram(12, 5)
    for kwargs in ({}, {"single": True}, {"largest": False}, {"largest": False, "single": True}):
        assert torch.equal(linalg.top_eigvecs(G, 4, **kwargs), linalg.top_eigh(G, 4, **kwargs)[1]), kwargs
    assert not torch.equal(linalg.top_eigvecs(G, 4, single=True), linalg.top_eigvecs(G, 4))


def test_top_eigvecs_tolerance_is_relative_and_strict():
    """Eigenvalues at or below rel_tol × the largest are dropped (2⁻¹⁰: exact on a diagonal)."""
    G = diag(1.0, 2.0**-10, 2.0**-9, 0.0)
    assert linalg.top_eigvecs(G, 4, rel_tol=2.0**-10).tolist() == e(4, 0, 2).tolist()
    assert linalg.top_eigvecs(2 * G, 4, rel_tol=2.0**-10).shape == (4, 2)  # relative to the largest
    assert linalg.top_eigvecs(G, 4).shape == (4, 3)
    assert linalg.top_eigvecs(G, 4, largest=False).shape == (4, 4)  # bottom directions all kept
    assert linalg.top_eigvecs(torch.zeros(3, 3, dtype=DT), 2).shape == (3, 0)
    assert linalg.top_eigvecs(-torch.eye(3, dtype=DT), 2).shape == (3, 0)
    assert linalg.top_eigvecs(G, 0).shape == (4, 0)


def test_numerical_rank_is_strict_and_relative():
    assert linalg.numerical_rank(diag(1.0, 2.0**-10, 0.0), rel_tol=2.0**-10) == 1
    assert linalg.numerical_rank(diag(1.0, 2.0**-9, 0.0), rel_tol=2.0**-10) == 2
    assert linalg.numerical_rank(diag(4.0, 2.0**-9, 0.0), rel_tol=2.0**-10) == 1
    assert linalg.numerical_rank(torch.zeros(3, 3, dtype=DT)) == 0
    assert linalg.numerical_rank(-torch.eye(3, dtype=DT)) == 0
    assert linalg.numerical_rank(diag(1.0, 1e-9, 1e-11)) == 2  # default RANK_TOL = 1e-10


def test_eigenvalues_are_all_of_them_ascending():
    G, s = _spread_spectrum_gram(12, 3)
    vals = linalg.eigenvalues(G)
    assert vals.shape == (12,) and vals.dtype == DT
    torch.testing.assert_close(vals, s.flip(0), rtol=0, atol=1e-14)


def test_scipy_fallback_gives_the_same_pairs(monkeypatch):
    """Where SciPy's bundled OpenBLAS is absent, ``_syevr`` uses SciPy's own wrapper of the same
    LAPACK routine: same eigenpairs (to round-off) and all eigenvalues for ``vectors=False``."""
    G, _ = _spread_spectrum_gram(10, 4)
    with_binding = linalg.top_eigh(G, 3), linalg.top_eigh(G, 3, largest=False), linalg.eigenvalues(G)
    single = linalg.top_eigh(G, 3, single=True)
    for cache in (linalg._SYEVR, linalg._STEPS):
        monkeypatch.setitem(cache, "float64", None)
        monkeypatch.setitem(cache, "float32", None)
    fallback = linalg.top_eigh(G, 3), linalg.top_eigh(G, 3, largest=False), linalg.eigenvalues(G)
    for (va, Va), (vb, Vb) in zip(with_binding[:2], fallback[:2]):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-14)
        torch.testing.assert_close(Va, Vb, rtol=0, atol=1e-12)
    torch.testing.assert_close(with_binding[2], fallback[2], rtol=0, atol=1e-14)
    single_fb = linalg.top_eigh(G, 3, single=True)
    torch.testing.assert_close(single[0], single_fb[0], rtol=0, atol=1e-6)


def test_gil_free_binding_is_found_and_passes_its_self_check(monkeypatch):
    """A SciPy wheel bundles its OpenBLAS in ``scipy.libs``; there the ctypes syevr must be found
    and pass its one-time check against SciPy, for both real types, or every eigenproblem silently
    falls back to the GIL-holding wrapper (no parallel speed-up). Both caches are emptied first so
    that the lookup and the check run here."""
    import os

    import scipy

    if not os.path.isdir(os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")):
        pytest.skip("SciPy without a bundled OpenBLAS (e.g. conda on MKL): no binding to check (see QUARANTINES.md)")
    monkeypatch.setattr(linalg, "_OPENBLAS", [])
    monkeypatch.setattr(linalg, "_SYEVR", {})
    assert linalg.scipy_openblas() is not None
    for real in (np.float64, np.float32):
        binding = linalg.gil_free_syevr(real)
        assert binding is not None, real
        A = (np.diag(np.arange(1.0, 5.0)) + 0.25).astype(real)
        w, z = binding(A, 2, 4)
        w_ref, z_ref = np.linalg.eigh(A)
        np.testing.assert_allclose(w, w_ref[1:], rtol=1e-5)
        np.testing.assert_allclose(np.abs(z), np.abs(z_ref[:, 1:]), atol=1e-5)
        np.testing.assert_allclose(binding(A, 1, 4, vectors=False)[0], w_ref, rtol=1e-5)
    assert linalg.gil_free_syevr(np.float64) is linalg._SYEVR["float64"]  # checked once, then cached
    # and a request the steps do not serve (all n pairs) goes through it
    calls = []
    binding = linalg._SYEVR["float64"]
    monkeypatch.setitem(linalg._SYEVR, "float64", lambda *a, **k: calls.append(a[1:]) or binding(*a, **k))
    linalg.top_eigh(torch.eye(3, dtype=DT), 3)
    assert calls == [(1, 3)]


# ----------------------------------------------------------------------------- syevr's steps, one reduction


def _steps_subjects(real) -> list[tuple[str, np.ndarray]]:
    """Symmetric matrices of the kinds the sweep solves: a dense one, a low-rank PSD Gram with
    round-off-sized noise (a weight target), one with a split tridiagonal (two diagonal blocks:
    syevr's closing sort), one with a repeated eigenvalue, the zero matrix, and orders on both sides of ?sytrd's
    blocked code."""
    rng = np.random.default_rng(7)
    out = []
    for n in (2, 5, 33, 200, 600):
        X = rng.standard_normal((n, n))
        out.append((f"dense{n}", (X + X.T) / 2))
    F = rng.standard_normal((400, 12))
    N = 1e-17 * rng.standard_normal((400, 400))
    out.append(("lowrank400", F @ F.T + (N + N.T) / 2))
    B = np.zeros((40, 40))
    B[:20, :20] = np.diag(np.linspace(1.0, 3.0, 20)) + 0.01
    B[20:, 20:] = np.diag(np.linspace(5.0, 0.5, 20)) + 0.02
    out.append(("split40", B))
    Q = np.linalg.qr(rng.standard_normal((50, 50)))[0]
    out.append(("repeated50", (Q * np.r_[np.full(10, 2.0), np.linspace(0.1, 1.0, 40)]) @ Q.T))
    out.append(("zero30", np.zeros((30, 30))))
    return [(name, np.ascontiguousarray(((A + A.T) / 2).astype(real))) for name, A in out]


def _signed(z: np.ndarray) -> np.ndarray:
    """syevr's vectors as ``top_eigh`` returns them: float64, signs fixed."""
    return linalg.fix_signs(torch.from_numpy(np.array(z, dtype=np.float64, order="C"))).numpy()


@pytest.mark.parametrize("real", [np.float64, np.float32])
def test_syevr_steps_give_syevr_bits_for_every_request_on_one_reduction(real):
    """``SymmetricEigen`` answers a sequence of requests on ONE tridiagonal reduction (top 1,
    top k, all values, bottom k, top k again); each must be the one-shot syevr call's result
    bit for bit, values and vectors, or the sweep's outputs would change with the sharing."""
    syevr = linalg.gil_free_syevr(real)
    if syevr is None:
        pytest.skip("SciPy without a bundled OpenBLAS: no steps to check (see QUARANTINES.md)")
    steps = linalg.gil_free_syevr_steps(real)
    assert steps is not None, "syevr's steps failed their self-check: every request would reduce again"
    single = real is np.float32
    for name, A in _steps_subjects(real):
        n = A.shape[0]
        solver = linalg.SymmetricEigen(torch.from_numpy(A.astype(np.float64)), single=single)
        for k, largest in ((1, True), (min(16, n - 1), True), (None, None), (min(5, n - 1), False),
                           (min(16, n - 1), True), (min(40, n - 1), True)):
            if k is None:
                got = solver.values().numpy()
                want = syevr(A, 1, n, vectors=False)[0].astype(np.float64)
                assert np.array_equal(got, want), (name, "values")
                continue
            lo, hi = (n - k + 1, n) if largest else (1, k)
            w, z = syevr(A, lo, hi)
            if largest:
                w, z = w[::-1], z[:, ::-1]
            ev, V = solver.top(k, largest=largest)
            assert np.array_equal(ev.numpy(), w.astype(np.float64)), (name, k, largest)
            if not single:  # float32 vectors are re-orthonormalised in float64 after the solve
                assert np.array_equal(V.numpy(), _signed(z)), (name, k)
        assert len(solver._reduced) == 1 and (solver._reduced[0] is not None) == (n >= 2), name


def test_symmetric_eigen_reduces_once_and_top_eigh_once_per_call(monkeypatch):
    """The point of the steps: one ?sytrd per matrix however many requests; a one-shot
    ``top_eigh`` or ``eigenvalues`` reduces once too (no second solve hidden anywhere)."""
    if linalg.gil_free_syevr(np.float64) is None:
        pytest.skip("SciPy without a bundled OpenBLAS: no steps (see QUARANTINES.md)")
    steps = linalg.gil_free_syevr_steps(np.float64)
    assert steps is not None
    calls = []
    sytrd = steps.fns["sytrd"]
    monkeypatch.setitem(steps.fns, "sytrd", lambda *a: calls.append(1) or sytrd(*a))
    whole = []  # requests that went to syevr itself instead
    monkeypatch.setattr(linalg, "_syevr", lambda *a, **k: whole.append(a[1:]))
    G, _ = _spread_spectrum_gram(30, 5)
    solver = linalg.SymmetricEigen(G)
    solver.top(4), solver.values(), solver.top(9), solver.top(2, largest=False), solver.values()
    assert len(calls) == 1
    linalg.top_eigh(G, 3)
    linalg.eigenvalues(G)
    assert len(calls) == 3 and whole == []


def test_symmetric_eigen_input_checks_dtypes_and_empty_requests():
    """A non-square matrix is refused with its shape; a float64 matrix is not copied before the
    reduction (a d x d copy each at 4B shapes); values are float64 also from a float32 solve; k = 0
    (or below) is an empty float64 answer without a solve."""
    with pytest.raises(ValueError, match=r"square matrix, got shape \(3, 4\)"):
        linalg.SymmetricEigen(torch.zeros(3, 4, dtype=DT))
    with pytest.raises(ValueError, match=r"square matrix, got shape \(4,\)"):
        linalg.SymmetricEigen(torch.zeros(4, dtype=DT))
    with pytest.raises(ValueError, match="NaN/Inf"):
        linalg.SymmetricEigen(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=DT))
    G, s = _spread_spectrum_gram(9, 2)
    solver = linalg.SymmetricEigen(G)
    assert solver.d == 9 and np.shares_memory(solver._A, G.numpy())
    single = linalg.SymmetricEigen(G, single=True)
    assert single._A.dtype == np.float32 and single.values().dtype == DT
    torch.testing.assert_close(single.values(), s.flip(0), rtol=0, atol=1e-6)
    for k in (0, -2):
        evals, evecs = linalg.top_eigh(G, k)
        assert evals.shape == (0,) and evals.dtype == DT and evecs.shape == (9, 0) and evecs.dtype == DT


def test_symmetric_eigen_leaves_syevr_what_its_steps_cannot_copy():
    """All n pairs (syevr's MRRR route), a matrix syevr would rescale first (largest entry below
    its rmin ~1e-146) and order 1 are solved by syevr itself: same results as the one-shot call."""
    syevr = linalg.gil_free_syevr(np.float64)
    if syevr is None:
        pytest.skip("SciPy without a bundled OpenBLAS (see QUARANTINES.md)")
    G, _ = _spread_spectrum_gram(8, 3)
    for M in (G, G * 1e-160, G[:1, :1]):
        solver = linalg.SymmetricEigen(M)
        n = M.shape[0]
        w, z = syevr(M.numpy(), 1, n)
        ev, V = solver.top(n)
        assert np.array_equal(ev.numpy(), w[::-1])
        assert np.array_equal(V.numpy(), _signed(z[:, ::-1]))
        assert np.array_equal(solver.values().numpy(), syevr(M.numpy(), 1, n, vectors=False)[0])
    assert linalg.SymmetricEigen(G * 1e-160)._reduction() is None  # rescaling: not the steps
    assert linalg.SymmetricEigen(G)._reduction() is not None


def test_symmetric_eigen_serialises_requests_from_threads():
    """?ormtr writes into the reflectors (and restores them): two threads asking one solver at once
    must still get what serial requests get."""
    from concurrent.futures import ThreadPoolExecutor

    G, _ = _spread_spectrum_gram(300, 40)
    serial = [linalg.SymmetricEigen(G).top(k) for k in (3, 20, 7, 31)]
    solver = linalg.SymmetricEigen(G)
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(solver.top, (3, 20, 7, 31)))
    for (a, A), (b, B) in zip(serial, parallel):
        assert torch.equal(a, b) and torch.equal(A, B)


def test_steps_that_fail_their_self_check_are_not_used(monkeypatch):
    """A LAPACK whose syevr takes other steps (another version) must not be imitated: the
    self-check against syevr rejects the steps and every request is a whole syevr."""
    if linalg.gil_free_syevr(np.float64) is None:
        pytest.skip("SciPy without a bundled OpenBLAS (see QUARANTINES.md)")
    monkeypatch.setattr(linalg, "_STEPS", {})
    real_pairs = linalg._SyevrSteps.pairs

    def off_by_one_ulp(self, red, il, iu):
        w, z = real_pairs(self, red, il, iu)
        return np.nextafter(w, np.inf), z

    monkeypatch.setattr(linalg._SyevrSteps, "pairs", off_by_one_ulp)
    assert linalg.gil_free_syevr_steps(np.float64) is None
    G, _ = _spread_spectrum_gram(10, 4)
    w, z = linalg.gil_free_syevr(np.float64)(G.numpy(), 8, 10)
    assert np.array_equal(linalg.SymmetricEigen(G).top(3)[0].numpy(), w[::-1])


# ----------------------------------------------------------------------------- Grams


def test_symmetric_block_gram_equals_the_plain_product(monkeypatch):
    """With the block threshold lowered to 2 the recursion splits a 7-wide X three levels deep;
    every block must land where Xᵀ X has it."""
    X = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=DT)
    monkeypatch.setattr(linalg, "SYM_BLOCK_MIN", 2)
    torch.testing.assert_close(linalg._sym_gram(X), X.T @ X, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(linalg.row_gram(X), X @ X.T, rtol=1e-14, atol=1e-14)


def test_row_and_col_gram_of_half_precision_are_float64():
    X = torch.randn(6, 9, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = X.double()
    for got, want in ((linalg.row_gram(X), ref @ ref.T), (linalg.col_gram(X), ref.T @ ref)):
        assert got.dtype == DT
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # products in float32
    assert linalg.col_gram(torch.zeros(0, 3)).tolist() == torch.zeros(3, 3).tolist()


def test_projector_and_project_out():
    B = e(3, 0)
    assert linalg.projector(B).tolist() == diag(1.0, 0.0, 0.0).tolist()
    M = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=DT)
    assert linalg.project_out(B, M).tolist() == [[0.0, 0.0], [3.0, 4.0], [5.0, 6.0]]
    assert linalg.project_out(linalg.empty_basis(3), M).tolist() == M.tolist()
    G = M @ M.T
    assert linalg.project_out_gram(linalg.empty_basis(3), G).tolist() == G.tolist()
    P = linalg.project_out(B, M)
    torch.testing.assert_close(linalg.project_out_gram(B, G), P @ P.T, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- PCA


def test_pca_pinned():
    """Rows ±(1, 0, 0)·3 and ±(0, 1, 0): after centring the top axis is e1 (variance 9 > 1)."""
    X = torch.tensor([[3.0, 0, 0], [-3.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]], dtype=DT) + 7.0
    B = linalg.pca(X, 3)
    assert B.shape == (3, 2)
    torch.testing.assert_close(B, e(3, 0, 1), rtol=0, atol=1e-14)
    assert linalg.pca(X, 0).shape == (3, 0)
    assert linalg.pca(X[:1], 2).shape == (3, 0)  # one row: nothing to centre against
    assert linalg.pca(X[:2], 2).shape == (3, 1)  # two rows: one direction


def test_top_eigh_rows_kernel_and_gram_sides_pinned():
    """Rows 2·e1 and e2 (n = 2 < d = 4, the kernel side) and the same rows repeated (n = 4 ≥ d,
    the Gram side): eigenvalues 4, 1 (8, 2), eigenvectors e1, e2; a caller's kernel is used."""
    X = torch.stack([2 * e(4, 0)[:, 0], e(4, 1)[:, 0]])
    vals, vecs = linalg.top_eigh_rows(X, 3)
    assert vals.tolist() == pytest.approx([4.0, 1.0], abs=1e-15) and vecs.tolist() == e(4, 0, 1).tolist()
    vals, vecs = linalg.top_eigh_rows(torch.cat([X, X]), 3)
    assert vals.tolist() == pytest.approx([8.0, 2.0, 0.0], abs=1e-14)
    torch.testing.assert_close(vecs, e(4, 0, 1), rtol=0, atol=1e-15)
    vals, _ = linalg.top_eigh_rows(X, 2, kernel=3 * X @ X.T)
    assert vals.tolist() == pytest.approx([12.0, 3.0], abs=1e-14)
    # an eigenvalue at RANK_TOL × the largest has no eigenvector (a diagonal kernel: exact values)
    vals, vecs = linalg.top_eigh_rows(X, 2, kernel=torch.diag(torch.tensor([1.0, linalg.RANK_TOL], dtype=DT)))
    assert vals.tolist() == [1.0, linalg.RANK_TOL] and vecs.shape == (4, 1)
    assert linalg.top_eigh_rows(X[:0], 2)[1].shape == (4, 0)
    assert linalg.top_eigh_rows(X, 0)[1].shape == (4, 0)
    assert linalg.top_eigh_rows(torch.zeros(2, 4, dtype=DT), 2)[1].shape == (4, 0)
    assert linalg.weighted_pca_rows(X + 1.0, 1).shape == (4, 1)  # not centred: the offset counts


# ----------------------------------------------------------------------------- subspaces


def test_union_and_project_away_of_empty_bases():
    assert linalg.union(linalg.empty_basis(5), linalg.empty_basis(5)).shape == (5, 0)
    assert linalg.union(linalg.empty_basis(5)).shape == (5, 0)
    assert linalg.union(linalg.empty_basis(5), e(5, 2)).tolist() == e(5, 2).tolist()
    assert linalg.union(e(5, 1), e(5, 1), e(5, 3)).tolist() == e(5, 1, 3).tolist()  # earlier first
    assert linalg.project_away(linalg.empty_basis(5), e(5, 0)).shape == (5, 0)
    assert linalg.project_away(e(5, 0, 1), linalg.empty_basis(5)).tolist() == e(5, 0, 1).tolist()


def test_project_away_judges_each_column_by_its_own_norm():
    """Not by the matrix's: a column mostly inside F (1e-7 of it outside, below ORTHO_TOL) is
    dropped however large the other projected columns are, and a unit column outside F is kept
    however large the columns that vanish."""
    F = e(4, 0)
    got = linalg.project_away(torch.cat([100 * (e(4, 0) + 1e-7 * e(4, 1)), e(4, 2)], dim=1), F)
    torch.testing.assert_close(got, e(4, 2), rtol=0, atol=0)
    got = linalg.project_away(torch.cat([1e6 * e(4, 0), e(4, 1)], dim=1), F)
    torch.testing.assert_close(got, e(4, 1), rtol=0, atol=0)


def test_project_away_at_the_tolerance_drops_the_column():
    """A column whose projection is exactly ORTHO_TOL × its norm is dependent (c found as the fixed
    point of c = ORTHO_TOL·‖e0 + c·e1‖, asserted)."""
    c = 0.0
    for _ in range(3):
        c = linalg.ORTHO_TOL * float((e(3, 0) + c * e(3, 1)).norm())
    col = e(3, 0) + c * e(3, 1)
    assert float(linalg.project_out(e(3, 0), col).norm()) == linalg.ORTHO_TOL * float(col.norm())
    assert linalg.project_away(col, e(3, 0)).shape == (3, 0)
    assert linalg.project_away(e(3, 0) + 2 * c * e(3, 1), e(3, 0)).shape == (3, 1)


def test_project_away_keeps_a_small_column_with_a_real_component():
    """The drop is relative to the column's own norm: a column of norm 1e-3 with half of it outside
    F is kept (normalised); 1e-7 of it outside is below ORTHO_TOL and dropped."""
    F = e(4, 0)
    kept = linalg.project_away(1e-3 * (e(4, 0) + e(4, 1)) / math.sqrt(2), F)
    torch.testing.assert_close(kept, e(4, 1), rtol=0, atol=1e-12)
    assert linalg.project_away(e(4, 0) + 1e-7 * e(4, 1), F).shape == (4, 0)


def test_principal_cosines_pinned():
    a = e(3, 0)
    b = (e(3, 0) + e(3, 1)) / math.sqrt(2)
    assert linalg.principal_cosines(a, b).tolist() == pytest.approx([1 / math.sqrt(2)], rel=1e-15)
    assert linalg.principal_cosines(e(3, 0, 1), e(3, 1, 2)).tolist() == pytest.approx([1.0, 0.0], abs=1e-15)
    for empty in (linalg.principal_cosines(a, linalg.empty_basis(3)), linalg.principal_cosines(linalg.empty_basis(3), a)):
        assert empty.shape == (0,) and empty.dtype == DT
    # clamped into [0, 1]: a basis scaled past unit length still reports cosine 1
    assert linalg.principal_cosines(a, 1.5 * a).tolist() == [1.0]


def test_bisector_of_planted_principal_pairs():
    """A = span(e1, e2), B = span(cos α e1 + sin α e3, cos β e2 + sin β e4), α < β: the principal
    pairs are (e1, b1) with cosine cos α and (e2, b2) with cos β; the bisectors are
    (e1 + b1)/‖·‖ = cos(α/2) e1 + sin(α/2) e3 and cos(β/2) e2 + sin(β/2) e4, most aligned first.
    Rotating each basis within its span must not change them."""
    alpha, beta = 0.3, 1.1
    b1 = math.cos(alpha) * e(5, 0) + math.sin(alpha) * e(5, 2)
    b2 = math.cos(beta) * e(5, 1) + math.sin(beta) * e(5, 3)
    want = torch.cat([math.cos(alpha / 2) * e(5, 0) + math.sin(alpha / 2) * e(5, 2),
                      math.cos(beta / 2) * e(5, 1) + math.sin(beta / 2) * e(5, 3)], dim=1)
    A, B = e(5, 0, 1), torch.cat([b2, b1], dim=1)
    for RA, RB in ((torch.eye(2, dtype=DT), torch.eye(2, dtype=DT)), (haar(2, 2, 1), haar(2, 2, 2))):
        basis, cos = linalg.bisector(A @ RA, B @ RB, 5)
        assert cos.tolist() == pytest.approx([math.cos(alpha), math.cos(beta)], rel=1e-12)
        torch.testing.assert_close(basis, want, rtol=0, atol=1e-12)
        basis1, cos1 = linalg.bisector(A @ RA, B @ RB, 1)
        torch.testing.assert_close(basis1, want[:, :1], rtol=0, atol=1e-12)
        assert cos1.tolist() == pytest.approx([math.cos(alpha)], rel=1e-12)
    for args in ((A, linalg.empty_basis(5), 2), (linalg.empty_basis(5), B, 2), (A, B, 0), (A, B, -1)):
        basis, cos = linalg.bisector(*args)
        assert basis.shape == (5, 0) and cos.shape == (0,) and cos.dtype == DT
    # cosines are reported in [0, 1] even for a basis scaled past unit length
    assert linalg.bisector(A, 1.5 * A, 2)[1].tolist() == [1.0, 1.0]


def test_signed_qr_keeps_each_column_on_its_side():
    X = torch.tensor([[-2.0, 1.0], [0.0, 3.0], [0.0, 0.0]], dtype=DT)
    Q = linalg.signed_qr(X)
    torch.testing.assert_close(Q, torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=DT), rtol=0, atol=1e-15)
    Z = linalg.signed_qr(torch.zeros(3, 1, dtype=DT))  # R = 0: the sign 0 counts as +1, Q stays orthonormal
    assert orthonormality_error(Z) < 1e-15


@pytest.mark.parametrize("d", [0, 1, 2, 7, 600])
def test_packed_symmetric_matrices_unpack_bit_for_bit(d):
    """The A-side keeps each scored layer's write Gram packed (issue 16): the round trip is exact,
    the packed form is half the size, and a matrix that is not exactly symmetric is kept whole."""
    A = torch.randn(d, 2 * d + 1, generator=torch.Generator().manual_seed(d), dtype=DT)
    G = A @ A.T
    G = (G + G.T) / 2
    P = linalg.pack_symmetric(G)
    assert P.shape == (d * (d + 1) // 2,)
    assert torch.equal(linalg.unpack_symmetric(P, d), G)
    if d > 1:
        N = G.clone()
        N[0, 1] += 1.0
        assert linalg.pack_symmetric(N) is N and linalg.unpack_symmetric(N, d) is N
        with pytest.raises(ValueError, match=rf"a packed symmetric {d} x {d} matrix has {d * (d + 1) // 2} values, "
                                             rf"got {d * (d + 1) // 2 - 1}$"):
            linalg.unpack_symmetric(P[1:], d)


def test_pack_symmetric_keeps_what_is_not_a_symmetric_matrix():
    for M in (torch.arange(3.0), torch.zeros(2, 3), torch.zeros(2, 2, 2)):
        assert linalg.pack_symmetric(M) is M
