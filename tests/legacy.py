"""The seed notebook's scoring methodology, kept ONLY so tests can show its flaws (SPEC §6).

It lives under ``tests/``, outside the installed package: nothing in the sweep imports it.
Each function reproduces one old behaviour:

- ``concatenated_target``: v6's weight score on the unbalanced concatenation [M_o | M_down]
  (Frobenius-dominated by the tensor with more parameters; concern 1).
- ``fit_label_ceiling_pct``: v6's "ceiling", the PCA of the FIT-half label (concern 2).
- ``seed_v7_oracle_pct``: v7's single oracle, the top left singular vectors of the unbalanced
  concatenation, used as 100% for every weight target (concern 5).
- ``hash_seeded_mc_null``: v7's per-tensor Monte-Carlo null seeded with Python's ``hash()`` of
  the tensor name, which changes with every process's hash seed (concern 7).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from subspace_sweep import linalg
from subspace_sweep.scoring import Target, energy, monte_carlo_null

N_NULL_SEED = 120  # the seed's number of Monte-Carlo draws


def concatenated_target(tensors: Mapping[str, Tensor], name: str = "legacy_concat") -> Target:
    """v6: ``G = [M_o | M_down][M_o | M_down]ᵀ`` with no balancing."""
    return Target.from_gram(name, sum(linalg.row_gram(linalg.as64(M)) for M in tensors.values()))


def fit_label_ceiling_pct(target: Target, B: Tensor, label_fit_rows: Tensor) -> float:
    """v6: 100 · R(B) / R(PCA of the FIT label), both scored on ``target``, same rank."""
    ceiling = linalg.pca(label_fit_rows, B.shape[1])
    r_b, r_c = B.shape[1], ceiling.shape[1]
    return 100.0 * (energy(target, B) / r_b) / (energy(target, ceiling) / r_c)


def seed_v7_oracle_pct(target: Target, B: Tensor, tensors: Mapping[str, Tensor]) -> float:
    """v7: 100 · e(B) / e(top-r left singular vectors of the unbalanced concatenation)."""
    concat = torch.cat([linalg.as64(M) for M in tensors.values()], dim=1)
    oracle = linalg.left_basis(concat, B.shape[1])
    return 100.0 * energy(target, B) / energy(target, oracle)


def hash_seed(layer: int, rank: int, tensor_name: str) -> int:
    """v7's seed: ``20_000 + 97·layer + rank + 7919·(1 + hash(tensor_name) % 1000)``."""
    return 20_000 + 97 * layer + rank + 7919 * (1 + hash(tensor_name) % 1000)


def hash_seeded_mc_null(target: Target, r: int, layer: int, tensor_name: str, n: int = N_NULL_SEED) -> tuple[float, float]:
    """v7's Monte-Carlo null (mean, variance of e) with the process-dependent seed."""
    return monte_carlo_null(target, r, n, hash_seed(layer, r, tensor_name))
