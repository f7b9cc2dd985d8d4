"""Every candidate hypothesis (SPEC §4): the A-side bases, the null baseline, the B-side references.

A *candidate* is a named, per-layer orthonormal basis of the residual stream (float64, d x r_eff)
with its family, its axis kind and a one-line definition. Three rules are enforced by
construction rather than by convention:

- **One tag table.** ``axis_kind`` is looked up in ``FAMILY_AXIS`` (family -> axis kind); a
  family missing from the table, or a family on the wrong side (a ``B:`` family on an A-side
  candidate or the reverse), cannot be constructed. Rankings take their input from
  ``ranking_pool`` only, which admits A-side candidates only (SPEC §6 concerns 3 and 4).
- **No leakage.** ``build_a_side`` takes ``BaseWeights`` and ``ActivationCaptures`` and nothing
  else: neither type can hold anything computed with the LoRA delta. The B-side
  (``build_b_side``) is the only builder that sees the steered labels and the delta's targets.
- **Rank honesty.** Every candidate declares the rank it should have (``expected_rank``, with
  per-layer exceptions such as churn's empty last layer) and why it can be below r
  (``rank_note``); bases report their effective rank through their shape, and
  ``undeclared_ranks()`` lists every layer where the two disagree.

Shared work is done once (SPEC §4 notation): the per-layer component Grams
``W_Xᵀ W_X`` / ``W W ᵀ``, ``read_gram(l)``, the downstream read Grams
``DS(l) = lmᵀlm + Σ_{j>l} read_gram(j)`` (a reverse cumulative sum that ends at the global read
Gram), and the unembedding's right singular vectors through its d x d Gram. ``left(X)`` of a
d x n matrix is always the top eigenvectors of the d x d Gram ``X Xᵀ``.

Cost (Qwen3-0.6B shapes): per selected layer 16 float32 top-r eigenproblems of 1024 x 1024, the
float64 top-K of DS(l) and four float64 token kernels dominate, then the Gram GEMMs of all layers.
GEMMs run on every torch thread; the eigenproblems run as independent single-threaded LAPACK calls
(``linalg.top_eigh``, GIL-free) on a thread pool of the same size (``compute.policy``); every small
op runs single-threaded. Results do not depend on the pool (bit-identical to a serial build with
``linalg.top_eigvecs``).
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import compute, linalg
from .capture_types import ActivationCaptures, SteeredLabels
from .errors import InputError
from .scoring import Target, stable_seed
from .weights import BaseWeights, LayerWeights, residual_columns, residual_gram, residual_rows

DTYPE = torch.float64

# ---------------------------------------------------------------------------- the tag table

#: THE table family -> axis kind (SPEC §4). Nothing else assigns an axis kind.
FAMILY_AXIS: dict[str, str] = {
    "W:unembed": "read",
    "W:read": "read",
    "W:write": "write",
    "W:write-not-read": "write",
    "W:OV": "write",
    "W:MLP": "write",
    "W:QK": "mixed",
    "act:clean": "mixed",
    "act:baseline": "mixed",
    "act:persona": "mixed",
    "act:attn-selected": "mixed",
    "act:up_proj": "mixed",
    "act:MLP": "mixed",
    "act:cluster": "mixed",
    "act:rotation": "mixed",
    "compound": "mixed",
    "baseline": "null",
    # Gradient bases (SPEC §13): the base model's own loss gradient at its residual writers. They
    # never see the trained pair (A-side) but most of them see the behaviour's training examples:
    # the `sees` column says so in every table.
    "grad:behaviour": "write",
    "grad:shared": "write",
    "grad:heldout": "write",
    "grad:neutral": "write",
    "grad:family": "write",
    # B-side: built from the LoRA (its steered labels or its weight delta). Never ranked.
    "B:label": "reference",
    "B:oracle": "reference",
}

AXIS_KINDS = ("read", "write", "mixed", "null", "reference")

#: What a candidate is built from (the ``sees`` column of every table, SPEC §4 and §13): the base
#: model's weights, its activations on the shipped prompts, both, the behaviour's training examples
#: (prompts with the adapters' answers: the gradient bases), nothing (the random baseline) or the
#: trained pair itself (B-side). A-side rows that see ``BEHAVIOUR_DATA`` are not the seed's question
#: ("from the base model alone"): the conclusion names the best of the others separately.
BEHAVIOUR_DATA = "behaviour data"
SEES = ("weights", "activations", "weights+activations", BEHAVIOUR_DATA, "nothing", "trained pair")
FAMILY_SEES: dict[str, str] = {
    **{f: "weights" for f in FAMILY_AXIS if f.startswith("W:")},
    **{f: "activations" for f in FAMILY_AXIS if f.startswith("act:")},
    "compound": "weights+activations",
    "baseline": "nothing",
    "grad:behaviour": BEHAVIOUR_DATA,
    "grad:shared": BEHAVIOUR_DATA,
    "grad:heldout": BEHAVIOUR_DATA,
    "grad:family": BEHAVIOUR_DATA,
    # the base model's own next-token loss on the probe prompts: no answer of the behaviour
    "grad:neutral": "weights+activations",
    "B:label": "trained pair",
    "B:oracle": "trained pair",
}
#: Weight-family candidates that also read a base-model capture (SPEC §4).
SEES_OVERRIDE: dict[str, str] = {"gate_kernel": "weights+activations", "attention_sink": "weights+activations"}


def sees_of(name: str, family: str) -> str:
    """What the candidate ``name`` of ``family`` is built from (``FAMILY_SEES``, ``SEES_OVERRIDE``)."""
    return SEES_OVERRIDE.get(name, FAMILY_SEES[family])

#: Which axis kinds each A-side ranking panel admits (SPEC §5: "A-side write + mixed rows
#: jointly; read rows in their own table"; the null baseline is shown with the joint panel).
PANEL_AXES: dict[str, frozenset[str]] = {
    "joint": frozenset({"write", "mixed", "null"}),
    "read": frozenset({"read"}),
}

#: k-means iterations of chars_clusters (SPEC §4) and the joint-PCA rank cap of rotation_contrast.
KMEANS_ITERS = 8
ROTATION_MAX_RANK = 32


def _is_b_family(family: str) -> bool:
    return family.startswith("B:")


def _check_family_side(name: str, family: str, side: str) -> str:
    """The axis kind of a (family, side) pair, or ValueError: a mis-tagged candidate is a bug."""
    if family not in FAMILY_AXIS:
        raise ValueError(f"candidate {name!r}: family {family!r} is not in FAMILY_AXIS")
    if side not in ("A", "B"):
        raise ValueError(f"candidate {name!r}: side must be 'A' or 'B', got {side!r}")
    if (side == "B") != _is_b_family(family):
        raise ValueError(
            f"candidate {name!r}: family {family!r} belongs to side {'B' if _is_b_family(family) else 'A'}, "
            f"not {side!r} (B-side families start with 'B:' and are never ranked)"
        )
    return FAMILY_AXIS[family]


# ---------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class CandidateSpec:
    """What a candidate is, usable without building it (``explain NAME``, ``definitions.md``)."""

    name: str
    family: str
    definition: str
    side: str = "A"

    def __post_init__(self) -> None:
        _check_family_side(self.name, self.family, self.side)

    @property
    def axis_kind(self) -> str:
        return FAMILY_AXIS[self.family]

    @property
    def sees(self) -> str:
        return sees_of(self.name, self.family)


_S = CandidateSpec
_WRITERS = "[W_o‖W_down]"
_ATTN_W = (
    "diff = tokens⁺ − tokens⁻ at every real token of the persona± prompts; rows diff·√w, then the "
    "top-r right singular vectors of those rows, NOT centred (zero-weight padding rows drop out and "
    "the mean contrast is kept)"
)

#: Every candidate in SPEC §4 table order (42 A-side + randn_orthogonal), then the B-side references.
DEFINITIONS: tuple[CandidateSpec, ...] = (
    _S("lm_head_read", "W:unembed", "top-r right singular vectors of the unembedding lm·diag(γ_final) (what the logits read of the residual); the same basis at every layer"),
    _S("logits_null", "W:unembed", "bottom-r right singular vectors of lm·diag(γ_final) (the directions the logits are least sensitive to); same basis at every layer"),
    _S("global_read", "W:read", "top-r eigenvectors of the global read Gram Σ_l read_gram(l) + lmᵀlm, read_gram(l) = Σ_{X∈q,k,v,up,gate} W_XᵀW_X with every reader in residual coordinates (W·diag(γ) of its norm), lm = lm·diag(γ_final); same basis at every layer"),
    _S("global_write", "W:write", f"top-r left singular vectors of {_WRITERS} of all layers; same basis at every layer"),
    _S("global_write_not_global_read", "W:write-not-read", f"left((I − P_GRK)·{_WRITERS} of all layers), GRK = top-K eigenvectors of the global read Gram (K = k_broad); same basis at every layer"),
    _S("write", "W:write", f"top-r left singular vectors of the layer's {_WRITERS}"),
    _S("attn_write", "W:write", "top-r left singular vectors of the layer's W_o"),
    _S("mlp_write", "W:write", "top-r left singular vectors of the layer's W_down"),
    _S("write_not_lm_head_read", "W:write-not-read", f"left((I − P_LMK)·{_WRITERS}), LMK = top-K right singular vectors of lm"),
    _S("write_not_global_read", "W:write-not-read", f"left((I − P_GRK)·{_WRITERS}), GRK = top-K eigenvectors of the global read Gram"),
    _S("write_not_downstream_read", "W:write-not-read", f"left((I − P_DSK(l))·{_WRITERS}), DSK(l) = top-K eigenvectors of lmᵀlm + Σ_{{j>l}} read_gram(j)"),
    _S("mlp_up_read", "W:read", "top-r right singular vectors of the layer's W_up·diag(γ_mlp)"),
    _S("mlp_gate_read", "W:read", "top-r right singular vectors of the layer's W_gate·diag(γ_mlp)"),
    _S("attn_qkv_read", "W:read", "top-r right singular vectors of the layer's [W_q; W_k; W_v]·diag(γ_attn)"),
    _S("attn_ov_write", "W:OV", "top-r left singular vectors of Σ_h W_o,h W_v,kv(h)·diag(γ_attn), query head h using kv head h // (n_heads/n_kv) (head-correct GQA)"),
    _S("mlp_roundtrip_write", "W:MLP", "top-r left singular vectors of W_down W_up·diag(γ_mlp) (the residual-to-residual linear MLP path)"),
    _S("qk_circuit", "W:QK", "top-r left singular vectors of Σ_h diag(γ_attn) W_q,hᵀ diag(γ_q ⊙ γ_k) W_k,kv(h) diag(γ_attn) (three gains: the attention norm's and q_norm/k_norm's where the model has them), query head h using kv head h // (n_heads/n_kv) (head-correct GQA)"),
    _S("input_super", "W:read", "top-r right singular vectors of the layer's [W_q·diag(γ_attn); W_k·diag(γ_attn); W_v·diag(γ_attn); W_up·diag(γ_mlp); W_gate·diag(γ_mlp)] (top eigenvectors of read_gram(l))"),
    _S("kv_super", "W:read", "top-r right singular vectors of the layer's [W_k; W_v]·diag(γ_attn)"),
    _S("gate_kernel", "W:MLP", "top-r left singular vectors of W_down·diag(mean_i silu(W_gate x_i))·W_up·diag(γ_mlp), x_i = clean FIT inputs of mlp.up_proj (the MLP norm's outputs)"),
    _S("attention_sink", "W:OV", "centred PCA over query heads h of the sink vectors W_o,h W_v,kv(h) s_l, s_l = the sink token (bos, else eos) alone at position 0 as layer l's attention reads it (its attention norm's output, captured on the base model); kv head h // group; rank ≤ n_heads − 1"),
    _S("causally_isolated", "W:write-not-read", f"left((I − P_F)·{_WRITERS}), F = orthonormal union(input_super, kv_super, LMK)"),
    _S("input_super_not_lm_read", "W:read", "the first r columns of orthonormalize((I − P_LMK)·input_super)"),
    _S("suppressed", "act:clean", "centred PCA over FIT prompts of min(Σ_l relu(Δ_l|h|), Σ_l relu(−Δ_l|h|)), Δ_l|h| = |h_{l+1}| − |h_l| over all layers of the clean activations; same basis at every layer"),
    _S("amplified", "act:clean", "centred PCA over FIT prompts of relu(|h_last| − |h_first|) of the clean activations; same basis at every layer"),
    _S("added_features", "act:clean", "centred PCA over FIT prompts of Σ_l relu(|h_{l+1}| − |h_l|) of the clean activations; same basis at every layer"),
    _S("global_clean_resid_pca", "act:baseline", "centred PCA of the clean FIT activations of all layers pooled; same basis at every layer"),
    _S("global_persona_resid_pca", "act:baseline", "centred PCA of the persona+ and persona- FIT activations of all layers pooled; same basis at every layer"),
    _S("layer_clean_resid_pca", "act:baseline", "centred PCA of the layer's clean FIT activations"),
    _S("TaskDiff_contrast", "act:persona", "centred PCA of persona+ − persona- at the layer (FIT, last token)"),
    _S("attn_min_taskdiff", "act:attn-selected", f"weighted PCA, w = min(a⁺, a⁻) (final token's attention to each position, mean over heads); {_ATTN_W}"),
    _S("attn_max_taskdiff", "act:attn-selected", f"weighted PCA, w = max(a⁺, a⁻); {_ATTN_W}"),
    _S("attn_diff_taskdiff", "act:attn-selected", f"weighted PCA, w = |a⁺ − a⁻|; {_ATTN_W}"),
    _S("attn_min_x_diffnorm_taskdiff", "act:attn-selected", f"weighted PCA, w = min(a⁺, a⁻)·‖diff‖ / (mean of the nonzero ‖diff‖ at the layer); {_ATTN_W}"),
    _S("up_proj_input_contrast", "act:up_proj", "centred PCA of (up_in⁺ − up_in⁻)/γ_mlp, up_in = the inputs of mlp.up_proj under persona± (the MLP norm's outputs γ_mlp ⊙ x/rms(x)), so the rows are x⁺/rms(x⁺) − x⁻/rms(x⁻) in residual coordinates"),
    _S("up_proj_output_written_contrast", "act:up_proj", "centred PCA of up_written⁺ − up_written⁻ (mlp.up_proj outputs mapped back by W_downᵀ)"),
    _S("gate_active_written", "act:MLP", "centred PCA of the MLP outputs (silu(W_gate x)⊙(W_up x))·W_downᵀ over the clean FIT inputs x of mlp.up_proj"),
    _S("chars_clusters", "act:cluster", f"k-means with k = r + 1 clusters (so the centroid differences reach rank r; the seed's k = r gave r − 1) on the centred clean ∪ persona± activations at the layer, init = the k largest-norm points, {KMEANS_ITERS} Lloyd iterations; centred PCA of the centroids"),
    _S("churn", "act:clean", "centred PCA of h_{l+1} − h_l (clean FIT); empty at the last layer, where there is no h_{l+1}"),
    _S("rotation_contrast", "act:rotation", f"joint centred PCA of persona- ∪ persona+ of rank m = min({ROTATION_MAX_RANK}, n − 1) (each side's centred rows have rank ≤ n − 1: a wider m leaves the Procrustes rotation arbitrary on the rest); orthogonal Procrustes R taking the centred persona- projections to the persona+ ones; top-r left singular vectors of R − Rᵀ mapped back (singular values of R − Rᵀ come in pairs: an odd r splits a pair)"),
    _S("qk_x_chars_clusters", "compound", "principal-vector bisector of qk_circuit and chars_clusters ((a_i + b_i)/‖a_i + b_i‖ for the r most aligned principal pairs); the principal cosines are reported (mean, min)"),
    _S("WNR_union_TaskDiff", "compound", "orthonormal union of write_not_downstream_read and TaskDiff_contrast (rank ≤ 2r)"),
    _S("randn_orthogonal", "baseline", "a uniformly random orthonormal d x r basis, seeded by (seed, layer): the null made visible"),
    # B-side references: built from the LoRA; never ranked as hypotheses.
    _S("TaskDiff_lora_fit", "B:label", "centred PCA of the FIT-half steered label (h at α=+1 minus α=−1): a held-out estimate on EVAL, NOT a ceiling", side="B"),
    _S("oracle_act", "B:oracle", "Ky Fan oracle of the activation target: top-r eigenvectors of mean_i u_i u_iᵀ/‖u_i‖² over the EVAL label rows", side="B"),
    _S("oracle_o_proj", "B:oracle", "Ky Fan oracle of the o_proj weight target: top-r left singular vectors of the delta's o_proj at the layer", side="B"),
    _S("oracle_down_proj", "B:oracle", "Ky Fan oracle of the down_proj weight target: top-r left singular vectors of the delta's down_proj at the layer", side="B"),
    _S("oracle_combined", "B:oracle", "Ky Fan oracle of the Frobenius-balanced target Σ_T M_T M_Tᵀ/‖M_T‖²_F over the layer's o_proj and down_proj deltas", side="B"),
)

_GRAD = ("at each scored layer, the top-r eigenvectors of Σ_T G_T G_Tᵀ/‖G_T‖²_F over the residual writers T ∈ "
         "{o_proj, down_proj} (diag(γ_post)·G_T behind a post-projection norm): the combined weight target's "
         "construction (SPEC §5) with the gradient G_T in place of the delta, where G_T = ∇_W L of the writer's "
         "weight at the base model (one backward pass per loss, nothing trained)")
#: The gradient bases (SPEC §13, issue 34): A-side (never the trained pair), built beside the seed's
#: 43 by ``gradients.py`` (outside the A-side cache: the family variant reads the delta's adapter record).
GRAD_DEFINITIONS: tuple[CandidateSpec, ...] = (
    _S("grad_behaviour", "grad:behaviour", f"{_GRAD}; L = L⁻ − L⁺, the − and + adapters' training losses (mean "
       "next-token cross-entropy on the assistant answers, `subspace-sweep train`'s examples and loss) on the "
       "pair's training examples: the first SGD step's delta w = η·(∇L⁻ − ∇L⁺) of a full-weight fine-tune"),
    _S("grad_shared", "grad:shared", f"{_GRAD}; L = L⁻ + L⁺ on the same examples: what both adapters learn "
       "(the answer format), not the behaviour"),
    _S("grad_heldout", "grad:heldout", f"{_GRAD}; L = L⁻ − L⁺ on the held-out examples only (the shipped claims "
       "after the first n_lora_train_topics, or the --behaviour lines after --n-train): never a prompt the pair "
       "trained on; empty where there are none"),
    _S("grad_neutral", "grad:neutral", f"{_GRAD}; L = the next-token loss of every token of the training examples' "
       "prompts (as the chat template renders them, no answer): a control, what any fine-tune on these prompts "
       "shares"),
    _S("grad_behaviour_family", "grad:family", "grad_behaviour in the adapter family's own parametrization, from "
       "the adapter config the delta records (`subspace-sweep delta`): the first step's delta of the parameters "
       "that were trained, per writer before the same balanced combination: LoRA (B = 0 at init) G·AᵀA with A "
       "the init rebuilt from the recorded peft config and seed; IA3 W·diag(Σ_i (G⊙W)_i·) on a feed-forward "
       "module (it scales the input), diag(Σ_j (G⊙W)_·j)·W on the others (it scales the output); OFT W·P(WᵀG − "
       "GᵀW), P the block-diagonal part of the rotation's blocks (first order in its skew generator); G = ∇L⁻ − "
       "∇L⁺. Empty where the delta records no family this tool models (DoRA, PiSSA, BOFT, ..., or no record)"),
)

_SPECS: dict[str, CandidateSpec] = {s.name: s for s in (*DEFINITIONS, *GRAD_DEFINITIONS)}
#: The seed's A-side (SPEC §4 table order): what ``build_a_side`` builds and the A-side cache holds.
A_SIDE_NAMES: tuple[str, ...] = tuple(s.name for s in DEFINITIONS if s.side == "A")
GRAD_NAMES: tuple[str, ...] = tuple(s.name for s in GRAD_DEFINITIONS)
B_SIDE_NAMES: tuple[str, ...] = tuple(s.name for s in DEFINITIONS if s.side == "B")
CANDIDATE_NAMES: tuple[str, ...] = tuple(_SPECS)
#: B-side oracle name per target kind (the targets' inner keys).
ORACLE_NAMES: dict[str, str] = {
    "act": "oracle_act", "o_proj": "oracle_o_proj", "down_proj": "oracle_down_proj", "combined": "oracle_combined",
}


def get_spec(name: str) -> CandidateSpec:
    """The definition of one candidate by name; InputError (with close names) if unknown."""
    try:
        return _SPECS[name]
    except KeyError:
        close = difflib.get_close_matches(name, CANDIDATE_NAMES, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"unknown candidate {name!r}{hint} ({len(CANDIDATE_NAMES)} known)") from None


# ---------------------------------------------------------------------------- the candidate


@dataclass(frozen=True, eq=False)
class Candidate:
    """One hypothesis (or reference) with its per-layer bases.

    ``expected_rank`` is the declared rank at every layer except those in ``rank_exceptions``
    (layer -> declared rank, e.g. churn's last layer -> 0); ``rank_note`` says why a declared rank
    is below r. ``diagnostics`` holds per-layer numbers (e.g. the bisector's principal cosines).
    """

    name: str
    family: str
    definition: str
    side: str
    bases: dict[int, Tensor]
    expected_rank: int
    rank_note: str = ""
    diagnostics: dict[int, dict[str, float]] = field(default_factory=dict)
    rank_exceptions: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_family_side(self.name, self.family, self.side)
        for layer, B in self.bases.items():
            if B.ndim != 2 or B.dtype != DTYPE:
                raise ValueError(f"candidate {self.name!r} layer {layer}: basis must be a 2-D float64 tensor")

    @property
    def axis_kind(self) -> str:
        return FAMILY_AXIS[self.family]

    @property
    def sees(self) -> str:
        return sees_of(self.name, self.family)

    @property
    def layers(self) -> list[int]:
        return sorted(self.bases)

    @property
    def ranks(self) -> dict[int, int]:
        """Effective rank per layer (the number of basis columns)."""
        return {layer: int(B.shape[1]) for layer, B in self.bases.items()}

    def declared_rank(self, layer: int) -> int:
        return self.rank_exceptions.get(layer, self.expected_rank)

    @property
    def empty_layers(self) -> list[int]:
        """Layers whose basis is declared empty (degenerate input, absent target)."""
        return sorted(layer for layer in self.bases if self.declared_rank(layer) == 0)

    def undeclared_ranks(self) -> dict[int, tuple[int, int]]:
        """layer -> (effective rank, declared rank) wherever they differ: a silent rank change."""
        return {
            layer: (r_eff, self.declared_rank(layer))
            for layer, r_eff in self.ranks.items()
            if r_eff != self.declared_rank(layer)
        }


def ranking_pool(candidates: Sequence[Candidate], panel: Literal["joint", "read"]) -> list[Candidate]:
    """The candidates an A-side ranking may contain: side A and an axis kind of the panel.

    "joint" = write, mixed and the null baseline; "read" = read. B-side references never qualify.
    """
    if panel not in PANEL_AXES:
        raise InputError(f"unknown ranking panel {panel!r}; expected one of {sorted(PANEL_AXES)}")
    axes = PANEL_AXES[panel]
    return [c for c in candidates if c.side == "A" and c.axis_kind in axes]


# ---------------------------------------------------------------------------- GQA, head-correct


def _check_heads(n_heads: int, n_kv: int, head_dim: int) -> int:
    if n_heads <= 0 or n_kv <= 0 or head_dim <= 0 or n_heads % n_kv:
        raise InputError(f"bad attention shape: n_heads={n_heads}, n_kv={n_kv}, head_dim={head_dim} (n_heads % n_kv must be 0)")
    return n_heads // n_kv


def expand_kv_heads(W_kv: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """Rows of a k/v projection (n_kv·hd x d) repeated HEAD-wise to n_heads·hd rows: block h is kv head h // group.

    ``W_qᵀ @ expand_kv_heads(W_k)`` and ``W_o @ expand_kv_heads(W_v)`` equal the head-wise sums
    (the seed repeated single rows instead, scrambling dimensions inside each head).
    """
    group = _check_heads(n_heads, n_kv, head_dim)
    d = W_kv.shape[1]
    return W_kv.reshape(n_kv, head_dim, d).repeat_interleave(group, dim=0).reshape(n_heads * head_dim, d)


def qk_circuit_matrix(
    q: Tensor, k: Tensor, n_heads: int, n_kv: int, head_dim: int,
    q_gain: Tensor | None = None, k_gain: Tensor | None = None,
) -> Tensor:
    """``Σ_h (D_q,h W_q,h)ᵀ (D_k,kv(h) W_k,kv(h))`` (d x d) = ``Σ_g (Σ_{h∈g} D_q,h W_q,h)ᵀ D_k,g W_k,g``:
    sum query blocks per group first. ``q_gain`` / ``k_gain`` are the q/k norms' gains per row of
    W_q / W_k (None: no such norm)."""
    group = _check_heads(n_heads, n_kv, head_dim)
    d = q.shape[1]
    q = residual_rows(q, q_gain)
    k = residual_rows(k, k_gain)
    q_grouped = q.reshape(n_kv, group, head_dim, d).sum(dim=1).reshape(n_kv * head_dim, d)
    return q_grouped.T @ k


def ov_circuit_matrix(o: Tensor, v: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """``Σ_h W_o,h W_v,kv(h)`` (d x d), W_o,h = W_o[:, h·hd:(h+1)·hd]; output blocks summed per group first."""
    group = _check_heads(n_heads, n_kv, head_dim)
    d = o.shape[0]
    o_grouped = o.reshape(d, n_kv, group, head_dim).sum(dim=2).reshape(d, n_kv * head_dim)
    return o_grouped @ v


def qk_circuit(lw: LayerWeights, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """The layer's QK circuit in residual coordinates (SPEC §4.1), d x d: ``Σ_h diag(γ_in)
    W_q,hᵀ diag(γ_q,h ⊙ γ_k,kv(h)) W_k,kv(h) diag(γ_in)``. Up to positive per-token scalars (the
    RMS of the residual and of q and k) and RoPE, which cancels at equal positions, head h's
    pre-softmax score of query residual x and key residual y is ``xᵀ M_h y``."""
    M = qk_circuit_matrix(lw.q, lw.k, n_heads, n_kv, head_dim, lw.q_gain, lw.k_gain)
    return residual_gram(M, lw.attn_gain)


def ov_circuit(lw: LayerWeights, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """The layer's OV circuit in residual coordinates, d x d: ``Σ_h diag(γ_post) W_o,h W_v,kv(h)
    diag(γ_in)`` (γ_post: a post-projection norm's gain, where there is one); up to the residual's
    RMS (and, after a post-projection norm, the RMS of the attention output), head h writes
    ``OV_h y`` for each attended residual y."""
    return residual_rows(residual_columns(ov_circuit_matrix(lw.o, lw.v, n_heads, n_kv, head_dim), lw.attn_gain),
                         lw.o_gain)


def attention_sink_vectors(o: Tensor, v: Tensor, sink: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """Rows h = ``W_o,h W_v,kv(h) s`` (n_heads x d, float64), kv(h) = h // group, for the sink
    token's normed residual s (what v_proj reads: the output of the attention norm)."""
    group = _check_heads(n_heads, n_kv, head_dim)
    d = o.shape[0]
    v_bos = (linalg.as64(v) @ linalg.as64(sink)).reshape(n_kv, head_dim)  # one value vector per kv head
    per_head = v_bos.repeat_interleave(group, dim=0)  # (n_heads, hd): head h gets kv head h // group
    return torch.einsum("dhk,hk->hd", linalg.as64(o).reshape(d, n_heads, head_dim), per_head)


# ---------------------------------------------------------------------------- basis helpers


def _top(G: Tensor, r: int, *, away_from: Tensor | None = None, single: bool = True) -> Tensor:
    """Top-r eigenvectors of a PSD Gram G, or of ``(I − P_F) G (I − P_F)`` with F = ``away_from``
    (the left singular vectors of ``(I − P_F)·M`` when G = M Mᵀ).

    After a projection, directions whose Rayleigh quotient is below ``RANK_TOL·tr G`` are
    dropped: when F spans everything G sees, what is left is round-off, and ``top_eigvecs``
    (whose tolerance is relative to the largest REMAINING eigenvalue) would return it.
    ``single``: solve in float32. The r-dimensional weight bases use it: their Grams are formed
    from float32 weight products, so a float64 solve adds digits the matrix does not have. The
    broad K-dimensional bases that other bases are projected away from (LMK, GRK, DSK(l)) and
    the activation kernels stay float64, so "orthogonal to X's broad basis" holds to 1e-6.
    """
    if away_from is None:
        return linalg.top_eigvecs(G, r, single=single)
    P = linalg.project_out_gram(away_from, G)
    B = linalg.top_eigvecs(P, r, single=single)
    if B.shape[1]:
        rayleigh = ((P @ B) * B).sum(0)
        B = B[:, rayleigh > linalg.RANK_TOL * _trace(G)]
    return B


def _job(G: Tensor, r: int, away_from: Tensor | None = None, *, single: bool = True) -> Callable[[], Tensor]:
    return functools.partial(_top, G, r, away_from=away_from, single=single)


def _top_of_packed(P: Tensor, d: int, r: int, away_from: Tensor) -> Tensor:
    return _top(linalg.unpack_symmetric(P, d), r, away_from=away_from)


def _trace(G: Tensor) -> float:
    return float(torch.trace(G))


def _uncentred_bases(D: Tensor, weights: Sequence[Tensor], r: int) -> list[Tensor]:
    """For each weight vector w: top-r right singular vectors of the rows ``D_i·√w_i`` (not centred).

    ``linalg.weighted_pca_rows(D·√w, r)``, with the n x n kernel D Dᵀ formed once and shared by
    every weighting (4 weightings of ~1000 token rows per layer). Rows whose weight is zero
    (padding) are dropped first.
    """
    D = linalg.as64(D)
    n, d = D.shape
    used = torch.zeros(n, dtype=torch.bool)
    for w in weights:
        used |= w > 0
    D = D[used]
    ws = [linalg.as64(w)[used] for w in weights]
    if D.shape[0] == 0:
        return [linalg.empty_basis(d) for _ in weights]
    K = None
    if D.shape[0] < d:
        with compute.gemm_threads():
            K = D @ D.T

    def basis(w: Tensor) -> Tensor:
        s = w.clamp_min(0.0).sqrt()
        kernel = s[:, None] * K * s[None, :] if K is not None else None
        return linalg.top_eigh_rows(s[:, None] * D, r, kernel=kernel)[1]

    done = compute.run_jobs({i: functools.partial(basis, w) for i, w in enumerate(ws)})
    return [done[i] for i in range(len(ws))]


def kmeans_centroids(X: Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[Tensor, Tensor]:
    """Deterministic Lloyd's k-means on the centred rows of X (float64).

    Init: the k largest-norm centred rows (stable order on ties); assignment to the nearest
    centroid (first on ties); an empty cluster keeps its centroid. Returns (centroids k x d,
    cluster sizes).
    """
    Xc = linalg.as64(X)
    Xc = Xc - Xc.mean(dim=0, keepdim=True)
    k = min(k, Xc.shape[0])
    order = torch.argsort(Xc.norm(dim=1), descending=True, stable=True)
    C = Xc[order[:k]].clone()
    assign = torch.zeros(Xc.shape[0], dtype=torch.long)
    for _ in range(iters):
        # Exact squared distances (no ‖x‖² − 2x·c + ‖c‖² cancellation): n x k x d is small.
        assign = ((Xc[:, None, :] - C[None, :, :]) ** 2).sum(dim=-1).argmin(dim=1)
        onehot = F.one_hot(assign, k).to(Xc.dtype)  # (n, k)
        counts = onehot.sum(dim=0)
        sums = onehot.T @ Xc
        filled = counts > 0  # an empty cluster keeps its centroid
        C[filled] = sums[filled] / counts[filled, None]
    sizes = torch.bincount(assign, minlength=k)
    return C, sizes


def _rotation_rank(n_neg: int, n_pos: int, d: int, max_rank: int = ROTATION_MAX_RANK) -> int:
    return max(0, min(max_rank, n_neg - 1, n_pos - 1, d))


def procrustes_rotation(X_neg: Tensor, X_pos: Tensor, max_rank: int = ROTATION_MAX_RANK) -> tuple[Tensor, Tensor]:
    """(joint, R): the joint centred PCA basis of persona- ∪ persona+ (d x m) and the orthogonal
    Procrustes R (m x m) taking the centred persona- projections to the persona+ ones."""
    X = linalg.as64(X_neg)
    Y = linalg.as64(X_pos)
    d = X.shape[1]
    # Each side's centred rows have rank ≤ n − 1. A joint PCA wider than that leaves Xrᵀ Yr
    # singular and R arbitrary (LAPACK's choice) on the rest: cap m so that R is determined.
    m = _rotation_rank(X.shape[0], Y.shape[0], d, max_rank)
    joint = linalg.pca(torch.cat([X, Y], dim=0), m)
    Xr = (X - X.mean(dim=0, keepdim=True)) @ joint
    Yr = (Y - Y.mean(dim=0, keepdim=True)) @ joint
    U, _, Vh = torch.linalg.svd(Xr.T @ Yr)
    return joint, U @ Vh  # R = argmin_R ‖Xr R − Yr‖_F over orthogonal R


def skew_rank_bound(R: Tensor) -> int:
    """Largest possible rank of R − Rᵀ for an orthogonal m x m R: its eigenvalues pair up
    (e^{±iθ}) except real ±1, so the rank is even, ≤ m − 1 for odd m and ≤ m − 2 for even m when
    det R = −1 (a reflection: eigenvalues +1 and −1 both present; for m = 2 the skew part is 0)."""
    m = int(R.shape[0])
    if m < 2:
        return 0
    reflection = m % 2 == 0 and float(torch.linalg.det(R)) < 0.0
    return 2 * (m // 2) - (2 if reflection else 0)


def rotation_contrast_basis(X_neg: Tensor, X_pos: Tensor, r: int, max_rank: int = ROTATION_MAX_RANK) -> Tensor:
    """Skew generator of the Procrustes rotation persona- -> persona+ in their joint PCA space."""
    joint, R = procrustes_rotation(X_neg, X_pos, max_rank)
    if joint.shape[1] < 2:
        return linalg.empty_basis(joint.shape[0])
    S = R - R.T
    top = linalg.top_eigvecs(S @ S.T, r)  # left singular vectors of the skew part
    # ‖S‖₂ ≤ 2: singular values at round-off level (e.g. all of them, when R is a symmetric
    # reflection) are absent directions, not a basis (a relative tolerance would keep them).
    top = top[:, ((S @ S.T @ top) * top).sum(0) > linalg.RANK_TOL]
    return linalg.fix_signs(linalg.orthonormalize(joint @ top))


# ---------------------------------------------------------------------------- input checks


def _check_rank_arg(name: str, value: int, d: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not 1 <= value <= d:
        raise InputError(f"{name} = {value} is outside [1, d = {d}] (d is the residual width)")
    return value


def _resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise InputError(f"layers {bad} outside the model's layers 0..{n_layers - 1}")
    if len(set(out)) != len(out):
        raise InputError(f"layers {out} contain duplicates")
    if not out:
        raise InputError("layers is empty: no layer to build bases for")
    return sorted(out)


def _check_weights(W: BaseWeights) -> tuple[int, int, int]:
    """(d, d_mlp, vocab) after checking every shape against the head layout."""
    if not isinstance(W, BaseWeights):
        raise InputError(f"A-side candidates are built from BaseWeights, got {type(W).__name__}")
    if W.n_layers == 0:
        raise InputError("BaseWeights has no layers")
    _check_heads(W.n_heads, W.n_kv_heads, W.head_dim)
    vocab, d = W.unembed.shape
    hq, hkv = W.n_heads * W.head_dim, W.n_kv_heads * W.head_dim
    d_mlp = int(W.layers[0].up.shape[0])
    want = {"q": (hq, d), "k": (hkv, d), "v": (hkv, d), "o": (d, hq), "gate": (d_mlp, d), "up": (d_mlp, d), "down": (d, d_mlp)}
    for i, lw in enumerate(W.layers):
        for name, shape in want.items():
            got = tuple(getattr(lw, name).shape)
            if got != shape:
                raise InputError(f"layer {i} {name}_proj has shape {got}, expected {shape} "
                                 f"(d={d}, n_heads={W.n_heads}, n_kv={W.n_kv_heads}, head_dim={W.head_dim}, d_mlp={d_mlp})")
    if tuple(W.final_gain.shape) != (d,):
        raise InputError(f"final_gain has shape {tuple(W.final_gain.shape)}, expected ({d},)")
    for i, lw in enumerate(W.layers):
        gains = {"attn_gain": (lw.attn_gain, d), "mlp_gain": (lw.mlp_gain, d), "q_gain": (lw.q_gain, hq),
                 "k_gain": (lw.k_gain, hkv), "o_gain": (lw.o_gain, d), "down_gain": (lw.down_gain, d)}
        for name, (gain, width) in gains.items():
            if gain is not None and tuple(gain.shape) != (width,):
                raise InputError(f"layer {i} {name} has shape {tuple(gain.shape)}, expected ({width},)")
    return d, d_mlp, int(vocab)


def _check_acts(A: ActivationCaptures, n_layers: int, d: int) -> int:
    """n_fit after checking every capture's shape."""
    if not isinstance(A, ActivationCaptures):
        raise InputError(
            f"A-side candidates are built from ActivationCaptures, got {type(A).__name__} "
            "(steered labels are B-side and never reach an A-side builder)"
        )
    L, n, dd = A.clean.shape
    if L != n_layers or dd != d:
        raise InputError(f"captures have {L} layers of width {dd}; the weights have {n_layers} layers of width {d}")
    if n < 2:
        raise InputError(f"need at least 2 FIT prompts for a PCA, got {n}")
    T = int(A.tokens_pos.shape[2]) if A.tokens_pos.ndim == 4 else -1
    Lt = L if A.token_layers is None else len(A.token_layers)
    if A.token_layers is not None and sorted(set(A.token_layers)) != list(A.token_layers):
        raise InputError(f"captures.token_layers {list(A.token_layers)} must be distinct layers in order")
    shapes = {
        "persona_pos": (L, n, d), "persona_neg": (L, n, d), "up_in_clean": (L, n, d), "up_in_pos": (L, n, d),
        "up_in_neg": (L, n, d), "up_written_pos": (L, n, d), "up_written_neg": (L, n, d),
        "tokens_pos": (Lt, n, T, d), "tokens_neg": (Lt, n, T, d), "attn_pos": (Lt, n, T), "attn_neg": (Lt, n, T),
        "sink": (L, d),
    }
    for name, shape in shapes.items():
        got = tuple(getattr(A, name).shape)
        if got != shape:
            raise InputError(f"captures.{name} has shape {got}, expected {shape}")
    for name in ("clean", *shapes):
        if not torch.isfinite(getattr(A, name)).all():
            raise InputError(f"captures.{name} has NaN/Inf entries")
    return n


# ---------------------------------------------------------------------------- declared ranks


Declared = tuple[int, str, dict[int, int]]  # (rank at most layers, why it is below r, per-layer exceptions)


def _attention_supports(acts: ActivationCaptures, layer: int) -> tuple[int, int]:
    """(rows with both a⁺ > 0 and a⁻ > 0, rows with either > 0) at a layer: the token rows the
    min-type and max-type attention weightings can use (padding has zero attention)."""
    i = acts.token_index(layer)
    a_pos, a_neg = acts.attn_pos[i] > 0, acts.attn_neg[i] > 0
    return int((a_pos & a_neg).sum()), int((a_pos | a_neg).sum())


def _declared_ranks(
    W: BaseWeights, acts: ActivationCaptures, d_mlp: int, vocab: int, n: int, r: int, K: int, layers: Sequence[int]
) -> dict[str, Declared]:
    """name -> declared rank, from shapes and the capture layout, never from the computed bases."""
    d, L = W.d_model, W.n_layers
    hq, hkv = W.n_heads * W.head_dim, W.n_kv_heads * W.head_dim

    def cap(*bounds: int) -> int:
        return max(0, min(r, d, *bounds))

    def entry(bound: int, why: str) -> Declared:
        rank = cap(bound)
        return rank, (why if rank < r else ""), {}

    not_read = entry(d - K, f"projected away from a K = {K} dimensional read basis: rank ≤ d − K = {d - K}")
    pca_n = entry(n - 1, f"centred PCA of n = {n} FIT rows: rank ≤ n − 1 = {n - 1}")
    full = (cap(), "", {})
    out: dict[str, Declared] = {
        "lm_head_read": entry(vocab, f"lm has {vocab} rows"),
        "logits_null": full,
        "global_read": full,
        "global_write": entry(L * (hq + d_mlp), "few writer columns"),
        "global_write_not_global_read": not_read,
        "write": entry(hq + d_mlp, "few writer columns"),
        "attn_write": entry(hq, f"W_o has {hq} columns"),
        "mlp_write": entry(d_mlp, f"W_down has {d_mlp} columns"),
        "write_not_lm_head_read": not_read,
        "write_not_global_read": not_read,
        "write_not_downstream_read": not_read,
        "mlp_up_read": entry(d_mlp, f"W_up has {d_mlp} rows"),
        "mlp_gate_read": entry(d_mlp, f"W_gate has {d_mlp} rows"),
        "attn_qkv_read": entry(hq + 2 * hkv, "few q/k/v rows"),
        "attn_ov_write": entry(hkv, f"the head-wise OV sum factors through the n_kv·head_dim = {hkv} value dimensions"),
        "mlp_roundtrip_write": entry(d_mlp, f"factors through d_mlp = {d_mlp}"),
        "qk_circuit": entry(hkv, f"the head-wise QK sum factors through the n_kv·head_dim = {hkv} key dimensions"),
        "input_super": full,
        "kv_super": entry(2 * hkv, "few k/v rows"),
        "gate_kernel": entry(d_mlp, f"factors through d_mlp = {d_mlp}"),
        "attention_sink": _sink_declared(acts, layers, cap(W.n_heads - 1), r, W.n_heads),
        "input_super_not_lm_read": not_read,
        "suppressed": pca_n,
        "amplified": pca_n,
        "added_features": pca_n,
        "global_clean_resid_pca": entry(L * n - 1, "few pooled rows"),
        "global_persona_resid_pca": entry(2 * L * n - 1, "few pooled rows"),
        "layer_clean_resid_pca": pca_n,
        "TaskDiff_contrast": pca_n,
        "up_proj_input_contrast": pca_n,
        "up_proj_output_written_contrast": pca_n,
        "gate_active_written": pca_n,
        "randn_orthogonal": full,
    }
    # Attention-selected: an uncentred PCA of the token rows with nonzero weight.
    supports = {layer: _attention_supports(acts, layer) for layer in layers}
    for name, which in (("attn_min_taskdiff", 0), ("attn_max_taskdiff", 1), ("attn_diff_taskdiff", 1),
                        ("attn_min_x_diffnorm_taskdiff", 0)):
        per = {layer: cap(s[which]) for layer, s in supports.items()}
        top = max(per.values(), default=cap())
        rows = "both" if which == 0 else "either"
        note = f"uncentred PCA of the token rows where {rows} persona attention is nonzero" if top < r else ""
        out[name] = (top, note, {layer: k for layer, k in per.items() if k != top})
    r_is, r_kv = out["input_super"][0], out["kv_super"][0]
    f_dim = min(d, K + r_is + r_kv)
    out["causally_isolated"] = entry(d - f_dim, f"F = union(input_super, kv_super, LMK) has dimension {f_dim}: rank ≤ d − {f_dim}")
    k_clusters = min(r + 1, 3 * n)
    out["chars_clusters"] = entry(k_clusters - 1, f"k = {k_clusters} centroids: rank ≤ k − 1")
    m = _rotation_rank(n, n, d)
    skew = {layer: cap(skew_rank_bound(procrustes_rotation(acts.persona_neg[layer], acts.persona_pos[layer])[1]))
            for layer in layers}
    top_skew = max(skew.values(), default=cap(2 * (m // 2)))
    out["rotation_contrast"] = (
        top_skew,
        f"R − Rᵀ is skew-symmetric on the rank-{m} joint PCA: even rank ≤ {2 * (m // 2)} "
        "(2 less where R is a reflection and m is even)" if top_skew < r else "",
        {layer: k for layer, k in skew.items() if k != top_skew},
    )
    qk, ch = out["qk_circuit"][0], out["chars_clusters"][0]
    out["qk_x_chars_clusters"] = (min(qk, ch), "" if min(qk, ch) == r else "bounded by qk_circuit and chars_clusters", {})
    wndr, td = out["write_not_downstream_read"][0], out["TaskDiff_contrast"][0]
    out["WNR_union_TaskDiff"] = (min(d, wndr + td), "union of two bases: rank ≤ 2r (lower if they share directions)", {})
    churn_rank, churn_note, _ = pca_n
    last = L - 1
    out["churn"] = (churn_rank, (churn_note + "; " if churn_note else "") + "empty at the last layer (no h_{l+1})",
                    {last: 0} if last in layers else {})
    return out


def _sink_declared(acts: ActivationCaptures, layers: Sequence[int], rank: int, r: int, n_heads: int) -> Declared:
    """attention_sink: rank ≤ n_heads − 1, and 0 where the sink's normed residual is zero (e.g. a
    bos token that is also the pad token of an nn.Embedding with padding_idx, at layer 0)."""
    zero = {layer: 0 for layer in layers if not bool(acts.sink[layer].any())}
    note = [f"centred PCA over n_heads = {n_heads} sink vectors: rank ≤ n_heads − 1"] if rank < r else []
    if zero:
        note.append("empty where the sink token's normed residual is the zero vector")
    if len(zero) == len(layers):
        return 0, "; ".join(note), {}
    return rank, "; ".join(note), zero


# ---------------------------------------------------------------------------- weight bases


@dataclass(frozen=True)
class _LayerGrams:
    """Component Grams of one layer in float64 (GEMMs in float32, the weights' precision), in
    residual coordinates: each reader's Gram ``diag(γ) WᵀW diag(γ)`` with the gain of its norm.
    The q, k and v Grams are kept only as the two sums the bases read (3 d x d fewer per layer)."""

    qkv: Tensor  # G_q + G_k + G_v
    kv: Tensor  # G_k + G_v
    up: Tensor
    gate: Tensor
    o: Tensor
    down: Tensor

    @classmethod
    def of(cls, lw: LayerWeights) -> _LayerGrams:
        def write(W: Tensor, gain: Tensor | None) -> Tensor:
            G = linalg.row_gram(W)
            return G if gain is None else residual_gram(G, gain)

        def read(name: str, gain: Tensor) -> Tensor:
            return residual_gram(linalg.col_gram(getattr(lw, name)), gain)

        with compute.gemm_threads():
            q, k, v = (read(n, lw.attn_gain) for n in ("q", "k", "v"))
            qkv, kv = q + k + v, k + v
            del q, k, v
            mlp = {n: read(n, lw.mlp_gain) for n in ("up", "gate")}
            return cls(qkv=qkv, kv=kv, **mlp, o=write(lw.o, lw.o_gain), down=write(lw.down, lw.down_gain))

    @functools.cached_property
    def read(self) -> Tensor:
        """read_gram(l) = Σ_{X∈q,k,v,up,gate} W_XᵀW_X (summed in that order)."""
        return self.qkv + self.up + self.gate

    @functools.cached_property
    def write(self) -> Tensor:
        """Gram of [W_o‖W_down]: W_oW_oᵀ + W_downW_downᵀ."""
        return self.o + self.down

    def release_components(self) -> None:
        """Drop the component Grams once their bases are solved, keeping the two sums the rest of
        the pass reads (``read``, ``write``): six d x d float64 fewer while the circuits' Grams are
        formed (issue 26: 0.3 GB at Qwen3-4B shapes)."""
        _ = self.read, self.write
        for name in ("qkv", "kv", "up", "gate", "o", "down"):
            object.__setattr__(self, name, None)  # (frozen: nothing else may change them)


Bases = dict[str, dict[int, Tensor]]


def _layer_weight_bases(
    lw: LayerWeights, g: _LayerGrams, W: BaseWeights, up_in: Tensor, sink: Tensor, *, r: int, K: int,
    rank: Mapping[str, int], LM: Tensor, downstream_gram: Tensor,
) -> dict[str, Tensor]:
    """Every per-layer weight basis except write_not_global_read (which needs the global read Gram).

    ``rank[name]`` is the declared rank: at most that many eigenvectors are requested, so a Gram
    whose structural rank is below r (e.g. the QK sum, rank ≤ n_kv·hd) cannot return float32
    round-off directions as basis vectors. ``downstream_gram`` is DS(l).
    """
    h, kv, hd = W.n_heads, W.n_kv_heads, W.head_dim
    Gw = g.write
    # The MLP on the n clean FIT inputs of up_proj: products in the weights' float32 (converting
    # three d_mlp x d matrices to float64 per layer would cost more than these n-row GEMMs),
    # the nonlinearity and everything after it in float64. The captured inputs are already
    # normed (the MLP norm's output), so the module's own weights apply to them.
    x = up_in.to(lw.gate.dtype)
    gate_act = mlp_activation(W.mlp_act)(linalg.as64(x @ lw.gate.T))  # (n, d_mlp)
    hidden = gate_act * linalg.as64(x @ lw.up.T)
    mean_gate = gate_act.mean(dim=0).to(lw.down.dtype)

    # Wave 1: independent eigenproblems (run in parallel when a pool exists), first those of the
    # component Grams, which are then dropped (all but their sums ``read`` and ``write``) before
    # the circuits' Grams are formed: one layer's Grams never all coexist.
    grams = {
        "write": Gw, "attn_write": g.o, "mlp_write": g.down, "mlp_up_read": g.up, "mlp_gate_read": g.gate,
        "attn_qkv_read": g.qkv, "input_super": g.read, "kv_super": g.kv,
    }
    jobs = {"_DS": _job(downstream_gram, K, single=False)}  # DSK(l): the biggest problem first
    jobs.update({name: _job(G, rank[name]) for name, G in grams.items()})
    jobs["write_not_lm_head_read"] = _job(Gw, rank["write_not_lm_head_read"], LM)
    out = compute.run_jobs(jobs)
    DS = out.pop("_DS")
    del grams, jobs
    g.release_components()
    # The d x d products whose left singular vectors are wanted, and their row Grams (big GEMMs),
    # each read side in residual coordinates (the gain of the norm it reads through).
    with compute.gemm_threads():
        circuits = {"attn_ov_write": linalg.row_gram(ov_circuit(lw, h, kv, hd)),
                    "qk_circuit": linalg.row_gram(qk_circuit(lw, h, kv, hd))}
        down = residual_rows(lw.down, lw.down_gain)
        circuits["mlp_roundtrip_write"] = linalg.row_gram(residual_columns(down @ lw.up, lw.mlp_gain))
        circuits["gate_kernel"] = linalg.row_gram(residual_columns((down * mean_gate[None, :]) @ lw.up,
                                                                   lw.mlp_gain))
    out.update(compute.run_jobs({name: _job(G, rank[name]) for name, G in circuits.items()}))
    del circuits
    # Wave 2: the projections that need wave-1 bases.
    forbidden = linalg.union(out["input_super"], out["kv_super"], LM)
    out.update(compute.run_jobs({
        "write_not_downstream_read": _job(Gw, rank["write_not_downstream_read"], DS),
        "causally_isolated": _job(Gw, rank["causally_isolated"], forbidden),
    }))
    out["input_super_not_lm_read"] = linalg.project_away(out["input_super"], LM)[:, : rank["input_super_not_lm_read"]]
    out["attention_sink"] = linalg.pca(attention_sink_vectors(residual_rows(lw.o, lw.o_gain), lw.v, sink, h, kv, hd), r)
    # The MLP's outputs on the clean FIT inputs of up_proj (through a post-projection norm's gain).
    out["gate_active_written"] = linalg.pca(linalg.as64(hidden.to(down.dtype) @ down.T), r)
    return out


def _weight_bases(
    W: BaseWeights, acts: ActivationCaptures, *, r: int, K: int, layers: Sequence[int], rank: Mapping[str, int]
) -> Bases:
    L = W.n_layers
    selected = set(layers)
    out: Bases = {}

    def put_global(name: str, B: Tensor) -> None:
        out[name] = {layer: B for layer in layers}  # one tensor object at every layer

    # Unembedding through its d x d Gram (never an SVD of vocab x d), read through the final
    # norm's gain. The top-r bases are the first columns of the top-max(r, K) ones, so
    # lm_head_read ⊂ LMK exactly.
    with compute.gemm_threads():
        lm_gram = residual_gram(linalg.col_gram(W.unembed), W.final_gain)
    lm = compute.run_jobs({
        "top": _job(lm_gram, max(rank["lm_head_read"], K), single=False),
        "bottom": functools.partial(linalg.top_eigvecs, lm_gram, r, largest=False),
    })
    LM = lm["top"][:, :K]
    put_global("lm_head_read", lm["top"][:, : rank["lm_head_read"]])
    put_global("logits_null", lm["bottom"])

    # One pass from the last layer to the first: `running` is DS(l) = lmᵀlm + Σ_{j>l} read_gram(j)
    # when layer l is reached, and the global read Gram after layer 0. Per-layer bases are built
    # on the way so that only each selected layer's write Gram is kept (its upper triangle: the
    # global read Gram that write_not_global_read projects it away from is known only at the end).
    running = lm_gram  # summed into in place: the unembedding's own Gram is not needed again
    del lm_gram
    write_total = torch.zeros_like(running)
    write_grams: dict[int, Tensor] = {}
    per_layer: dict[int, dict[str, Tensor]] = {}
    for layer in reversed(range(L)):
        lw = W.layers[layer].at_least_float32()  # one layer at a time (the model may be bfloat16)
        g = _LayerGrams.of(lw)
        if layer in selected:
            per_layer[layer] = _layer_weight_bases(
                lw, g, W, acts.up_in_clean[layer], acts.sink[layer], r=r, K=K, rank=rank, LM=LM,
                downstream_gram=running,
            )
            write_grams[layer] = linalg.pack_symmetric(g.write)
        running += g.read  # only after layer's jobs have finished with DS(l)
        write_total += g.write
        del g
    global_read_gram = running

    jobs = {
        "_GR": _job(global_read_gram, max(r, K), single=False),
        "global_write": _job(write_total, rank["global_write"]),
    }
    glob_ = compute.run_jobs(jobs)
    GR = glob_["_GR"][:, :K]
    put_global("global_read", glob_["_GR"][:, :r])
    put_global("global_write", glob_["global_write"])
    jobs = {"global_write_not_global_read": _job(write_total, rank["global_write_not_global_read"], GR)}
    done = compute.run_jobs(jobs)
    # one write Gram unpacked at a time (a job each: in order, so at most the pool's width at once)
    done.update(compute.run_jobs({str(layer): functools.partial(_top_of_packed, write_grams.pop(layer), W.d_model,
                                                                rank["write_not_global_read"], GR)
                                  for layer in layers}))
    put_global("global_write_not_global_read", done["global_write_not_global_read"])
    for layer in layers:
        per_layer[layer]["write_not_global_read"] = done[str(layer)]
    for name in per_layer[layers[0]]:
        out[name] = {layer: per_layer[layer][name] for layer in layers}
    return out


# ---------------------------------------------------------------------------- activation bases


def _magnitude_features(clean: Tensor) -> dict[str, Tensor]:
    """Per-prompt feature rows (n x d) from the clean magnitudes |h| over all layers (L, n, d)."""
    mag = clean.abs()
    step = mag[1:] - mag[:-1]  # (L-1, n, d): Δ_l|h| = |h_{l+1}| − |h_l|
    up = torch.relu(step).sum(dim=0)
    down = torch.relu(-step).sum(dim=0)
    return {
        "suppressed": torch.minimum(up, down),  # rose and fell again: turnover
        "amplified": torch.relu(mag[-1] - mag[0]),
        "added_features": up,
    }


def mlp_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The MLP gate's activation by its transformers name (``silu``, ``gelu_pytorch_tanh``, ...)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise InputError(f"unknown MLP activation {name!r}")
    return ACT2FN[name]


def _residual_direction(normed: Tensor, gain: Tensor) -> Tensor:
    """Rows ``γ ⊙ x/rms(x)`` (a norm's outputs) -> ``x/rms(x)``: the residual direction the norm
    read, in residual coordinates. A zero-gain channel is invisible to the reader: it stays 0."""
    g = linalg.as64(gain)
    inv = torch.where(g != 0, 1.0 / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(g))
    return linalg.as64(normed) * inv


def _activation_bases(
    acts: ActivationCaptures, mlp_gains: Mapping[int, Tensor], *, r: int, layers: Sequence[int]
) -> tuple[Bases, dict[str, dict[int, dict[str, float]]]]:
    L = acts.n_layers
    d = acts.clean.shape[-1]
    clean = linalg.as64(acts.clean)
    pos = linalg.as64(acts.persona_pos)
    neg = linalg.as64(acts.persona_neg)
    out: Bases = {}
    diags: dict[str, dict[int, dict[str, float]]] = {"chars_clusters": {}}

    def put_global(name: str, B: Tensor) -> None:
        out[name] = {layer: B for layer in layers}

    for name, rows in _magnitude_features(clean).items():
        put_global(name, linalg.pca(rows, r))
    put_global("global_clean_resid_pca", linalg.pca(clean.reshape(-1, d), r))
    put_global("global_persona_resid_pca", linalg.pca(torch.cat([pos.reshape(-1, d), neg.reshape(-1, d)]), r))

    attn_names = ("attn_min_taskdiff", "attn_max_taskdiff", "attn_diff_taskdiff", "attn_min_x_diffnorm_taskdiff")
    per: dict[str, dict[int, Tensor]] = {}

    def put(name: str, layer: int, B: Tensor) -> None:
        per.setdefault(name, {})[layer] = B

    for layer in layers:
        put("layer_clean_resid_pca", layer, linalg.pca(clean[layer], r))
        put("TaskDiff_contrast", layer, linalg.pca(pos[layer] - neg[layer], r))
        g = mlp_gains[layer]
        put("up_proj_input_contrast", layer,
            linalg.pca(_residual_direction(acts.up_in_pos[layer], g) - _residual_direction(acts.up_in_neg[layer], g), r))
        put("up_proj_output_written_contrast", layer,
            linalg.pca(linalg.as64(acts.up_written_pos[layer]) - linalg.as64(acts.up_written_neg[layer]), r))

        t = acts.token_index(layer)
        diff = (linalg.as64(acts.tokens_pos[t]) - linalg.as64(acts.tokens_neg[t])).reshape(-1, d)
        a_pos = linalg.as64(acts.attn_pos[t]).reshape(-1)
        a_neg = linalg.as64(acts.attn_neg[t]).reshape(-1)
        diff_norm = diff.norm(dim=1)
        nonzero = diff_norm > 0
        norm_scale = float(diff_norm[nonzero].mean()) if bool(nonzero.any()) else 1.0
        a_min = torch.minimum(a_pos, a_neg)
        weights = [a_min, torch.maximum(a_pos, a_neg), (a_pos - a_neg).abs(), a_min * diff_norm / norm_scale]
        for name, B in zip(attn_names, _uncentred_bases(diff, weights, r)):
            put(name, layer, B)

        k = r + 1  # k − 1 = r centroid differences: rank r (the seed's k = r reached only r − 1)
        centroids, sizes = kmeans_centroids(torch.cat([clean[layer], pos[layer], neg[layer]]), k)
        put("chars_clusters", layer, linalg.pca(centroids, r))
        diags["chars_clusters"][layer] = {
            "k": float(centroids.shape[0]),
            "empty_clusters": float((sizes == 0).sum()),
            "min_cluster_size": float(sizes.min()),
        }
        if layer + 1 < L:
            put("churn", layer, linalg.pca(clean[layer + 1] - clean[layer], r))
        else:  # no h_{l+1}: declared empty, not an arbitrary basis of a zero matrix
            put("churn", layer, linalg.empty_basis(d))
        put("rotation_contrast", layer, rotation_contrast_basis(neg[layer], pos[layer], r))
    out.update(per)
    return out, diags


# ---------------------------------------------------------------------------- builders


def build_a_side(
    weights: BaseWeights,
    acts: ActivationCaptures,
    *,
    r: int = 8,
    k_broad: int = 64,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    release_tokens: bool = False,
) -> list[Candidate]:
    """The 42 SPEC §4 candidates and ``randn_orthogonal``, in SPEC table order.

    Built from the base weights and the A-side captures only. ``layers`` selects the layers
    that get bases (default: all); global Grams (global read, downstream read, global write)
    and global activation bases always use every layer. A global basis is the same tensor
    object at each selected layer. The activation bases are built first; ``release_tokens``
    then frees the captures' token-level tensors (``ActivationCaptures.release_tokens``) before the
    weight Grams, whose per-layer working set is the build's peak (issue 26).
    """
    d, d_mlp, vocab = _check_weights(weights)
    n = _check_acts(acts, weights.n_layers, d)
    r = _check_rank_arg("r", r, d)
    K = _check_rank_arg("k_broad", k_broad, d)
    sel = _resolve_layers(layers, weights.n_layers)
    for layer in sel:
        acts.token_index(layer)  # the attention-selected bases read every selected layer's tokens

    declared = _declared_ranks(weights, acts, d_mlp, vocab, n, r, K, sel)
    with compute.policy():
        act_bases, diagnostics = _activation_bases(
            acts, {layer: weights.layers[layer].mlp_gain for layer in sel}, r=r, layers=sel)
        if release_tokens:
            acts.release_tokens()
        bases = _weight_bases(weights, acts, r=r, K=K, layers=sel, rank={k: v[0] for k, v in declared.items()})
        bases.update(act_bases)

        qk_chars: dict[int, Tensor] = {}
        diagnostics["qk_x_chars_clusters"] = {}
        for layer in sel:
            B, cos = linalg.bisector(bases["qk_circuit"][layer], bases["chars_clusters"][layer], r)
            qk_chars[layer] = B
            diagnostics["qk_x_chars_clusters"][layer] = {
                "cos_mean": float(cos.mean()) if cos.numel() else math.nan,
                "cos_min": float(cos.min()) if cos.numel() else math.nan,
            }
        bases["qk_x_chars_clusters"] = qk_chars
        bases["WNR_union_TaskDiff"] = {
            layer: linalg.union(bases["write_not_downstream_read"][layer], bases["TaskDiff_contrast"][layer])
            for layer in sel
        }
        bases["randn_orthogonal"] = {
            layer: linalg.random_orthonormal(
                d, r, torch.Generator().manual_seed(stable_seed("randn_orthogonal", seed, layer))
            )
            for layer in sel
        }

    out = []
    for spec in DEFINITIONS:
        if spec.side != "A":
            continue
        rank, note, exceptions = declared[spec.name]
        out.append(
            Candidate(
                name=spec.name, family=spec.family, definition=spec.definition, side="A",
                bases=bases[spec.name], expected_rank=rank, rank_note=note,
                diagnostics=diagnostics.get(spec.name, {}), rank_exceptions=exceptions,
            )
        )
    return out


def build_b_side(
    labels: SteeredLabels, targets: Mapping[int, Mapping[str, Target]], *, r: int = 8
) -> list[Candidate]:
    """B-side references for the layers in ``targets``: ``TaskDiff_lora_fit`` and one oracle per target kind.

    ``targets[layer]`` maps target kinds ("act", "o_proj", "down_proj", "combined") to Targets; a
    missing kind means the target is absent at that layer, and its oracle's basis there is empty
    (declared). Oracle ranks are declared from the targets' spectra (a rank-2 delta gives a rank-2
    oracle).
    """
    if not isinstance(labels, SteeredLabels):
        raise InputError(f"build_b_side needs SteeredLabels, got {type(labels).__name__}")
    L, n_fit, d = labels.fit.shape
    r = _check_rank_arg("r", r, d)
    layers = sorted(int(x) for x in targets)
    bad = [x for x in layers if not 0 <= x < L]
    if bad:
        raise InputError(f"target layers {bad} outside the labels' layers 0..{L - 1}")
    for layer in layers:
        unknown = sorted(set(targets[layer]) - set(ORACLE_NAMES))
        if unknown:
            raise InputError(f"layer {layer}: unknown target kinds {unknown}; expected among {sorted(ORACLE_NAMES)}")
        for kind, t in targets[layer].items():
            if t.d != d:
                raise InputError(f"layer {layer} target {kind!r} has d = {t.d}, the labels have d = {d}")

    out = []
    with compute.policy():
        fit_rank = max(0, min(r, n_fit - 1))
        spec = _SPECS["TaskDiff_lora_fit"]
        out.append(Candidate(
            name=spec.name, family=spec.family, definition=spec.definition, side="B",
            bases={layer: linalg.pca(labels.fit[layer], r) for layer in layers},
            expected_rank=fit_rank,
            rank_note="" if fit_rank == r else f"centred PCA of n = {n_fit} FIT label rows: rank ≤ n − 1",
        ))
        for kind, name in ORACLE_NAMES.items():
            spec = _SPECS[name]
            bases: dict[int, Tensor] = {}
            declared: dict[int, int] = {}
            for layer in layers:
                t = targets[layer].get(kind)
                if t is None:
                    bases[layer], declared[layer] = linalg.empty_basis(d), 0
                else:
                    bases[layer] = t.oracle_basis(r)
                    # Declared from the spectrum (same tolerance as oracle_basis): the target's rank.
                    declared[layer] = t.rank(r)
            expected = max(declared.values(), default=0)
            out.append(Candidate(
                name=name, family=spec.family, definition=spec.definition, side="B",
                bases=bases, expected_rank=expected,
                rank_note="the target's rank where it is below r; empty where the target is absent at the layer",
                rank_exceptions={layer: k for layer, k in declared.items() if k != expected},
            ))
    return out


def merge_layers(parts: Sequence[Sequence[Candidate]]) -> list[Candidate]:
    """The candidates of several builds over disjoint layers (the same names in the same order),
    as one build over all of them: bases and diagnostics joined, the declared rank the largest
    of the parts' with the others as exceptions (what ``build_b_side`` declares over all layers).
    The sweep builds its B-side one layer at a time (one layer's d x d targets in memory)."""
    if not parts:
        return []
    out = []
    for same in zip(*parts, strict=True):
        first = same[0]
        if any(c.name != first.name for c in same):
            raise ValueError(f"merge_layers: parts disagree on the candidates: {[c.name for c in same]}")
        if len({layer for c in same for layer in c.bases}) != sum(len(c.bases) for c in same):
            raise ValueError(f"merge_layers: {first.name!r}: the parts' layers overlap")
        declared = {layer: c.declared_rank(layer) for c in same for layer in c.bases}
        expected = max(declared.values(), default=first.expected_rank)
        out.append(replace(
            first, bases={layer: B for c in same for layer, B in c.bases.items()}, expected_rank=expected,
            diagnostics={layer: v for c in same for layer, v in c.diagnostics.items()},
            rank_exceptions={layer: k for layer, k in declared.items() if k != expected},
        ))
    return out


def definitions_table() -> list[dict[str, str]]:
    """Rows (name, family, axis_kind, sees, side, definition) of every candidate, in order: the seed's
    table, then the gradient bases."""
    return [
        {"name": s.name, "family": s.family, "axis_kind": s.axis_kind, "sees": s.sees, "side": s.side,
         "definition": s.definition}
        for s in (*DEFINITIONS, *GRAD_DEFINITIONS)
    ]


__all__ = [
    "A_SIDE_NAMES", "AXIS_KINDS", "BEHAVIOUR_DATA", "B_SIDE_NAMES", "CANDIDATE_NAMES", "DEFINITIONS", "FAMILY_AXIS",
    "FAMILY_SEES", "GRAD_DEFINITIONS", "GRAD_NAMES", "ORACLE_NAMES", "SEES", "sees_of",
    "PANEL_AXES", "Candidate", "CandidateSpec", "attention_sink_vectors", "build_a_side", "build_b_side",
    "definitions_table", "expand_kv_heads", "get_spec", "kmeans_centroids", "ov_circuit", "ov_circuit_matrix", "qk_circuit",
    "qk_circuit_matrix",
    "procrustes_rotation", "ranking_pool", "rotation_contrast_basis", "skew_rank_bound",
]
