"""Base-model weights as the A-side sees them: CPU tensors in HF Linear layout (out x in), in the
model's dtype. ``extract_base_weights`` returns views of a CPU model's parameters (no copy of a
0.6B model), so builders never modify them in place and compute in float32 or float64
(``LayerWeights.at_least_float32``, one layer at a time).

This is everything a candidate builder may read about the model. The LoRA delta is never
part of it (SPEC §1: A-side bases are built from base weights and base activations only).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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

    def at_least_float32(self) -> LayerWeights:
        """This layer with half-precision tensors converted to float32 (float32/64 kept as they are)."""
        def conv(t: Tensor) -> Tensor:
            return t if t.dtype in (torch.float32, torch.float64) else t.float()

        return LayerWeights(**{f.name: conv(getattr(self, f.name)) for f in fields(self)})


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
