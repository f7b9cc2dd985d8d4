"""Candidate registry (issue 4, SPEC §4): every basis, its tags, its rank, and spot checks per family.

Spot checks compare each family with an INDEPENDENT float64 computation (explicit SVDs of the
stacked / projected / head-wise-summed matrices, readers multiplied by explicit ``diag(γ)``
matrices: SPEC §4.1's residual coordinates), not with the Gram route the module uses. The
synthetic weights have norm gains exp(N(0, 0.3²)), so a reference that forgot a gain fails.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import numpy as np
import scipy.linalg
import torch

from subspace_sweep import candidates as cands
from subspace_sweep import linalg
from subspace_sweep.candidates import (
    A_SIDE_NAMES,
    B_SIDE_NAMES,
    FAMILY_AXIS,
    Candidate,
    build_a_side,
    build_b_side,
    merge_layers,
    get_spec,
    ranking_pool,
)
from subspace_sweep.capture_types import ActivationCaptures, SteeredLabels
from subspace_sweep.errors import InputError
from subspace_sweep.scoring import Target
from subspace_sweep.weights import BaseWeights
from tests.helpers_candidates import synthetic_captures, synthetic_labels, synthetic_weights

DT = torch.float64
R = 8
K_SMALL = 16  # k_broad for d = 64, so the write_not_* families are not degenerate

SPEC_ORDER = (
    "lm_head_read", "logits_null", "global_read", "global_write", "global_write_not_global_read", "write",
    "attn_write", "mlp_write", "write_not_lm_head_read", "write_not_global_read", "write_not_downstream_read",
    "mlp_up_read", "mlp_gate_read", "attn_qkv_read", "attn_ov_write", "mlp_roundtrip_write", "qk_circuit",
    "input_super", "kv_super", "gate_kernel", "attention_sink", "causally_isolated", "input_super_not_lm_read",
    "suppressed", "amplified", "added_features", "global_clean_resid_pca", "global_persona_resid_pca",
    "layer_clean_resid_pca", "TaskDiff_contrast", "attn_min_taskdiff", "attn_max_taskdiff", "attn_diff_taskdiff",
    "attn_min_x_diffnorm_taskdiff", "up_proj_input_contrast", "up_proj_output_written_contrast",
    "gate_active_written", "chars_clusters", "churn", "rotation_contrast", "qk_x_chars_clusters",
    "WNR_union_TaskDiff", "randn_orthogonal",
)
GLOBAL_NAMES = (
    "lm_head_read", "logits_null", "global_read", "global_write", "global_write_not_global_read",
    "suppressed", "amplified", "added_features", "global_clean_resid_pca", "global_persona_resid_pca",
)
READ_NAMES = {
    "lm_head_read", "logits_null", "global_read", "mlp_up_read", "mlp_gate_read", "attn_qkv_read",
    "input_super", "kv_super", "input_super_not_lm_read",
}


def by_name(cs: list[Candidate]) -> dict[str, Candidate]:
    return {c.name: c for c in cs}


def same_span(A: torch.Tensor, B: torch.Tensor, tol: float = 1e-6) -> bool:
    """Equal dimension and every principal cosine within tol of 1."""
    if A.shape[1] != B.shape[1]:
        return False
    cos = linalg.principal_cosines(A, B)
    return bool(cos.numel() == 0 or float(cos.min()) >= 1.0 - tol)


def top_left(M: torch.Tensor, r: int = R) -> torch.Tensor:
    """Independent reference: top-r left singular vectors by a float64 SVD of M itself."""
    U, _, _ = torch.linalg.svd(linalg.as64(M), full_matrices=False)
    return U[:, :r]


def top_right(M: torch.Tensor, r: int = R) -> torch.Tensor:
    _, _, Vh = torch.linalg.svd(linalg.as64(M), full_matrices=False)
    return Vh[:r].T


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def syn():
    """(weights, acts, candidates by name) on synthetic tiny-shaped inputs, k_broad = 16."""
    W, A = synthetic_weights(), synthetic_captures()
    return W, A, by_name(build_a_side(W, A, r=R, k_broad=K_SMALL))


@pytest.fixture(scope="module")
def tiny_inputs(tiny):
    """(BaseWeights, ActivationCaptures) of the seeded tiny Qwen3 on the shipped FIT probes."""
    from subspace_sweep.capture import capture_activations
    from subspace_sweep.model import extract_base_weights
    from subspace_sweep.prompts import load_probe_set

    model, tok = tiny
    return extract_base_weights(model), capture_activations(model, tok, load_probe_set())


# ------------------------------------------------------------------------------ the table


def test_family_axis_table_is_spec_section_4():
    assert FAMILY_AXIS == {
        "W:unembed": "read", "W:read": "read", "W:write": "write", "W:write-not-read": "write",
        "W:OV": "write", "W:MLP": "write", "W:QK": "mixed", "act:clean": "mixed", "act:baseline": "mixed",
        "act:persona": "mixed", "act:attn-selected": "mixed", "act:up_proj": "mixed", "act:MLP": "mixed",
        "act:cluster": "mixed", "act:rotation": "mixed", "compound": "mixed", "baseline": "null",
        # the gradient bases (SPEC §13): write bases (left singular vectors of the writers' gradients)
        "grad:behaviour": "write", "grad:shared": "write", "grad:heldout": "write", "grad:neutral": "write",
        "grad:family": "write",
        "B:label": "reference", "B:oracle": "reference",
    }


def test_names_in_spec_order_and_tags():
    assert A_SIDE_NAMES == SPEC_ORDER
    assert len(A_SIDE_NAMES) == 43  # 42 hypotheses + randn_orthogonal
    assert set(B_SIDE_NAMES) == {"TaskDiff_lora_fit", "oracle_act", "oracle_o_proj", "oracle_down_proj", "oracle_combined"}
    assert {n for n in A_SIDE_NAMES if get_spec(n).axis_kind == "read"} == READ_NAMES
    assert get_spec("randn_orthogonal").axis_kind == "null"
    assert get_spec("qk_circuit").axis_kind == "mixed"
    assert {get_spec(n).axis_kind for n in B_SIDE_NAMES} == {"reference"}
    for row in cands.definitions_table():
        assert row["definition"] and "\n" not in row["definition"]
        assert row["axis_kind"] == FAMILY_AXIS[row["family"]]


def test_definitions_state_the_choices_made():
    assert "k = r + 1" in get_spec("chars_clusters").definition
    assert "NOT centred" in get_spec("attn_min_taskdiff").definition
    assert "NOT a ceiling" in get_spec("TaskDiff_lora_fit").definition
    assert "h // " in get_spec("qk_circuit").definition and "h // " in get_spec("attn_ov_write").definition
    assert "empty at the last layer" in get_spec("churn").definition


def test_get_spec_unknown_name_suggests():
    with pytest.raises(InputError, match="did you mean qk_circuit"):
        get_spec("qk_circuits")


@pytest.mark.parametrize(
    "family, side",
    [("W:nonsense", "A"), ("B:oracle", "A"), ("B:label", "A"), ("W:read", "B"), ("baseline", "B"), ("W:read", "C")],
)
def test_mis_tagged_candidate_cannot_be_constructed(family, side):
    with pytest.raises(ValueError):
        Candidate(name="x", family=family, definition="", side=side, bases={}, expected_rank=0)


def test_basis_must_be_float64():
    with pytest.raises(ValueError, match="float64"):
        Candidate(name="x", family="W:read", definition="", side="A", bases={0: torch.zeros(4, 1)}, expected_rank=1)


# ------------------------------------------------------------------------------ every candidate


def _check_every_candidate(cs: list[Candidate], d: int, layers: list[int]) -> None:
    assert [c.name for c in cs] == list(SPEC_ORDER)
    for c in cs:
        assert c.side == "A"
        assert c.layers == layers, c.name
        for layer, B in c.bases.items():
            assert B.dtype == DT and B.ndim == 2 and B.shape[0] == d, (c.name, layer, B.shape)
            assert torch.isfinite(B).all(), (c.name, layer)
            assert linalg.is_orthonormal(B, 1e-4), (c.name, layer)
        # r_eff = r unless declared, and every declared shortfall carries its reason.
        assert c.undeclared_ranks() == {}, (c.name, c.ranks, c.expected_rank, c.rank_exceptions)
        if c.expected_rank < R or c.rank_exceptions:
            assert c.rank_note, c.name


@pytest.mark.parametrize("k_broad", [K_SMALL, 64])
def test_every_candidate_on_the_tiny_model(tiny_inputs, k_broad):
    W, A = tiny_inputs
    cs = build_a_side(W, A, r=R, k_broad=k_broad)
    _check_every_candidate(cs, 64, [0, 1, 2, 3])
    ranks = {c.name: c.expected_rank for c in cs}
    if k_broad == 64:  # K = d: every "not read" projection removes the whole space (declared, empty)
        for name in ("write_not_lm_head_read", "write_not_global_read", "write_not_downstream_read",
                     "global_write_not_global_read", "causally_isolated", "input_super_not_lm_read"):
            assert ranks[name] == 0
    else:
        assert ranks["write_not_downstream_read"] == R and ranks["causally_isolated"] == R


def test_every_candidate_on_synthetic_inputs(syn):
    W, A, cs = syn
    _check_every_candidate(list(cs.values()), 64, [0, 1, 2, 3])
    ranks = {n: c.expected_rank for n, c in cs.items()}
    assert ranks["attention_sink"] == W.n_heads - 1 == 3
    assert ranks["WNR_union_TaskDiff"] == 2 * R
    assert all(ranks[n] == R for n in SPEC_ORDER if n not in ("attention_sink", "WNR_union_TaskDiff"))
    assert cs["churn"].empty_layers == [3]


def test_zero_sink_residual_gives_a_declared_empty_sink(tiny_inputs):
    """A bos token that is also the pad token of an embedding with padding_idx has a zero row, so
    its normed residual at layer 0 is zero: every sink vector there is zero, and attention_sink
    says so (a per-layer exception) instead of returning noise; all layers zero: declared empty."""
    W, A = tiny_inputs
    sink0 = A.sink.clone()
    sink0[0] = 0.0
    sink = by_name(build_a_side(W, dataclasses.replace(A, sink=sink0), k_broad=K_SMALL))["attention_sink"]
    assert sink.expected_rank == W.n_heads - 1 and sink.rank_exceptions == {0: 0} and "zero" in sink.rank_note
    assert sink.undeclared_ranks() == {} and sink.ranks == {0: 0, 1: 3, 2: 3, 3: 3}
    none = by_name(build_a_side(W, dataclasses.replace(A, sink=torch.zeros_like(A.sink)), k_broad=K_SMALL))
    assert none["attention_sink"].expected_rank == 0 and none["attention_sink"].ranks == {0: 0, 1: 0, 2: 0, 3: 0}
    assert none["attention_sink"].undeclared_ranks() == {}


def test_global_bases_are_one_tensor_at_every_layer(syn):
    _, _, cs = syn
    for name in GLOBAL_NAMES:
        bases = list(cs[name].bases.values())
        assert all(B is bases[0] for B in bases), name
    for name in ("write", "qk_circuit", "TaskDiff_contrast", "randn_orthogonal"):
        assert not torch.equal(cs[name].bases[0], cs[name].bases[1]), name


def test_layer_selection_gives_the_same_bases_bit_for_bit(syn):
    """Global Grams always use every layer, so a basis at layer l does not depend on `layers`."""
    W, A, full = syn
    part = by_name(build_a_side(W, A, r=R, k_broad=K_SMALL, layers=[2, 1]))
    for name, c in part.items():
        assert c.layers == [1, 2]
        for layer in (1, 2):
            assert torch.equal(c.bases[layer], full[name].bases[layer]), (name, layer)
    assert part["churn"].empty_layers == []  # layer 3 (the last) not selected


def test_deterministic_bit_for_bit(syn):
    W, A, cs = syn
    again = by_name(build_a_side(W, A, r=R, k_broad=K_SMALL))
    for name, c in cs.items():
        for layer, B in c.bases.items():
            assert torch.equal(B, again[name].bases[layer]), (name, layer)
        assert c.diagnostics == again[name].diagnostics


@pytest.mark.parametrize("real", [np.float64, np.float32])
def test_gil_free_eigensolver_is_bit_identical_to_scipy(real):
    if linalg.gil_free_syevr(real) is None:
        pytest.skip("SciPy's bundled OpenBLAS is not available: linalg uses scipy.linalg.eigh itself")
    g = torch.Generator().manual_seed(0)
    M = torch.randn(80, 300, generator=g, dtype=DT)
    low = torch.randn(80, 5, generator=g, dtype=DT)
    for G in (M @ M.T, low @ low.T, torch.zeros(80, 80, dtype=DT)):
        A = G.numpy().astype(real)
        for k in (1, 8, 64, 80):
            w, z = linalg.gil_free_syevr(real)(A, 80 - k + 1, 80)
            w_ref, z_ref = scipy.linalg.eigh(A, subset_by_index=[80 - k, 79], driver="evr")
            assert np.array_equal(w, w_ref) and np.array_equal(z, z_ref), k


def test_single_precision_solve_spans_the_same_subspace():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(200, 600, generator=g, dtype=DT) @ torch.diag(torch.linspace(1, 3, 600, dtype=DT))
    G = M @ M.T
    double, single = linalg.top_eigvecs(G, 8), linalg.top_eigvecs(G, 8, single=True)
    assert linalg.is_orthonormal(single, 1e-12)  # re-orthonormalised in float64
    cos = linalg.principal_cosines(double, single)
    assert float(cos.min()) > 1 - 1e-6


def test_parallel_build_equals_the_serial_build(syn, monkeypatch):
    """Without the ctypes eigensolver there is no pool and every eigenproblem goes through
    linalg.top_eigvecs in order: the bases must be the same bits."""
    W, A, cs = syn
    monkeypatch.setattr(linalg, "_SYEVR", {"float64": None, "float32": None})
    serial = by_name(build_a_side(W, A, r=R, k_broad=K_SMALL))
    for name, c in cs.items():
        for layer, B in c.bases.items():
            assert torch.equal(B, serial[name].bases[layer]), (name, layer)


# ------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, r"r = 0 is outside"),
        ({"r": 65}, r"r = 65 is outside"),
        ({"r": 2.0}, "integer"),
        ({"k_broad": 0}, "k_broad = 0"),
        ({"k_broad": 65}, "k_broad = 65"),
        ({"layers": [4]}, r"layers \[4\] outside"),
        ({"layers": [1, 1]}, "duplicates"),
        ({"layers": []}, "empty"),
    ],
)
def test_bad_arguments_are_input_errors(syn, kwargs, match):
    W, A, _ = syn
    with pytest.raises(InputError, match=match):
        build_a_side(W, A, **kwargs)


def test_bad_captures_are_input_errors(syn):
    W, A, _ = syn
    with pytest.raises(InputError, match="attn_neg"):
        build_a_side(W, dataclasses.replace(A, attn_neg=A.attn_neg[:, :, 1:]))
    bad = A.up_in_clean.clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(InputError, match="NaN"):
        build_a_side(W, dataclasses.replace(A, up_in_clean=bad))
    with pytest.raises(InputError, match="3 layers"):
        build_a_side(W, synthetic_captures(n_layers=3))
    with pytest.raises(InputError, match="k_proj"):
        build_a_side(dataclasses.replace(W, n_kv_heads=4), A)


# ------------------------------------------------------------------------------ no leakage


def test_a_side_signature_cannot_receive_the_delta():
    params = inspect.signature(build_a_side).parameters
    assert list(params) == ["weights", "acts", "r", "k_broad", "layers", "seed", "release_tokens"]
    assert params["weights"].annotation in (BaseWeights, "BaseWeights")
    assert params["acts"].annotation in (ActivationCaptures, "ActivationCaptures")
    for field in dataclasses.fields(BaseWeights) + dataclasses.fields(ActivationCaptures):
        assert "delta" not in field.name and "label" not in field.name


def test_a_side_refuses_b_side_inputs(syn):
    W, _, _ = syn
    with pytest.raises(InputError, match="B-side"):
        build_a_side(W, synthetic_labels())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="BaseWeights"):
        build_a_side({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 64)}, synthetic_captures())  # type: ignore[arg-type]


def test_two_deltas_give_bit_identical_a_side_bases(tiny):
    """Captures under two different deltas (labels first, so a model left steered would show),
    then A-side captures and weights: every A-side basis is bit-identical, the B-side is not."""
    from subspace_sweep.capture import capture_activations, capture_labels
    from subspace_sweep.delta import random_delta
    from subspace_sweep.model import extract_base_weights
    from subspace_sweep.prompts import load_probe_set

    model, tok = tiny
    probes = load_probe_set()
    runs = []
    for seed in (1, 2):
        delta = random_delta(model, [1, 2], rank=2, seed=seed, scale=0.5)
        labels = capture_labels(model, tok, delta, probes)
        a_side = build_a_side(extract_base_weights(model), capture_activations(model, tok, probes), k_broad=K_SMALL)
        targets = {layer: {"act": Target.from_rows(f"act@{layer}", labels.eval[layer])} for layer in (1, 2)}
        runs.append((by_name(a_side), by_name(build_b_side(labels, targets))))
    (a1, b1), (a2, b2) = runs
    for name, c in a1.items():
        for layer, B in c.bases.items():
            assert torch.equal(B, a2[name].bases[layer]), (name, layer)
    assert not torch.equal(b1["TaskDiff_lora_fit"].bases[1], b2["TaskDiff_lora_fit"].bases[1])


# ------------------------------------------------------------------------------ spot checks per family


def _stack_T(*Ms):
    return torch.cat([linalg.as64(M) for M in Ms], dim=0)


def resid(lw) -> dict[str, torch.Tensor]:
    """The layer's readers in residual coordinates, as dense float64 products ``W @ diag(γ)``."""
    a, m = torch.diag(linalg.as64(lw.attn_gain)), torch.diag(linalg.as64(lw.mlp_gain))
    out = {n: linalg.as64(getattr(lw, n)) @ a for n in ("q", "k", "v")}
    out.update({n: linalg.as64(getattr(lw, n)) @ m for n in ("up", "gate")})
    return out


