"""Linear algebra on orthonormal bases of the residual stream.

Conventions (one way to do each thing):
- A *basis* is a ``d x r`` float64 CPU tensor with orthonormal columns; ``r`` may be 0.
- Singular bases are computed through the ``d x d`` Gram in float64 (``eigh``), never
  by an SVD of a ``d x n`` matrix with ``n`` in the hundreds of thousands.
- Eigenvector signs are fixed (largest-magnitude entry positive) so that bases are
  reproducible bit for bit across runs and independent of LAPACK's sign choice.
- Directions with (relative) eigenvalue below ``RANK_TOL`` are numerically absent:
  functions return fewer than ``r`` columns instead of arbitrary directions, and the
  caller reads the effective rank off ``basis.shape[1]``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

DTYPE = torch.float64
#: Relative eigenvalue (squared singular value) below which a direction is treated as absent.
RANK_TOL = 1e-10
#: Relative residual norm below which a column is linearly dependent on earlier ones.
ORTHO_TOL = 1e-6


def as64(x: Tensor) -> Tensor:
    return x.detach().to(device="cpu", dtype=DTYPE)


def empty_basis(d: int) -> Tensor:
    return torch.zeros(d, 0, dtype=DTYPE)


def fix_signs(B: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive (first on ties)."""
    if B.shape[1] == 0:
        return B
    idx = B.abs().argmax(dim=0)
    signs = torch.sign(B[idx, torch.arange(B.shape[1])])
    signs[signs == 0] = 1
    return B * signs


def orthonormalize(M: Tensor, tol: float = ORTHO_TOL) -> Tensor:
    """Order-preserving, rank-revealing orthonormalisation (Gram-Schmidt, twice).

    Column j is kept iff its component orthogonal to the kept earlier columns has norm
    above ``tol`` times its own norm (and the column is not negligible against the largest
    column). The first k kept columns span the same space as the first columns of M.
    """
    M = as64(M)
    d, k = M.shape
    if k == 0:
        return empty_basis(d)
    norms = M.norm(dim=0)
    scale = float(norms.max())
    if scale == 0.0:
        return empty_basis(d)
    kept: list[Tensor] = []
    for j in range(k):
        v = M[:, j].clone()
        n0 = float(norms[j])
        if n0 <= tol * scale:
            continue
        if kept:
            Q = torch.stack(kept, dim=1)
            v = v - Q @ (Q.T @ v)
            v = v - Q @ (Q.T @ v)  # re-orthogonalise: classical GS loses orthogonality once
        n = float(v.norm())
        if n <= tol * n0:
            continue
        kept.append(v / n)
    if not kept:
        return empty_basis(d)
    return torch.stack(kept, dim=1)


def is_orthonormal(B: Tensor, tol: float = 1e-4) -> bool:
    if B.shape[1] == 0:
        return True
    eye = torch.eye(B.shape[1], dtype=B.dtype)
    return bool((B.T @ B - eye).abs().max() <= tol)


def top_eigvecs(G: Tensor, r: int, *, largest: bool = True, rel_tol: float = RANK_TOL) -> Tensor:
    """Top-r (or bottom-r) eigenvectors of a symmetric PSD matrix, float64, signs fixed.

    Only the wanted eigenpairs are computed (LAPACK ``syevr`` through SciPy): for r = 8 of
    d = 1024 this is ~4x faster than a full ``eigh``, which matters for ~17 bases per layer.
    With ``largest=True`` eigenvalues at or below ``rel_tol * max`` are dropped, so the
    returned rank is the numerical rank capped at r. With ``largest=False`` all r are
    returned (bottom directions legitimately have small eigenvalues).
    """
    G = as64(G)
    d = G.shape[0]
    r = min(r, d)
    if r <= 0:
        return empty_basis(d)
    A = ((G + G.T) / 2).numpy()
    lo, hi = (d - r, d - 1) if largest else (0, r - 1)
    evals, evecs = scipy.linalg.eigh(A, subset_by_index=[lo, hi], driver="evr", check_finite=True)
    evals = torch.from_numpy(evals)
    evecs = torch.from_numpy(np.ascontiguousarray(evecs))
    if largest:
        evals, evecs = evals.flip(0), evecs.flip(1)
        top = float(evals[0])  # the subset always contains the largest eigenvalue
        if top <= 0.0:
            return empty_basis(d)
        evecs = evecs[:, evals > rel_tol * top]
    return fix_signs(evecs.contiguous())


def row_gram(M: Tensor) -> Tensor:
    """``M Mᵀ`` (d x d for a d x n matrix) in float64.

    The product runs in M's own precision when it is float32 (a d x 100k float64 GEMM
    costs ~10x more), then is promoted; use float64 input where tiny singular values matter.
    """
    if M.dtype not in (torch.float32, torch.float64):
        M = M.float()
    return as64(M @ M.T)


def col_gram(M: Tensor) -> Tensor:
    """``Mᵀ M`` (d x d for an n x d matrix) in float64."""
    if M.dtype not in (torch.float32, torch.float64):
        M = M.float()
    return as64(M.T @ M)


def left_basis(M: Tensor, r: int) -> Tensor:
    """Top-r left singular vectors of a d x n matrix (through its d x d row Gram)."""
    return top_eigvecs(row_gram(M), r)


