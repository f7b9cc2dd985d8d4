"""Exact values of the circuit and basis builders of candidates.py (issue 18): the head layout's
checks, the QK circuit's q/k-norm gain, the skew rank of an orthogonal matrix, the Procrustes
rotation, the projected top eigenvectors and the uncentred weighted bases, on inputs small enough
to know the answer."""

from __future__ import annotations

import math

import pytest
import torch

from subspace_sweep import candidates as cands
from subspace_sweep import linalg
from subspace_sweep.errors import InputError
from subspace_sweep.weights import LayerWeights
from tests.strategies import DT, haar


def e(d: int, *cols: int) -> torch.Tensor:
    return torch.eye(d, dtype=DT)[:, list(cols)]


def rotation(d: int, i: int, j: int, theta: float) -> torch.Tensor:
    R = torch.eye(d, dtype=DT)
    R[i, i] = R[j, j] = math.cos(theta)
    R[i, j], R[j, i] = -math.sin(theta), math.sin(theta)
    return R


@pytest.mark.parametrize(("n_heads", "n_kv", "head_dim", "group"), [(4, 2, 3, 2), (3, 3, 1, 1), (6, 1, 2, 6)])
def test_head_layout_gives_the_group_size(n_heads, n_kv, head_dim, group):
    assert cands._check_heads(n_heads, n_kv, head_dim) == group


@pytest.mark.parametrize("layout", [(0, 1, 2), (2, 0, 2), (2, 1, 0), (-2, 1, 2), (2, -1, 2), (2, 1, -1), (3, 2, 2)])
def test_bad_head_layout_is_an_input_error(layout):
    with pytest.raises(InputError, match="bad attention shape"):
        cands._check_heads(*layout)