def unembed_resid(W) -> torch.Tensor:
    return linalg.as64(W.unembed) @ torch.diag(linalg.as64(W.final_gain))


def test_unembed_family(syn):
    W, _, cs = syn
    lm = unembed_resid(W)
    _, _, Vh = torch.linalg.svd(lm, full_matrices=False)
    assert same_span(cs["lm_head_read"].bases[0], Vh[:R].T)
    assert same_span(cs["logits_null"].bases[0], Vh[-R:].T, tol=1e-5)
    # logits_null ⟂ lm_head_read
    assert float((cs["logits_null"].bases[0].T @ cs["lm_head_read"].bases[0]).abs().max()) < 1e-6


def test_write_families_span_the_top_left_singular_vectors(syn):
    W, _, cs = syn
    for layer in range(W.n_layers):
        lw = W.layers[layer]
        # mlp_write spans the top eigenvectors of W_down W_downᵀ (by an SVD of W_down itself)
        assert same_span(cs["mlp_write"].bases[layer], top_left(lw.down)), layer
        assert same_span(cs["attn_write"].bases[layer], top_left(lw.o)), layer
        assert same_span(cs["write"].bases[layer], top_left(torch.cat([lw.o, lw.down], dim=1))), layer
    writers = torch.cat([torch.cat([lw.o, lw.down], dim=1) for lw in W.layers], dim=1)
    assert same_span(cs["global_write"].bases[0], top_left(writers))


