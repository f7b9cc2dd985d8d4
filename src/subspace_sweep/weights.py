"""Base-model weights as the A-side sees them: float32 CPU tensors in HF Linear layout (out x in)
(the unembedding alone keeps the model's dtype; it is only ever reduced to its d x d Gram).

This is everything a candidate builder may read about the model. The LoRA delta is never
part of it (SPEC §1: A-side bases are built from base weights and base activations only).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class BaseWeights:
    layers: tuple[LayerWeights, ...]
    unembed: Tensor  # (vocab, d): lm_head, or the tied embedding when there is no lm_head
    bos_embedding: Tensor  # (d,): embedding of bos, else eos
    n_heads: int
    n_kv_heads: int
    head_dim: int

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