def test_qk_circuit_matrix_applies_the_q_and_k_gains_row_by_row():
    """Σ_h (D_q,h W_q,h)ᵀ (D_k,kv(h) W_k,kv(h)) by an explicit loop, for q/k gains that differ per
    row (so per head as well as per dimension: a mutant reusing one head's gain, or swapping the
    query and key sides, changes the value)."""
    g = torch.Generator().manual_seed(0)
    n_heads, n_kv, hd, d = 4, 2, 3, 5
    q = torch.randn(n_heads * hd, d, generator=g, dtype=DT)
    k = torch.randn(n_kv * hd, d, generator=g, dtype=DT)
    q_gain = torch.linspace(-0.5, 3.0, n_heads * hd, dtype=torch.float32)
    k_gain = torch.tensor([2.0, -0.5, 3.0, 0.25, 1.5, -1.0], dtype=torch.float32)
    Dq, Dk = torch.diag(q_gain.double()), torch.diag(k_gain.double())
    want = sum((Dq @ q)[h * hd:(h + 1) * hd].T @ (Dk @ k)[(h // 2) * hd:(h // 2 + 1) * hd]
               for h in range(n_heads))
    torch.testing.assert_close(cands.qk_circuit_matrix(q, k, n_heads, n_kv, hd, q_gain, k_gain), want,
                               rtol=1e-12, atol=1e-12)
    no_gain = sum(q[h * hd:(h + 1) * hd].T @ k[(h // 2) * hd:(h // 2 + 1) * hd] for h in range(n_heads))
    torch.testing.assert_close(cands.qk_circuit_matrix(q, k, n_heads, n_kv, hd), no_gain, rtol=1e-12, atol=1e-12)
    only_k = sum(q[h * hd:(h + 1) * hd].T @ (Dk @ k)[(h // 2) * hd:(h // 2 + 1) * hd] for h in range(n_heads))
    torch.testing.assert_close(cands.qk_circuit_matrix(q, k, n_heads, n_kv, hd, None, k_gain), only_k,
                               rtol=1e-12, atol=1e-12)


def test_circuits_in_residual_coordinates():
    """qk_circuit = diag(γ) QK diag(γ) with the attention norm's gain and the q/k gains per row
    inside; ov_circuit = OV diag(γ) (no post-projection norm here)."""
    g = torch.Generator().manual_seed(1)
    n_heads, n_kv, hd, d = 2, 1, 2, 3
    mk = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    lw = LayerWeights(q=mk(4, d), k=mk(2, d), v=mk(2, d), o=mk(d, 4), gate=mk(6, d), up=mk(6, d), down=mk(d, 6),
                      attn_gain=torch.tensor([1.0, 2.0, 0.5]), mlp_gain=torch.ones(d),
                      q_gain=torch.tensor([3.0, 1.0, 0.5, 2.0]), k_gain=torch.tensor([0.5, 2.0]))
    Ga = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=DT))
    Dq = torch.diag(torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=DT))
    Dk = torch.diag(torch.tensor([0.5, 2.0], dtype=DT))
    qk = sum((Dq @ lw.q)[h * hd:(h + 1) * hd].T @ (Dk @ lw.k) for h in range(2))
    torch.testing.assert_close(cands.qk_circuit(lw, n_heads, n_kv, hd), Ga @ qk @ Ga, rtol=1e-12, atol=1e-12)
    ov = sum(lw.o[:, h * hd:(h + 1) * hd] @ lw.v for h in range(2))
    torch.testing.assert_close(cands.ov_circuit(lw, n_heads, n_kv, hd), ov @ Ga, rtol=1e-12, atol=1e-12)


def test_attention_sink_vectors_are_float64_rows_per_query_head():
    g = torch.Generator().manual_seed(2)
    o = torch.randn(3, 4, generator=g)
    v = torch.randn(2, 3, generator=g)
    s = torch.randn(3, generator=g)
    rows = cands.attention_sink_vectors(o, v, s, 4, 2, 1)
    assert rows.dtype == DT and rows.shape == (4, 3)
    vs = linalg.as64(v) @ linalg.as64(s)
    want = torch.stack([linalg.as64(o)[:, h] * vs[h // 2] for h in range(4)])
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- rotations


def test_skew_rank_bound_of_orthogonal_matrices():
    """R − Rᵀ has even rank: m for even m (m − 2 for a reflection), m − 1 for odd m, 0 below 2."""
    assert cands.skew_rank_bound(torch.eye(1, dtype=DT)) == 0
    assert cands.skew_rank_bound(torch.zeros(0, 0, dtype=DT)) == 0
    assert cands.skew_rank_bound(rotation(2, 0, 1, 0.4)) == 2
    reflect2 = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    assert cands.skew_rank_bound(reflect2) == 0
    assert cands.skew_rank_bound(rotation(3, 0, 1, 0.4)) == 2
    assert cands.skew_rank_bound(-torch.eye(3, dtype=DT)) == 2  # odd m: det −1 changes nothing
    R4 = rotation(4, 0, 1, 0.4) @ rotation(4, 2, 3, 1.0)
    assert cands.skew_rank_bound(R4) == 4
    assert cands.skew_rank_bound(R4 @ torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=DT))) == 2
    assert cands.skew_rank_bound(rotation(5, 0, 1, 0.4)) == 4


def test_rotation_rank_is_capped_by_rows_minus_one_and_d():
    assert cands._rotation_rank(10, 12, 64) == 9
    assert cands._rotation_rank(12, 10, 64) == 9
    assert cands._rotation_rank(50, 60, 64) == cands.ROTATION_MAX_RANK == 32
    assert cands._rotation_rank(50, 60, 64, max_rank=5) == 5
    assert cands._rotation_rank(50, 60, 7) == 7
    assert cands._rotation_rank(1, 5, 64) == 0
    assert cands._rotation_rank(0, 5, 64) == 0


def test_procrustes_rotation_recovers_a_planted_rotation():
    """persona+ = persona- rotated by 50° in the (e0, e1) plane, rows spanning 4 dimensions: the
    joint PCA is those 4 dimensions and R is the rotation in its coordinates (R = Jᵀ Rot J)."""
    g = torch.Generator().manual_seed(3)
    d, n = 8, 9
    X = torch.zeros(n, d, dtype=DT)
    X[:, :4] = torch.randn(n, 4, generator=g, dtype=DT) * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DT)
    Rot = rotation(d, 0, 1, math.radians(50))
    joint, R = cands.procrustes_rotation(X, X @ Rot)
    assert joint.shape == (d, 4) and R.shape == (4, 4)
    torch.testing.assert_close(R, joint.T @ Rot @ joint, rtol=0, atol=1e-10)
    torch.testing.assert_close(R.T @ R, torch.eye(4, dtype=DT), rtol=0, atol=1e-12)
    joint2, _ = cands.procrustes_rotation(X, X @ Rot, max_rank=2)
    assert joint2.shape == (d, 2)
    # an offset common to both sides is removed before the fit
    _, R_off = cands.procrustes_rotation(X + 5.0, X @ Rot + 5.0)
    torch.testing.assert_close(R_off, R, rtol=0, atol=1e-10)


def test_rotation_contrast_basis_is_the_rotation_plane_and_empty_below_two_dimensions():
    g = torch.Generator().manual_seed(4)
    d, n = 8, 9
    X = torch.zeros(n, d, dtype=DT)
    X[:, :4] = torch.randn(n, 4, generator=g, dtype=DT) * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DT)
    B = cands.rotation_contrast_basis(X, X @ rotation(d, 1, 2, math.radians(30)), 4)
    assert B.shape == (d, 2)
    assert linalg.principal_cosines(B, e(d, 1, 2)).tolist() == pytest.approx([1.0, 1.0], abs=1e-9)
    assert cands.rotation_contrast_basis(X, X @ rotation(d, 1, 2, 0.5), 1).shape == (d, 1)
    # two rows per side: the joint PCA has m = 1 dimension, no rotation plane
    assert cands.rotation_contrast_basis(X[:2], X[:2] @ rotation(d, 0, 1, 0.5), 4).shape == (d, 0)
    # the identity: R = I, R − Rᵀ = 0, nothing to return
    assert cands.rotation_contrast_basis(X, X.clone(), 4).shape == (d, 0)


def test_kmeans_caps_k_at_the_number_of_rows_and_centres_them():
    X = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 4.0]], dtype=DT)
    C, sizes = cands.kmeans_centroids(X, 5)
    assert C.shape == (3, 2) and sizes.tolist() == [1, 1, 1]
    # centred rows (−2, −4/3), (0, −4/3), (2, 8/3), largest norm first: each its own cluster
    torch.testing.assert_close(C, torch.tensor([[2.0, 8 / 3], [-2.0, -4 / 3], [0.0, -4 / 3]], dtype=DT), rtol=0, atol=1e-15)
    C1, sizes1 = cands.kmeans_centroids(X, 1)
    assert sizes1.tolist() == [3] and C1.abs().max() < 1e-15  # one cluster: the centred mean, 0


def test_kmeans_two_clusters_pinned():
    """Centred rows (−5, −1), (−5, 0), (5, −1), (5, 2): init = the two largest norms, (5, 2) then
    (−5, −1) (first of a tie); one Lloyd step gives each pair's mean, in init order."""
    X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 3.0]], dtype=DT)
    C, sizes = cands.kmeans_centroids(X, 2)
    assert sizes.tolist() == [2, 2]
    torch.testing.assert_close(C, torch.tensor([[5.0, 0.5], [-5.0, -0.5]], dtype=DT), rtol=0, atol=1e-14)
    C0, _ = cands.kmeans_centroids(X, 2, iters=0)  # no Lloyd step: the initial centroids
    torch.testing.assert_close(C0, torch.tensor([[5.0, 2.0], [-5.0, -1.0]], dtype=DT), rtol=0, atol=0)