def test_read_families_span_the_top_right_singular_vectors(syn):
    W, _, cs = syn
    for layer in range(W.n_layers):
        x = resid(W.layers[layer])
        refs = {
            "mlp_up_read": top_right(x["up"]), "mlp_gate_read": top_right(x["gate"]),
            "attn_qkv_read": top_right(_stack_T(x["q"], x["k"], x["v"])),
            "input_super": top_right(_stack_T(x["q"], x["k"], x["v"], x["up"], x["gate"])),
            "kv_super": top_right(_stack_T(x["k"], x["v"])),
        }
        for name, ref in refs.items():
            assert same_span(cs[name].bases[layer], ref), (name, layer)


def _read_gram64(lw) -> torch.Tensor:
    x = resid(lw)
    M = _stack_T(x["q"], x["k"], x["v"], x["up"], x["gate"])
    return M.T @ M


def test_global_and_downstream_read_and_their_write_not_x(syn):
    W, _, cs = syn
    lm = unembed_resid(W)
    L = W.n_layers
    global_gram = sum(_read_gram64(lw) for lw in W.layers) + lm.T @ lm
    evals, evecs = torch.linalg.eigh(global_gram)
    GR = evecs[:, -K_SMALL:]
    assert same_span(cs["global_read"].bases[0], evecs[:, -R:])
    _, _, Vh = torch.linalg.svd(lm, full_matrices=False)
    LM = Vh[:K_SMALL].T
    writers_all = torch.cat([linalg.as64(torch.cat([lw.o, lw.down], dim=1)) for lw in W.layers], dim=1)
    assert same_span(cs["global_write_not_global_read"].bases[0], top_left(linalg.project_out(GR, writers_all)))
    for layer in range(L):
        lw = W.layers[layer]
        writers = linalg.as64(torch.cat([lw.o, lw.down], dim=1))
        ds = lm.T @ lm + sum((_read_gram64(W.layers[j]) for j in range(layer + 1, L)), torch.zeros_like(lm.T @ lm))
        DS = torch.linalg.eigh(ds)[1][:, -K_SMALL:]
        for name, F in (("write_not_lm_head_read", LM), ("write_not_global_read", GR), ("write_not_downstream_read", DS)):
            B = cs[name].bases[layer]
            assert float((F.T @ B).abs().max()) < 1e-6, (name, layer)  # orthogonal to X's broad basis
            assert same_span(B, top_left(linalg.project_out(F, writers)), tol=1e-5), (name, layer)
        forbidden = linalg.union(cs["input_super"].bases[layer], cs["kv_super"].bases[layer], LM)
        B = cs["causally_isolated"].bases[layer]
        assert float((forbidden.T @ B).abs().max()) < 1e-6
        assert same_span(B, top_left(linalg.project_out(forbidden, writers)), tol=1e-5)
        isnl = cs["input_super_not_lm_read"].bases[layer]
        assert float((LM.T @ isnl).abs().max()) < 1e-6  # LM here: float64 SVD; the module: float32 Gram
        assert same_span(isnl, linalg.orthonormalize(linalg.project_out(LM, cs["input_super"].bases[layer])))


