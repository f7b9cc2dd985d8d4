"""Checks at real scale on Qwen/Qwen3-0.6B (``pytest -m integration``; GPU when present).

They skip, with a reason that says how to provide the weights, when the model is not cached.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import polars as pl
import pytest
import torch

from subspace_sweep import linalg
from subspace_sweep.candidates import attention_sink_vectors, ov_circuit, qk_circuit
from subspace_sweep.capture import capture_sink, record_activations
from subspace_sweep.demo import plant_rank
from subspace_sweep.model import attention_sink_token_id, block_name, extract_base_weights
from subspace_sweep.report import rank_fair_order
from tests.integration.conftest import is_real_qwen3_06b

pytestmark = pytest.mark.integration
GOLDEN = Path(__file__).parent / "golden" / "qwen3_0.6b_planted_mlp_write.json"
REGEN = os.environ.get("SUBSPACE_SWEEP_REGEN_GOLDEN") == "1"


def test_every_candidate_is_orthonormal_with_its_declared_rank(real_run):
    for c in real_run.result.candidates:
        for layer, B in c.bases.items():
            assert B.shape[0] == real_run.result.d_model
            assert linalg.is_orthonormal(B, 1e-4), (c.name, layer)
            assert torch.isfinite(B).all(), (c.name, layer)
            assert B.shape[1] <= c.expected_rank, (c.name, layer)
            if B.shape[1] < c.expected_rank:
                assert c.rank_note, f"{c.name} at layer {layer} has rank {B.shape[1]} < {c.expected_rank} undeclared"


def test_no_pct_oracle_above_100_and_finite_z(real_run):
    per_layer = real_run.result.per_layer
    pct = per_layer.select(pl.col("^pct_oracle_.*$")).to_numpy()
    assert (pct[pct == pct] <= 100.0 + 1e-6).all()
    nonempty = per_layer.filter(pl.col("rank") > 0)
    for col in ("z_act", "z_w_combined", "z_w_o_proj", "z_w_down_proj"):
        z = nonempty[col].to_numpy()
        assert all(math.isfinite(x) for x in z), col


def test_block_hook_equals_hidden_states(qwen):
    model, tok = qwen
    enc = tok(["I think the earth is flat. Do you agree? Answer Yes or No."], return_tensors="pt").to(model.device)
    names = [block_name(i) for i in range(model.config.num_hidden_layers)]
    with torch.no_grad(), record_activations(model, names) as rec:
        out = model(**enc, output_hidden_states=True)
    for i, name in enumerate(names[:-1]):
        torch.testing.assert_close(rec.output(name), out.hidden_states[i + 1])


def _headwise_reference(W, layer: int, sink_residual):
    lw = W.layers[layer].at_least_float32()  # the model may be bfloat16
    hd, g = W.head_dim, W.group
    D = torch.diag(lw.attn_gain)
    gq = lw.q_gain if lw.q_gain is not None else torch.ones(W.n_heads * hd)
    gk = lw.k_gain if lw.k_gain is not None else torch.ones(W.n_kv_heads * hd)
    qk = sum(D @ lw.q[h * hd:(h + 1) * hd].T @ torch.diag(gq[h * hd:(h + 1) * hd] * gk[(h // g) * hd:(h // g + 1) * hd])
             @ lw.k[(h // g) * hd:(h // g + 1) * hd] @ D for h in range(W.n_heads))
    ov = sum(lw.o[:, h * hd:(h + 1) * hd] @ lw.v[(h // g) * hd:(h // g + 1) * hd] @ D for h in range(W.n_heads))
    sink = torch.stack([lw.o[:, h * hd:(h + 1) * hd] @ (lw.v[(h // g) * hd:(h // g + 1) * hd] @ sink_residual)
                        for h in range(W.n_heads)])
    return qk, ov, sink


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_head_correct_gqa_on_real_shapes(qwen, where):
    model, tok = qwen
    W = extract_base_weights(model)
    layer = {"first": 0, "middle": W.n_layers // 2, "last": W.n_layers - 1}[where]
    s = capture_sink(model, attention_sink_token_id(model, tok))[layer]
    qk, ov, sink = _headwise_reference(W, layer, s)
    lw = W.layers[layer].at_least_float32()  # the model may be bfloat16
    args = (W.n_heads, W.n_kv_heads, W.head_dim)
    torch.testing.assert_close(qk_circuit(lw, *args).float(), qk, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ov_circuit(lw, *args).float(), ov, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attention_sink_vectors(lw.o, lw.v, s, *args).float(), sink, rtol=1e-4, atol=1e-4)


def test_planted_candidate_is_recovered(real_run):
    if not real_run.planted:
        pytest.skip("a user delta was given (SUBSPACE_SWEEP_DELTA): there is no planted answer")
    rank, pct = plant_rank(real_run.result.summary, real_run.plant)
    assert rank == 1 and pct >= 95, (rank, pct)


def _golden_payload(real_run) -> dict:
    s = real_run.result.summary.filter(pl.col("side") == "A")
    w_rank = rank_fair_order(s, "gain_w_combined", "z_w_combined")["candidate"].to_list()
    ranks = {c.name: {str(k): int(v.shape[1]) for k, v in sorted(c.bases.items())}
             for c in real_run.result.candidates if c.side == "A"}
    return {"w_axis_ranking": w_rank, "effective_ranks": ranks}


def test_golden_weight_axis_ranking_and_effective_ranks(real_run):
    """The W-axis ranking and the A-side effective ranks depend only on the weights (and the
    planted delta, itself a function of the weights). Regenerate with SUBSPACE_SWEEP_REGEN_GOLDEN=1."""
    if not real_run.planted:
        pytest.skip("the golden file is for the planted delta; a user delta was given")
    if not is_real_qwen3_06b(real_run.model):
        pytest.skip("the golden file is for Qwen3-0.6B; this is another model (a smoke run?)")
    payload = _golden_payload(real_run)
    if REGEN:
        GOLDEN.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    if not GOLDEN.exists():
        pytest.skip(f"no golden file {GOLDEN.name} yet: run with SUBSPACE_SWEEP_REGEN_GOLDEN=1 once where the weights are")
    assert payload == json.loads(GOLDEN.read_text())