def _lloyd_reference(X: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """kmeans_centroids' documented algorithm, written out row by row (an independent route)."""
    Xc = X - X.mean(dim=0, keepdim=True)
    k = min(k, Xc.shape[0])
    norms = [float(x.norm()) for x in Xc]
    order = sorted(range(len(norms)), key=lambda i: -norms[i])  # Python's sort is stable
    C = [Xc[i].clone() for i in order[:k]]
    for _ in range(iters):
        members: list[list[int]] = [[] for _ in range(k)]
        for i, x in enumerate(Xc):
            dist = [float(((x - c) ** 2).sum()) for c in C]
            members[dist.index(min(dist))].append(i)  # first on ties
        C = [Xc[m].mean(dim=0) if m else c for m, c in zip(members, C)]  # an empty cluster keeps its centroid
    return torch.stack(C)


def test_kmeans_matches_lloyds_algorithm_written_out():
    """Many clusters on few rows: singleton clusters whose member is not their previous centroid
    occur, and an empty cluster keeps its centroid (a `counts > 1` update would freeze the first)."""
    for seed in range(12):
        for shape in ((7, 3), (4, 1)):  # (4, 1), k = 3, seed 7: a cluster shrinks to one moved row
            X = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
            for k in (2, 3, 4):
                C, sizes = cands.kmeans_centroids(X, k, iters=6)
                torch.testing.assert_close(C, _lloyd_reference(X, k, 6), rtol=0, atol=1e-12)
                assert int(sizes.sum()) == shape[0]


def test_kmeans_init_takes_tied_norms_in_row_order():
    """±e_i rows: centred already, every norm 1. The init is the first k rows (a stable sort;
    torch's default CPU sort puts row 30 first here)."""
    X = torch.cat([torch.eye(20), -torch.eye(20)]).to(DT)
    C, _ = cands.kmeans_centroids(X, 3, iters=0)
    assert torch.equal(C, X[:3])


def test_ov_circuit_reads_the_post_projection_gain():
    """Behind a post-projection norm (Gemma2/3, OLMo2): diag(γ_post) OV diag(γ_attn)."""
    g = torch.Generator().manual_seed(4)
    n_heads, n_kv, hd, d = 2, 1, 2, 3
    mk = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    post = torch.tensor([0.5, 2.0, -1.5])
    lw = LayerWeights(q=mk(4, d), k=mk(2, d), v=mk(2, d), o=mk(d, 4), gate=mk(6, d), up=mk(6, d), down=mk(d, 6),
                      attn_gain=torch.tensor([1.0, 2.0, 0.5]), mlp_gain=torch.ones(d), o_gain=post)
    ov = sum(lw.o[:, h * hd:(h + 1) * hd] @ lw.v for h in range(2))
    want = torch.diag(post.double()) @ ov @ torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=DT))
    torch.testing.assert_close(cands.ov_circuit(lw, n_heads, n_kv, hd), want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- basis helpers


def test_top_away_from_a_basis_drops_what_is_left_of_round_off():
    """G = diag(5, 3, 1, 0): away from e0 the top eigenvectors are e1, e2; away from span(e0, e1,
    e2), G has nothing left (its Rayleigh quotients are round-off, below RANK_TOL·tr G) and the
    basis is empty, though top_eigvecs alone would keep the largest remaining direction."""
    G = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.0], dtype=DT))
    torch.testing.assert_close(cands._top(G, 2, away_from=e(4, 0), single=False).abs(), e(4, 1, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(cands._top(G, 1, single=False), e(4, 0), rtol=0, atol=0)
    assert cands._top(G, 3, away_from=e(4, 0, 1, 2), single=False).shape == (4, 0)
    Q = haar(4, 4, 1)
    Gq = Q @ G @ Q.T
    assert cands._top(Gq, 3, away_from=Q[:, :3], single=False).shape == (4, 0)
    B = cands._top(Gq, 2, away_from=Q[:, :1])
    assert B.shape == (4, 2)
    assert linalg.principal_cosines(B, Q[:, 1:3]).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)  # float32 solve
    # the threshold is relative to tr G: a remaining eigenvalue of 1e-9·tr G is a direction
    H = torch.diag(torch.tensor([1.0, 1e-9, 0.0], dtype=DT))
    assert cands._top(H, 2, away_from=e(3, 0), single=False).shape == (3, 1)
    H = torch.diag(torch.tensor([1.0, 1e-11, 0.0], dtype=DT))
    assert cands._top(H, 2, away_from=e(3, 0), single=False).shape == (3, 0)


def test_uncentred_bases_weight_the_rows_and_drop_zero_weights():
    """Rows D_i·√w_i, not centred: with w = (4, 1, 0) and rows e0, e1, e2 the Gram is diag(4, 1, 0),
    so the basis is e0, e1 (e2 has zero weight); w = 0 everywhere gives empty bases."""
    D = torch.eye(3, dtype=DT) + 0.0
    w1 = torch.tensor([4.0, 1.0, 0.0], dtype=DT)
    w2 = torch.tensor([1.0, 4.0, 0.0], dtype=DT)
    a, b = cands._uncentred_bases(D, [w1, w2], 3)
    torch.testing.assert_close(a, e(3, 0, 1), rtol=0, atol=1e-15)
    torch.testing.assert_close(b, e(3, 1, 0), rtol=0, atol=1e-15)
    # 2 used rows in d = 5: the kernel route, same answer
    D5 = torch.cat([torch.eye(3, dtype=DT), torch.zeros(3, 2, dtype=DT)], dim=1)
    (c,) = cands._uncentred_bases(D5, [w1], 3)
    torch.testing.assert_close(c, e(5, 0, 1), rtol=0, atol=1e-15)
    (one,) = cands._uncentred_bases(D5, [w2], 1)
    torch.testing.assert_close(one, e(5, 1), rtol=0, atol=1e-15)
    empty = cands._uncentred_bases(D5, [torch.zeros(3, dtype=DT)] * 2, 3)
    assert [x.shape for x in empty] == [(5, 0), (5, 0)]
    # a row used by one weighting only is kept for it and absent (weight 0) for the other
    u, v = cands._uncentred_bases(D5, [torch.tensor([1.0, 0.0, 0.0], dtype=DT), torch.tensor([0.0, 0.0, 2.0], dtype=DT)], 2)
    torch.testing.assert_close(u, e(5, 0), rtol=0, atol=1e-15)
    torch.testing.assert_close(v, e(5, 2), rtol=0, atol=1e-15)


def test_skew_rank_bound_of_a_proper_rotation_whose_determinant_rounds_below_one():
    """A rotation's determinant is 1 only to round-off (here 1 − 3e-16): not a reflection."""
    Q = haar(4, 4, 0)
    Q = Q * torch.tensor([1.0, 1.0, 1.0, float(torch.sign(torch.linalg.det(Q)))], dtype=DT)
    assert 0.999 < float(torch.linalg.det(Q)) < 1.0
    assert cands.skew_rank_bound(Q) == 4


def test_procrustes_joint_rank_is_capped_by_rows_minus_one_and_by_d():
    """m = min(32, n − 1, d) for n paired rows: 9 rows in d = 4 give the whole space (m = 4, not
    d − 1); 3 rows in d = 8 give m = 2."""
    g = torch.Generator().manual_seed(5)
    X, noise = torch.randn(9, 4, generator=g, dtype=DT), torch.randn(9, 4, generator=g, dtype=DT)
    assert cands.procrustes_rotation(X, X @ rotation(4, 0, 1, 0.3) + 0.1 * noise)[0].shape == (4, 4)
    Z = torch.randn(3, 8, generator=g, dtype=DT)
    assert cands.procrustes_rotation(Z, Z @ rotation(8, 0, 1, 0.3))[0].shape == (8, 2)


def test_procrustes_rotation_ignores_an_offset_common_to_both_sides():
    """With noise (no exact rotation to find), an offset common to both sides leaves the joint
    basis and R unchanged. (Centring either side alone already removes it from Xrᵀ Yr, so this
    cannot tell whether both are centred: see MUTATION_EQUIVALENTS.md.)"""
    g = torch.Generator().manual_seed(6)
    X = torch.randn(10, 5, generator=g, dtype=DT)
    Y = X @ rotation(5, 0, 1, 0.7) + 0.3 * torch.randn(10, 5, generator=g, dtype=DT)
    offset = torch.tensor([3.0, -2.0, 1.0, 0.5, 4.0], dtype=DT)
    J, R = cands.procrustes_rotation(X, Y)
    J2, R2 = cands.procrustes_rotation(X + offset, Y + offset)
    torch.testing.assert_close(J2, J, rtol=0, atol=1e-10)
    torch.testing.assert_close(R2, R, rtol=0, atol=1e-10)


def test_rotation_contrast_basis_passes_max_rank():
    """Two rotation planes in 4 dimensions: the full joint PCA sees both (4 directions); capped at
    m = 2 the joint PCA has one plane, whose skew part has rank ≤ 2."""
    g = torch.Generator().manual_seed(7)
    X = torch.zeros(12, 6, dtype=DT)
    X[:, :4] = torch.randn(12, 4, generator=g, dtype=DT) * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DT)
    Y = X @ rotation(6, 0, 1, 0.6) @ rotation(6, 2, 3, 0.9)
    assert cands.rotation_contrast_basis(X, Y, 6).shape == (6, 4)
    assert cands.rotation_contrast_basis(X, Y, 6, max_rank=2).shape[1] <= 2