def _headwise(W: BaseWeights, layer: int, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent loops over query heads, in residual coordinates: (Σ_h D W_q,hᵀ diag(γ_q γ_k)
    W_k,kv(h) D, Σ_h W_o,h W_v,kv(h) D, sink rows W_o,h W_v,kv(h) s), D = diag(γ_attn)."""
    lw, hd, group = W.layers[layer], W.head_dim, W.group
    q, k, v, o = (linalg.as64(x) for x in (lw.q, lw.k, lw.v, lw.o))
    D = torch.diag(linalg.as64(lw.attn_gain))
    gq, gk = linalg.as64(lw.q_gain), linalg.as64(lw.k_gain)  # per row of W_q / W_k
    e = linalg.as64(sink)
    qk = torch.zeros(W.d_model, W.d_model, dtype=DT)
    ov = torch.zeros_like(qk)
    sinks = []
    for h in range(W.n_heads):
        g = h // group
        qh, kg, vg, oh = q[h * hd:(h + 1) * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd], o[:, h * hd:(h + 1) * hd]
        qk += D @ qh.T @ torch.diag(gq[h * hd:(h + 1) * hd] * gk[g * hd:(g + 1) * hd]) @ kg @ D
        ov += oh @ vg @ D
        sinks.append(oh @ (vg @ e))
    return qk, ov, torch.stack(sinks)


def test_head_wise_circuits_and_mlp_paths(syn):
    W, A, cs = syn
    for layer in range(W.n_layers):
        lw = W.layers[layer]
        qk, ov, sinks = _headwise(W, layer, A.sink[layer])
        assert same_span(cs["qk_circuit"].bases[layer], top_left(qk)), layer
        assert same_span(cs["attn_ov_write"].bases[layer], top_left(ov)), layer
        assert same_span(cs["attention_sink"].bases[layer], linalg.pca(sinks, R)), layer
        down, up, gate = (linalg.as64(x) for x in (lw.down, lw.up, lw.gate))
        Dm = torch.diag(linalg.as64(lw.mlp_gain))
        assert same_span(cs["mlp_roundtrip_write"].bases[layer], top_left(down @ up @ Dm)), layer
        x = linalg.as64(A.up_in_clean[layer])  # normed inputs: the raw weights apply to them
        silu = torch.nn.functional.silu(x @ gate.T)
        kernel = down @ torch.diag(silu.mean(dim=0)) @ up @ Dm
        assert same_span(cs["gate_kernel"].bases[layer], top_left(kernel), tol=1e-5), layer
        outputs = (silu * (x @ up.T)) @ down.T
        assert same_span(cs["gate_active_written"].bases[layer], linalg.pca(outputs, R)), layer


def test_attention_sink_uses_kv_head_h_over_group():
    """kv head 1's value projection is zero: exactly the query heads h with h // group == 1 have
    zero sink vectors, and the basis differs from the one a wrong mapping (h % n_kv) gives."""
    W = synthetic_weights(n_heads=4, n_kv=2)
    lw = W.layers[0]
    v = lw.v.clone()
    v[16:] = 0.0
    W = dataclasses.replace(W, layers=(dataclasses.replace(lw, v=v), *W.layers[1:]))
    A = synthetic_captures()
    rows = cands.attention_sink_vectors(W.layers[0].o, v, A.sink[0], 4, 2, 16)
    assert rows[2:].abs().max() == 0 and rows[:2].norm(dim=1).min() > 0
    _, _, ref = _headwise(W, 0, A.sink[0])
    assert torch.allclose(rows, ref, atol=1e-12)
    B = by_name(build_a_side(W, A, k_broad=K_SMALL))["attention_sink"].bases[0]
    assert same_span(B, linalg.pca(ref, R))
    o = linalg.as64(W.layers[0].o)
    wrong = torch.stack([o[:, h * 16:(h + 1) * 16] @ (linalg.as64(v)[(h % 2) * 16:(h % 2 + 1) * 16] @ linalg.as64(A.sink[0]))
                         for h in range(4)])
    assert not same_span(B, linalg.pca(wrong, R), tol=1e-3)


def test_activation_families(syn):
    W, A, cs = syn
    L = A.n_layers
    for layer in range(L):
        assert same_span(cs["layer_clean_resid_pca"].bases[layer], linalg.pca(A.clean[layer], R))
        assert same_span(cs["TaskDiff_contrast"].bases[layer], linalg.pca(A.persona_pos[layer] - A.persona_neg[layer], R))
        g = W.layers[layer].mlp_gain
        assert same_span(cs["up_proj_input_contrast"].bases[layer], linalg.pca((A.up_in_pos[layer] - A.up_in_neg[layer]) / g, R))
        if layer + 1 < L:
            assert same_span(cs["churn"].bases[layer], linalg.pca(A.clean[layer + 1] - A.clean[layer], R))
        else:
            assert cs["churn"].bases[layer].shape == (64, 0)
            assert cs["churn"].declared_rank(layer) == 0 and cs["churn"].empty_layers == [layer]
    # magnitude features: one basis for all layers, from |h| across every layer
    mag = linalg.as64(A.clean).abs()
    step = mag[1:] - mag[:-1]
    supp = torch.minimum(step.clamp_min(0).sum(0), (-step).clamp_min(0).sum(0))
    assert same_span(cs["suppressed"].bases[0], linalg.pca(supp, R))
    assert same_span(cs["amplified"].bases[0], linalg.pca((mag[-1] - mag[0]).clamp_min(0), R))
    assert same_span(cs["added_features"].bases[0], linalg.pca(step.clamp_min(0).sum(0), R))
    assert same_span(cs["global_clean_resid_pca"].bases[0], linalg.pca(A.clean.reshape(-1, 64), R))


@pytest.mark.parametrize("which", ["attn_min_taskdiff", "attn_max_taskdiff", "attn_diff_taskdiff", "attn_min_x_diffnorm_taskdiff"])
def test_attention_selected_is_uncentred_weighted_pca(syn, which):
    """Against linalg.weighted_pca_rows (full eigh of the kernel, every row kept) of diff·√w."""
    W, A, cs = syn
    for layer in range(A.n_layers):
        diff = linalg.as64(A.tokens_pos[layer] - A.tokens_neg[layer]).reshape(-1, 64)
        ap, an = linalg.as64(A.attn_pos[layer]).reshape(-1), linalg.as64(A.attn_neg[layer]).reshape(-1)
        norm = diff.norm(dim=1)
        w = {
            "attn_min_taskdiff": torch.minimum(ap, an),
            "attn_max_taskdiff": torch.maximum(ap, an),
            "attn_diff_taskdiff": (ap - an).abs(),
            "attn_min_x_diffnorm_taskdiff": torch.minimum(ap, an) * norm / norm[norm > 0].mean(),
        }[which]
        ref = linalg.weighted_pca_rows(diff * w.sqrt()[:, None], R)
        assert same_span(cs[which].bases[layer], ref, tol=1e-8), layer


def test_uncentred_kernel_route_matches_the_gram_route():
    g = torch.Generator().manual_seed(3)
    D = torch.randn(40, 12, generator=g, dtype=DT)
    w = torch.rand(40, generator=g, dtype=DT)
    w[::5] = 0.0
    (small,) = cands._uncentred_bases(D, [w], 4)  # n = 32 nonzero rows > d = 12: Gram route
    (wide,) = cands._uncentred_bases(D[:, :12].repeat(1, 4), [w], 4)  # d = 48 > n: kernel route
    assert same_span(small, linalg.weighted_pca_rows(D * w.sqrt()[:, None], 4), tol=1e-10)
    assert same_span(wide, linalg.weighted_pca_rows(D.repeat(1, 4) * w.sqrt()[:, None], 4), tol=1e-10)


def test_chars_clusters_reaches_rank_r_with_k_r_plus_1(syn):
    W, A, cs = syn
    c = cs["chars_clusters"]
    for layer in range(A.n_layers):
        samples = torch.cat([A.clean[layer], A.persona_pos[layer], A.persona_neg[layer]])
        centroids, sizes = cands.kmeans_centroids(samples, R + 1)
        assert centroids.shape == (R + 1, 64) and int(sizes.sum()) == samples.shape[0]
        assert same_span(c.bases[layer], linalg.pca(centroids, R))
        assert c.diagnostics[layer]["k"] == R + 1
        assert c.bases[layer].shape[1] == R


def _kmeans_loops(X: torch.Tensor, k: int, iters: int = 8) -> torch.Tensor:
    """Independent reference: the seed's per-cluster loops (cdist, argmin, masked means)."""
    Xc = X - X.mean(0, keepdim=True)
    order = torch.argsort(Xc.norm(dim=1), descending=True, stable=True)
    C = Xc[order[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(Xc, C, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
        C = torch.stack([Xc[assign == j].mean(0) if bool((assign == j).any()) else C[j] for j in range(k)])
    return C


def test_kmeans_matches_the_loop_reference_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 10, generator=g, dtype=DT) * 3
    X = torch.cat([c + torch.randn(15, 10, generator=g, dtype=DT) for c in centres])
    C1, sizes = cands.kmeans_centroids(X, 5)
    C2, _ = cands.kmeans_centroids(X, 5)
    assert torch.equal(C1, C2)
    assert int(sizes.sum()) == 60
    assert torch.allclose(C1, _kmeans_loops(X, 5), atol=1e-12)


def test_kmeans_empty_cluster_keeps_its_centroid():
    X = torch.tensor([[3.0, 1.0], [3.0, 1.0], [-1.5, -2.0], [-1.0, -2.5], [-4.0, 2.0]], dtype=DT)
    C, sizes = cands.kmeans_centroids(X, 3)  # two of the three largest-norm points coincide
    assert sizes.tolist() == [3, 0, 2]  # a cluster ends empty ...
    assert torch.isfinite(C).all()  # ... and keeps a centroid (no NaN mean of nothing)
    assert torch.allclose(C, _kmeans_loops(X, 3), atol=1e-12)


def test_rotation_contrast_finds_a_planted_rotation_plane():
    """persona+ = persona- rotated by 40° in the (e1, e2) plane: the top-2 skew directions are that plane."""
    g = torch.Generator().manual_seed(0)
    d, n = 64, 16
    X = torch.zeros(n, d, dtype=DT)
    X[:, :10] = torch.randn(n, 10, generator=g, dtype=DT)
    th = math.radians(40)
    Rot = torch.eye(d, dtype=DT)
    Rot[1, 1], Rot[1, 2], Rot[2, 1], Rot[2, 2] = math.cos(th), -math.sin(th), math.sin(th), math.cos(th)
    B = cands.rotation_contrast_basis(X, X @ Rot, 2)
    assert same_span(B, torch.eye(d, dtype=DT)[:, 1:3], tol=1e-8)
    # a rank-2 skew part: asking for r = 8 gives the 2 real directions, not 6 arbitrary ones
    assert cands.rotation_contrast_basis(X, X @ Rot, 8).shape[1] == 2


def test_compounds(syn):
    W, A, cs = syn
    c = cs["qk_x_chars_clusters"]
    for layer in range(W.n_layers):
        qk, ch = cs["qk_circuit"].bases[layer], cs["chars_clusters"].bases[layer]
        cos = linalg.principal_cosines(qk, ch)[:R]
        diag = c.diagnostics[layer]
        assert diag["cos_mean"] == pytest.approx(float(cos.mean()), abs=1e-12)
        assert diag["cos_min"] == pytest.approx(float(cos.min()), abs=1e-12)
        assert 0.0 <= diag["cos_min"] <= diag["cos_mean"] <= 1.0
        union = cs["WNR_union_TaskDiff"].bases[layer]
        assert union.shape[1] == 2 * R
        for part in ("write_not_downstream_read", "TaskDiff_contrast"):
            P = cs[part].bases[layer]
            assert float((P - union @ (union.T @ P)).abs().max()) < 1e-9  # both inside the union


def test_randn_orthogonal_is_seeded_by_seed_and_layer(syn):
    W, A, cs = syn
    r0 = cs["randn_orthogonal"]
    again = by_name(build_a_side(W, A, k_broad=K_SMALL, layers=[2], seed=0))["randn_orthogonal"]
    other = by_name(build_a_side(W, A, k_broad=K_SMALL, layers=[2], seed=1))["randn_orthogonal"]
    assert torch.equal(r0.bases[2], again.bases[2])
    assert not torch.equal(r0.bases[2], other.bases[2])
    assert not torch.equal(r0.bases[1], r0.bases[2])
    assert r0.axis_kind == "null"


# ------------------------------------------------------------------------------ B-side


def _targets(labels: SteeredLabels, layers, *, kinds=("act", "o_proj", "down_proj", "combined"), lora_rank=2):
    g = torch.Generator().manual_seed(5)
    out = {}
    for layer in layers:
        # float64: a float32 Gram would put round-off eigenvalues (~1e-7) above the rank tolerance
        Mo = torch.randn(64, lora_rank, generator=g, dtype=DT) @ torch.randn(lora_rank, 64, generator=g, dtype=DT)
        Md = torch.randn(64, 12, generator=g, dtype=DT) @ torch.randn(12, 192, generator=g, dtype=DT)
        per = {"act": Target.from_rows("act", labels.eval[layer]), "o_proj": Target.from_matrix("o", Mo),
               "down_proj": Target.from_matrix("d", Md), "combined": Target.balanced("c", {"o": Mo, "d": Md})}
        out[layer] = {k: per[k] for k in kinds}
    return out


def test_b_side_references():
    labels = synthetic_labels()
    targets = _targets(labels, [1, 2])
    targets[2] = {k: t for k, t in targets[2].items() if k != "o_proj"}  # o_proj absent at layer 2
    cs = by_name(build_b_side(labels, targets, r=R))
    assert list(cs) == ["TaskDiff_lora_fit", "oracle_act", "oracle_o_proj", "oracle_down_proj", "oracle_combined"]
    for c in cs.values():
        assert c.side == "B" and c.axis_kind == "reference" and c.layers == [1, 2]
        assert c.undeclared_ranks() == {}, (c.name, c.ranks)
        for B in c.bases.values():
            assert linalg.is_orthonormal(B) and B.dtype == DT
    for layer in (1, 2):
        assert same_span(cs["TaskDiff_lora_fit"].bases[layer], linalg.pca(labels.fit[layer], R))
        assert torch.equal(cs["oracle_act"].bases[layer], targets[layer]["act"].oracle_basis(R))
    assert cs["oracle_o_proj"].ranks == {1: 2, 2: 0}  # a rank-2 delta: a rank-2 oracle, declared
    assert cs["oracle_o_proj"].expected_rank == 2 and cs["oracle_o_proj"].empty_layers == [2]
    assert cs["oracle_down_proj"].expected_rank == R


def test_b_side_built_layer_by_layer_and_merged_equals_one_build():
    """The sweep builds its B-side one layer at a time (issue 16); merge_layers gives exactly the
    candidates of one build over all layers: bases, declared ranks and their exceptions."""
    labels = synthetic_labels()
    targets = _targets(labels, [1, 2, 3], lora_rank=2)
    targets[2] = {k: t for k, t in targets[2].items() if k != "o_proj"}  # an exception: rank 0 at layer 2
    whole = build_b_side(labels, targets, r=R)
    merged = merge_layers([build_b_side(labels, {layer: targets[layer]}, r=R) for layer in (1, 2, 3)])
    assert [c.name for c in merged] == [c.name for c in whole]
    for a, b in zip(whole, merged):
        assert (a.expected_rank, a.rank_exceptions, a.rank_note, a.layers) == (b.expected_rank, b.rank_exceptions,
                                                                               b.rank_note, b.layers), a.name
        assert all(torch.equal(a.bases[layer], b.bases[layer]) for layer in a.layers)
    assert by_name(merged)["oracle_o_proj"].rank_exceptions == {2: 0}
    with pytest.raises(ValueError, match="overlap"):
        merge_layers([build_b_side(labels, {1: targets[1]}, r=R)] * 2)
    assert merge_layers([]) == []


def test_b_side_input_errors():
    labels = synthetic_labels()
    with pytest.raises(InputError, match="unknown target kinds"):
        build_b_side(labels, {1: {"q_proj": Target.from_rows("x", labels.eval[1])}})
    with pytest.raises(InputError, match="outside"):
        build_b_side(labels, {9: {}})
    with pytest.raises(InputError, match="SteeredLabels"):
        build_b_side(synthetic_captures(), {})  # type: ignore[arg-type]


def test_ranking_pool_partitions_the_a_side(syn):
    _, _, cs = syn
    labels = synthetic_labels()
    everything = [*cs.values(), *build_b_side(labels, _targets(labels, [1]), r=R)]
    joint = ranking_pool(everything, "joint")
    read = ranking_pool(everything, "read")
    assert {c.name for c in read} == READ_NAMES
    assert {c.name for c in joint} == set(A_SIDE_NAMES) - READ_NAMES
    assert "randn_orthogonal" in {c.name for c in joint}
    with pytest.raises(InputError, match="panel"):
        ranking_pool(everything, "write")  # type: ignore[arg-type]


def test_rotation_contrast_of_a_reflection_is_empty_and_declared():
    """With m = 2 (n = 3 prompts) the Procrustes R can be a reflection: R − Rᵀ = 0, so the basis is
    empty (round-off directions are not returned) and the declared rank says so at that layer."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 3
    X = torch.zeros(n, d, dtype=DT)
    X[:, :2] = torch.randn(n, 2, generator=g, dtype=DT)  # persona- rows in the (e0, e1) plane
    flip = torch.eye(d, dtype=DT)
    flip[0, 0] = -1.0
    joint, R = cands.procrustes_rotation(X, X @ flip)
    assert joint.shape[1] == 2 and float(torch.linalg.det(R)) < 0 and cands.skew_rank_bound(R) == 0
    assert cands.rotation_contrast_basis(X, X @ flip, 8).shape[1] == 0
    # a proper rotation of the same rows keeps its rank-2 skew part
    rot = torch.eye(d, dtype=DT)
    rot[:2, :2] = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=DT)
    assert cands.skew_rank_bound(cands.procrustes_rotation(X, X @ rot)[1]) == 2
    assert cands.rotation_contrast_basis(X, X @ rot, 8).shape[1] == 2


def test_building_from_views_leaves_the_model_bit_identical(tiny):
    """extract_base_weights returns views of the model's parameters: no builder may write to them."""
    from subspace_sweep.capture import capture_activations
    from subspace_sweep.model import extract_base_weights, state_dict_sha256
    from subspace_sweep.prompts import load_probe_set

    model, tok = tiny
    before = state_dict_sha256(model)
    W = extract_base_weights(model)
    assert W.layers[0].down.data_ptr() == model.model.layers[0].mlp.down_proj.weight.data_ptr()
    build_a_side(W, capture_activations(model, tok, load_probe_set()), k_broad=K_SMALL)
    assert state_dict_sha256(model) == before
