"""Base-model weights as the A-side sees them: CPU tensors in HF Linear layout (out x in), in the
model's dtype, with the gains of the norms in front of them (SPEC §4.1).

``extract_base_weights`` returns views of a CPU model's parameters (no copy of a 0.6B model), so
builders never modify them in place and compute in float32 or float64
(``LayerWeights.at_least_float32``, one layer at a time).

**Residual coordinates.** A block does not read the residual x but ``n(x) = γ ⊙ x / rms(x)``.
The per-token ``1/rms(x)`` drops out of every subspace; the gain γ does not: what a projection W
reads, in residual coordinates, is ``W·diag(γ)``. The matrices here are the modules' own weights;
the gains travel beside them (``attn_gain``: the norm before attention, so q, k and v;
``mlp_gain``: the norm before the MLP, so gate and up (ones where a block reads the raw residual,
OLMo2); ``BaseWeights.final_gain``: the final norm, so the unembedding; ``q_gain``/``k_gain``: the
q/k norms' gains per projection row, which enter only the QK circuit; ``o_gain``/``down_gain``: a
post-projection norm's gain, which a writer's output passes through before the residual add
(Gemma2/3, OLMo2): its write space is ``diag(γ)·col(W)``). ``residual_gram`` folds a gain into a
d x d Gram: ``diag(γ) G diag(γ)``, which is how every read-side Gram and circuit is put in
residual coordinates without copying a d_mlp x d matrix; ``residual_columns`` /
``residual_rows`` fold one into one side of a map.

This is everything a candidate builder may read about the model. The LoRA delta is never
part of it (SPEC §1: A-side bases are built from base weights and base activations only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerWeights:
    q: Tensor  # (n_heads*head_dim, d)
    k: Tensor  # (n_kv*head_dim, d)
    v: Tensor  # (n_kv*head_dim, d)
    o: Tensor  # (d, n_heads*head_dim)
    gate: Tensor  # (d_mlp, d)
    up: Tensor  # (d_mlp, d)
    down: Tensor  # (d, d_mlp)
    attn_gain: Tensor  # (d,) float32: what the norm before attention multiplies x/rms(x) by (ones: no norm)
    mlp_gain: Tensor  # (d,) float32: the same for the norm before the MLP
    q_gain: Tensor | None = None  # (n_heads·head_dim,) float32: the q norm's gain per row of W_q, if any
    k_gain: Tensor | None = None  # (n_kv·head_dim,) float32: the k norm's gain per row of W_k, if any
    o_gain: Tensor | None = None  # (d,) float32: a norm between o_proj and the residual add, if any
    down_gain: Tensor | None = None  # (d,) float32: a norm between down_proj and the residual add, if any

    _MATRICES = ("q", "k", "v", "o", "gate", "up", "down")

    def at_least_float32(self) -> LayerWeights:
        """This layer with half-precision matrices converted to float32 (float32/64 kept as they are)."""
        def conv(t: Tensor) -> Tensor:
            return t if t.dtype in (torch.float32, torch.float64) else t.float()

        return replace(self, **{name: conv(getattr(self, name)) for name in self._MATRICES})


@dataclass(frozen=True)
class BaseWeights:
    layers: tuple[LayerWeights, ...]
    unembed: Tensor  # (vocab, d): lm_head, or the tied embedding when there is no lm_head
    final_gain: Tensor  # (d,) float32: the final norm's gain, through which the unembedding reads
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_act: str = "silu"  # the MLP gate's activation (transformers' ACT2FN name)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.unembed.shape[1])

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA): query head h reads kv head h // group."""
        return self.n_heads // self.n_kv_heads


def residual_gram(G: Tensor, gain: Tensor) -> Tensor:
    """``diag(γ) G diag(γ)``: the Gram ``WᵀW`` of a reader W in residual coordinates (``W·diag(γ)``)."""
    g = gain.to(G.dtype)
    return g[:, None] * G * g[None, :]


def residual_columns(M: Tensor, gain: Tensor) -> Tensor:
    """``M·diag(γ)``: a map that reads the normed residual, in residual coordinates."""
    return M * gain.to(M.dtype)[None, :]


def residual_rows(M: Tensor, gain: Tensor | None) -> Tensor:
    """``diag(γ)·M``: a map whose output passes a post-projection norm before the residual add
    (to first order), in residual coordinates; ``M`` itself where there is no such norm."""
    return M if gain is None else M * gain.to(M.dtype)[:, None]


__all__ = ["BaseWeights", "LayerWeights", "residual_columns", "residual_gram", "residual_rows"]
