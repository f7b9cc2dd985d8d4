"""Every basis operation returns orthonormal columns of the declared (numerical) rank."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from subspace_sweep import linalg
from tests.strategies import DT, haar, low_rank_matrices

TOL = 1e-8


def assert_basis(B: torch.Tensor, d: int, rank: int) -> None:
    assert B.dtype == DT
    assert B.shape == (d, rank)
    assert linalg.is_orthonormal(B, TOL)
    assert torch.isfinite(B).all()


def maxabs(X: torch.Tensor) -> float:
    return float(X.abs().max()) if X.numel() else 0.0


def span_contains(big: torch.Tensor, small: torch.Tensor, tol: float = 1e-6) -> bool:
    """span(small) ⊆ span(big)."""
    return bool((small - big @ (big.T @ small)).norm() <= tol * max(1.0, small.norm()))


@given(low_rank_matrices(), st.integers(1, 30))
def test_left_and_right_bases_have_rank_min_r_k(mk, r):
    M, k = mk
    d, n = M.shape
    L = linalg.left_basis(M, r)
    assert_basis(L, d, min(r, k))
    assert span_contains(linalg.orthonormalize(M), L)
    R = linalg.right_basis(M.T, r)  # right singular vectors of Mᵀ are M's left ones
    assert_basis(R, d, min(r, k))
    if 0 < min(r, k) and min(r, k) == k:
        assert span_contains(L, linalg.orthonormalize(M))


@given(low_rank_matrices())
def test_left_basis_is_the_top_singular_subspace(mk):
    M, k = mk
    if k < 2:
        return
    r = k - 1
    U, s, _ = torch.linalg.svd(M, full_matrices=False)
    if s[r - 1] - s[r] < 1e-3 * s[0]:  # degenerate gap: the top-r subspace is not unique
        return
    L = linalg.left_basis(M, r)
    cos = linalg.principal_cosines(L, U[:, :r])
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)


@given(st.integers(3, 20), st.integers(0, 6), st.integers(0, 2**31 - 1), st.integers(1, 10))
def test_orthonormalize_reveals_rank_and_preserves_order(d, extra, seed, k):
    k = min(k, d)
    Q = haar(d, k, seed)
    coeffs = torch.randn(k, extra, generator=torch.Generator().manual_seed(seed), dtype=DT)
    M = torch.cat([Q * 3.0, Q @ coeffs], dim=1)  # the extra columns are dependent
    B = linalg.orthonormalize(M)
    assert_basis(B, d, k)
    # order-preserving: the first j kept columns span the first j input columns
    for j in range(1, k + 1):
        assert span_contains(B[:, :j], Q[:, :j])


@given(st.integers(3, 20), st.integers(0, 2**31 - 1), st.data())
def test_pca_rank_is_bounded_by_rows_minus_one(d, seed, data):
    n = data.draw(st.integers(1, 2 * d))
    k = data.draw(st.integers(1, d))
    r = data.draw(st.integers(1, d))
    X = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=DT) @ haar(d, k, seed + 1).T
    X = X + 5.0  # a common offset that centring must remove
    B = linalg.pca(X, r)
    expect = min(r, k, max(n - 1, 0))
    assert_basis(B, d, expect)
    Xc = X - X.mean(0)
    if expect == min(k, n - 1):  # the whole centred row space is captured
        assert span_contains(B, linalg.orthonormalize(Xc.T), 1e-6)


@given(st.integers(4, 20), st.integers(0, 2**31 - 1), st.data())
def test_union_and_project_away(d, seed, data):
    a = data.draw(st.integers(0, d // 2))
    b = data.draw(st.integers(0, d // 2))
    overlap = data.draw(st.integers(0, min(a, b)))
    Q = haar(d, a + b - overlap, seed) if a + b - overlap else torch.zeros(d, 0, dtype=DT)
    A = linalg.orthonormalize(Q[:, :a])
    B = linalg.orthonormalize(Q[:, a - overlap : a - overlap + b]) if b else torch.zeros(d, 0, dtype=DT)
    U = linalg.union(A, B)
    assert_basis(U, d, a + b - overlap)
    PA = linalg.project_away(B, A)
    assert_basis(PA, d, b - overlap)
    assert maxabs(A.T @ PA) <= 1e-8


@given(st.integers(3, 20), st.integers(0, 2**31 - 1), st.data())
def test_project_out_gram_is_gram_of_projected_matrix(d, seed, data):
    f = data.draw(st.integers(0, d))
    n = data.draw(st.integers(1, 2 * d))
    F = haar(d, f, seed) if f else torch.zeros(d, 0, dtype=DT)
    M = torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    P = linalg.project_out(F, M)
    assert torch.allclose(linalg.project_out_gram(F, M @ M.T), P @ P.T, atol=1e-9 * (1 + (M @ M.T).abs().max()))


@given(st.integers(4, 20), st.integers(0, 2**31 - 1), st.data())
def test_bisector_returns_orthonormal_basis_and_principal_cosines(d, seed, data):
    a = data.draw(st.integers(1, d // 2))
    b = data.draw(st.integers(1, d // 2))
    r = data.draw(st.integers(1, d))
    A, B = haar(d, a, seed), haar(d, b, seed + 1)
    basis, cos = linalg.bisector(A, B, r)
    k = min(r, a, b)
    assert cos.shape == (k,)
    assert bool(((cos >= 0) & (cos <= 1)).all())
    assert torch.allclose(cos, linalg.principal_cosines(A, B)[:k], atol=1e-10)
    assert_basis(basis, d, k)  # a_i + b_i is never 0 for cosines ≥ 0 between unit vectors of different subspaces
    # each bisector direction makes equal angles with both subspaces
    assert torch.allclose((A.T @ basis).norm(dim=0), (B.T @ basis).norm(dim=0), atol=1e-8)


@given(st.integers(1, 20), st.integers(0, 2**31 - 1), st.data())
def test_top_eigvecs_drops_null_directions(d, seed, data):
    k = data.draw(st.integers(0, d))
    r = data.draw(st.integers(1, d))
    Q = haar(d, d, seed)
    s = torch.zeros(d, dtype=DT)
    s[:k] = torch.linspace(1.0, 2.0, k, dtype=DT) if k else s[:0]
    G = Q @ torch.diag(s) @ Q.T
    assert_basis(linalg.top_eigvecs(G, r), d, min(r, k))
    assert_basis(linalg.top_eigvecs(G, r, largest=False), d, r)


@given(st.integers(2, 30), st.integers(0, 30), st.integers(0, 2**31 - 1))
def test_random_orthonormal_is_seeded_and_orthonormal(d, r, seed):
    r = min(r, d)
    B1 = linalg.random_orthonormal(d, r, torch.Generator().manual_seed(seed))
    B2 = linalg.random_orthonormal(d, r, torch.Generator().manual_seed(seed))
    assert torch.equal(B1, B2)
    assert_basis(B1, d, r)


@given(st.integers(3, 20), st.integers(0, 2**31 - 1), st.data())
def test_project_away_a_spanned_basis_is_empty(d, seed, data):
    """Round-off left after projecting B away from a superset of its span is not a direction."""
    k = data.draw(st.integers(1, d))
    F = haar(d, k, seed)
    j = data.draw(st.integers(1, k))
    B = F @ haar(k, j, seed + 1)  # orthonormal, inside span(F)
    assert linalg.project_away(B, F).shape[1] == 0
    assert linalg.project_away(B * 1e-6, F).shape[1] == 0  # the tolerance is relative to B's own columns


@given(low_rank_matrices(max_d=20), st.integers(1, 25))
def test_top_eigh_rows_kernel_side_equals_the_gram_side(Mk, k):
    """For n < d rows the n x n kernel gives XᵀX's top eigenvalues and eigenvectors (exactly, up to
    round-off); eigenvectors only of the nonzero eigenvalues; numerical_rank counts those."""
    M, rank = Mk
    X = M.T  # n x d rows
    n, d = X.shape
    evals, evecs = linalg.top_eigh_rows(X, k)
    dense_vals, _ = linalg.top_eigh(X.T @ X, k)
    assert evals.shape[0] == min(k, d, n) or n >= d
    assert torch.allclose(evals, dense_vals[: evals.shape[0]], atol=1e-9 * max(1.0, float(dense_vals[0])))
    assert_basis(evecs, d, min(k, rank))
    G = X.T @ X
    for j in range(evecs.shape[1]):  # each column is an eigenvector with its eigenvalue
        assert torch.allclose(G @ evecs[:, j], evals[j] * evecs[:, j], atol=1e-7 * max(1.0, float(evals[0])))
    assert linalg.numerical_rank(G) == rank
    ref = torch.linalg.eigvalsh(G)
    assert torch.allclose(linalg.eigenvalues(G), ref, atol=1e-10 * max(1.0, float(ref.abs().max())))