def test_top_solves_in_the_precision_asked_for():
    """_top is top_eigvecs (bit for bit) of G, or of the projected Gram, in float32 when single."""
    G = haar(6, 6, 2) @ torch.diag(torch.logspace(0, -2, 6, dtype=DT)) @ haar(6, 6, 2).T
    F = haar(6, 1, 3)
    for single in (True, False):
        assert torch.equal(cands._top(G, 3, single=single), linalg.top_eigvecs(G, 3, single=single))
        P = linalg.project_out_gram(F, G)
        assert torch.equal(cands._top(G, 3, away_from=F, single=single), linalg.top_eigvecs(P, 3, single=single))


def test_top_rayleigh_threshold_scales_with_the_trace_and_is_strict():
    """diag(100, 1e-10, 0) away from e0: what is left (1e-10) is below RANK_TOL·tr G = 1e-8, so
    nothing; and a remaining eigenvalue exactly AT RANK_TOL·tr G is nothing too (x found as the
    fixed point of x = RANK_TOL·(1 + x), asserted)."""
    H = torch.diag(torch.tensor([100.0, 1e-10, 0.0], dtype=DT))
    assert cands._top(H, 2, away_from=e(3, 0), single=False).shape == (3, 0)
    x = 0.0
    for _ in range(4):
        x = linalg.RANK_TOL * (1.0 + x)
    H = torch.diag(torch.tensor([1.0, x, 0.0], dtype=DT))
    assert linalg.RANK_TOL * float(torch.trace(H)) == x
    assert cands._top(H, 2, away_from=e(3, 0), single=False).shape == (3, 0)
    H = torch.diag(torch.tensor([1.0, 2 * x, 0.0], dtype=DT))
    assert cands._top(H, 2, away_from=e(3, 0), single=False).shape == (3, 1)


def test_uncentred_bases_of_a_single_used_row():
    D = torch.tensor([[0.0, 3.0, 4.0], [1.0, 0.0, 0.0]], dtype=DT)
    (b,) = cands._uncentred_bases(D, [torch.tensor([2.0, 0.0], dtype=DT)], 2)
    torch.testing.assert_close(b, torch.tensor([[0.0], [0.6], [0.8]], dtype=DT), rtol=0, atol=1e-15)


def test_kmeans_without_lloyd_steps_reports_sizes_for_every_cluster():
    X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 3.0]], dtype=DT)
    _, sizes = cands.kmeans_centroids(X, 2, iters=0)
    assert sizes.tolist() == [4, 0]  # no assignment step ran: every row is still in cluster 0