def right_basis(M: Tensor, r: int) -> Tensor:
    """Top-r right singular vectors of an n x d matrix (through its d x d column Gram)."""
    return top_eigvecs(col_gram(M), r)


def pca(X: Tensor, r: int) -> Tensor:
    """Top-r principal axes (d x r_eff) of the rows of X (n x d) after centring.

    Solved on the smaller of the two Grams; n - 1 bounds the rank.
    """
    X = as64(X)
    n, d = X.shape
    if n < 2 or r <= 0:
        return empty_basis(d)
    Xc = X - X.mean(dim=0, keepdim=True)
    return weighted_pca_rows(Xc, r)


def weighted_pca_rows(X: Tensor, r: int) -> Tensor:
    """Top-r right singular vectors of the rows of X, NOT centred (used on pre-centred or
    pre-weighted rows). Uses the n x n Gram when n < d."""
    X = as64(X)
    n, d = X.shape
    if n == 0 or r <= 0:
        return empty_basis(d)
    if n >= d:
        return top_eigvecs(X.T @ X, r)
    K = X @ X.T
    K = (K + K.T) / 2
    evals, evecs = torch.linalg.eigh(K)
    top = float(evals[-1])
    if top <= 0.0:
        return empty_basis(d)
    order = torch.arange(n - 1, -1, -1)
    order = order[evals[order] > RANK_TOL * top][:r]
    V = X.T @ evecs[:, order] / evals[order].sqrt()
    # One more pass through orthonormalize removes the error of dividing by small sqrt(eval).
    return fix_signs(orthonormalize(V))


def projector(B: Tensor) -> Tensor:
    B = as64(B)
    return B @ B.T


def project_out(F: Tensor, M: Tensor) -> Tensor:
    """``(I - F Fᵀ) M`` without forming the d x d projector."""
    F = as64(F)
    M = as64(M)
    if F.shape[1] == 0:
        return M
    return M - F @ (F.T @ M)


def project_out_gram(F: Tensor, G: Tensor) -> Tensor:
    """``(I - P_F) G (I - P_F)`` for a d x d Gram G: the Gram of ``(I - P_F) M``."""
    F = as64(F)
    G = as64(G)
    if F.shape[1] == 0:
        return G
    GF = G @ F
    FtGF = F.T @ GF
    return G - F @ GF.T - GF @ F.T + F @ FtGF @ F.T


def project_away(B: Tensor, F: Tensor) -> Tensor:
    """Orthonormal basis of ``(I - P_F) B`` (order-preserving, rank-revealing)."""
    return orthonormalize(project_out(F, B))


def union(*bases: Tensor) -> Tensor:
    """Orthonormal basis of the sum of the spans, earlier bases first."""
    nonempty = [as64(B) for B in bases if B.shape[1] > 0]
    if not nonempty:
        return empty_basis(bases[0].shape[0])
    return orthonormalize(torch.cat(nonempty, dim=1))


def complement(F: Tensor) -> Tensor:
    """Orthonormal basis (d x (d - rank F)) of the orthogonal complement of span(F)."""
    F = as64(F)
    d = F.shape[0]
    if F.shape[1] == 0:
        return torch.eye(d, dtype=DTYPE)
    Q = orthonormalize(F)
    P_perp = torch.eye(d, dtype=DTYPE) - Q @ Q.T
    k = d - Q.shape[1]
    evals, evecs = torch.linalg.eigh((P_perp + P_perp.T) / 2)
    return fix_signs(evecs[:, d - k :].flip(1).contiguous())


def principal_cosines(A: Tensor, B: Tensor) -> Tensor:
    """Cosines of the principal angles between span(A) and span(B), descending, in [0, 1]."""
    A = as64(A)
    B = as64(B)
    if A.shape[1] == 0 or B.shape[1] == 0:
        return torch.zeros(0, dtype=DTYPE)
    return torch.linalg.svdvals(A.T @ B).clamp(0.0, 1.0)


def bisector(A: Tensor, B: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Principal-vector bisector of two subspaces and the principal cosines used.

    For principal vector pairs (a_i, b_i) with cosine c_i, the bisector direction is
    (a_i + b_i)/|a_i + b_i|; these are mutually orthogonal. Returns the top-r (most aligned
    pairs first) as a basis together with the cosines of those pairs.
    """
    A = as64(A)
    B = as64(B)
    d = A.shape[0]
    if A.shape[1] == 0 or B.shape[1] == 0 or r <= 0:
        return empty_basis(d), torch.zeros(0, dtype=DTYPE)
    U, s, Vh = torch.linalg.svd(A.T @ B, full_matrices=False)
    k = min(r, s.shape[0])
    pa = A @ U[:, :k]
    pb = B @ Vh.T[:, :k]
    basis = orthonormalize(pa + pb)
    return fix_signs(basis), s[:k].clamp(0.0, 1.0)


def random_orthonormal(d: int, r: int, generator: torch.Generator, batch: int | None = None) -> Tensor:
    """Uniform (Haar) random orthonormal d x r basis (or a batch of them) from a seeded generator."""
    shape = (d, r) if batch is None else (batch, d, r)
    X = torch.randn(shape, generator=generator, dtype=DTYPE)
    Q, R = torch.linalg.qr(X)
    # Multiplying by the signs of diag(R) makes the distribution exactly Haar.
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    return Q * signs.unsqueeze(-2)
