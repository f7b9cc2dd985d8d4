"""Hypothesis strategies for structured matrices (Q·diag·Qᵀ built from seeds, not `assume` filters)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from subspace_sweep import linalg
from subspace_sweep.scoring import Target

DT = torch.float64


def haar(d: int, k: int, seed: int) -> torch.Tensor:
    return linalg.random_orthonormal(d, k, torch.Generator().manual_seed(seed))


@st.composite
def spectra(draw, d: int, min_rank: int = 1) -> torch.Tensor:
    """Non-negative spectrum of length d with a chosen numerical rank ≥ min_rank and a wide dynamic range."""
    rank = draw(st.integers(min_rank, d))
    exps = draw(st.lists(st.floats(-3, 2), min_size=rank, max_size=rank))
    s = torch.zeros(d, dtype=DT)
    s[:rank] = torch.tensor([10.0**e for e in exps], dtype=DT)
    return s


@st.composite
def low_rank_matrices(draw, d: int | None = None, max_d: int = 24):
    """(M, rank): a d x n matrix U·diag(s)·Vᵀ of exactly known rank."""
    d = d or draw(st.integers(3, max_d))
    n = draw(st.integers(1, 3 * d))
    k = draw(st.integers(0, min(d, n)))
    seed = draw(st.integers(0, 2**31 - 1))
    s = torch.tensor([10.0 ** draw(st.floats(-2, 2)) for _ in range(k)], dtype=DT)
    M = haar(d, k, seed) @ torch.diag(s) @ haar(n, k, seed + 1).T if k else torch.zeros(d, n, dtype=DT)
    return M, k


@st.composite
def targets(draw, kind: str | None = None, max_d: int = 20):
    """A target of one of the four kinds (act rows, o_proj, down_proj, balanced combination)."""
    kind = kind or draw(st.sampled_from(["act", "o_proj", "down_proj", "combined"]))
    d = draw(st.integers(4, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if kind == "act":
        n = draw(st.integers(2, 3 * d))
        k = draw(st.integers(1, d))
        rows = torch.randn(n, k, generator=gen, dtype=DT) @ haar(d, k, seed + 7).T
        rows = rows + 1e-3 * torch.randn(n, d, generator=gen, dtype=DT) * draw(st.sampled_from([0.0, 1.0]))
        return Target.from_rows("act", rows)
    s = draw(spectra(d))
    o = haar(d, d, seed + 1) @ torch.diag(s) @ haar(d, d, seed + 2).T
    if kind == "o_proj":
        return Target.from_matrix("o_proj", o)
    s2 = draw(spectra(d))
    down = haar(d, d, seed + 3) @ torch.diag(s2) @ haar(3 * d, d, seed + 4).T
    if kind == "down_proj":
        return Target.from_matrix("down_proj", down)
    return Target.balanced("combined", {"o_proj": o, "down_proj": down})
