"""The seed notebook's candidate-building behaviours, kept ONLY so tests can show their flaws (SPEC §6).

It lives under ``tests/``, outside the installed package: nothing in the sweep imports it.
Each function reproduces one old behaviour:

- ``expand_rows_repeat_interleave`` / ``seed_qk_circuit_matrix`` / ``seed_ov_circuit_matrix``: GQA
  expansion by repeating single ROWS of W_k / W_v (``repeat_interleave`` on dim 0), which
  scrambles dimensions inside each head instead of repeating whole heads (concern 6).
- ``seed_chars_clusters``: k-means with k = r clusters; the PCA of k centroids minus their mean
  has rank k − 1 = r − 1, silently (concern 8).
- ``seed_churn``: h_{l+1} − h_l with l+1 clamped to the last layer, through an SVD that returns
  arbitrary directions for the resulting zero matrix (concern 8: a degenerate input must give
  an empty basis, not an arbitrary one).
- ``seed_axis_kind_for``: the v7 tagger, whose fall-through tags any unknown family (e.g. a B-side
  one) as "mixed", i.e. rankable (concern 4).
- ``seed_act_ranking_pool``: the v7 activation-winner pool, every non-ceiling row including the
  read-side ones (concern 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from subspace_sweep import linalg
from subspace_sweep.candidates import Candidate, kmeans_centroids


def expand_rows_repeat_interleave(W_small: Tensor, out_rows: int) -> Tensor:
    """v7 ``expand_rows_to``: each ROW repeated ``out_rows // rows`` times in place."""
    if W_small.shape[0] == out_rows:
        return W_small
    repeats = out_rows // W_small.shape[0]
    if repeats * W_small.shape[0] != out_rows:
        raise ValueError(f"cannot repeat rows from {tuple(W_small.shape)} to {out_rows}")
    return W_small.repeat_interleave(repeats, dim=0)


def seed_qk_circuit_matrix(q: Tensor, k: Tensor) -> Tensor:
    """v7 qk_circuit matrix: ``W_qᵀ · expand_rows(W_k)``."""
    return q.T @ expand_rows_repeat_interleave(k, q.shape[0])


def seed_ov_circuit_matrix(o: Tensor, v: Tensor) -> Tensor:
    """v7 attn_ov_write matrix: ``W_o · expand_rows(W_v)``."""
    return o @ expand_rows_repeat_interleave(v, o.shape[1])


def seed_chars_clusters(samples: Tensor, r: int) -> Tensor:
    """v7 chars_clusters: k = r clusters (same init and iterations), PCA of the centroids."""
    centroids, _ = kmeans_centroids(samples, r)
    return linalg.pca(centroids, r)


def seed_churn(clean: Tensor, layer: int, r: int) -> Tensor:
    """v7 churn: PCA of ``h[min(l+1, L-1)] − h[l]`` by a plain SVD (no rank check)."""
    L = clean.shape[0]
    X = linalg.as64(clean[min(layer + 1, L - 1)] - clean[layer])
    Xc = X - X.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(Xc, full_matrices=False)
    return vh[: min(r, vh.shape[0])].T.contiguous()


def seed_axis_kind_for(family: str) -> str:
    """v7 ``axis_kind_for``, verbatim in behaviour (note the final fall-through)."""
    if family == "ceiling":
        return "ceiling"
    if family in ("W:read", "W:unembed"):
        return "read"
    if family in ("W:write", "W:write-not-read", "W:OV", "W:MLP"):
        return "write"
    if family.startswith("act:") or family in ("W:QK", "compound"):
        return "mixed"
    return "mixed"


def seed_act_ranking_pool(candidates: Sequence[Candidate]) -> list[Candidate]:
    """v7 ``act_winners`` input: every row of kind "A-hypothesis" (family != "ceiling"), read rows included."""
    return [c for c in candidates if c.family != "ceiling"]
