"""Planted recovery: a delta whose residual-writer columns lie in one candidate's span is
recovered by the sweep: that candidate ranks first on R_w_combined among A-side candidates
and reaches ≥ 95% of the combined weight oracle."""

from __future__ import annotations

import pytest

from subspace_sweep.demo import base_candidates, default_layers, plant_in, plant_rank
from subspace_sweep.sweep import SweepConfig, sweep
from subspace_sweep.toy import build_tiny_model

# Several families (write, OV, MLP, QK, activation, write-not-read) and seeds.
CASES = [
    ("mlp_write", 1),
    ("attn_ov_write", 2),
    ("gate_kernel", 3),
    ("qk_circuit", 4),
    ("TaskDiff_contrast", 5),
    ("write_not_downstream_read", 6),
]
CONFIG = SweepConfig(quiet=True)


@pytest.fixture(scope="module")
def base():
    model, tok = build_tiny_model(seed=0)
    layers = default_layers(model.config.num_hidden_layers)
    candidates = {c.name: c for c in base_candidates(model, tok, layers, CONFIG)}
    return model, tok, layers, candidates


@pytest.mark.parametrize("plant,seed", CASES)
def test_planted_candidate_is_recovered(base, plant, seed):
    model, tok, layers, candidates = base
    delta = plant_in(model, candidates[plant], layers, seed=seed)
    result = sweep(model, tok, delta, CONFIG)
    rank, pct = plant_rank(result, plant)
    assert rank == 1, f"{plant} ranked {rank} on R_w_combined"
    assert pct >= 95.0
