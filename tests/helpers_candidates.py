"""Synthetic BaseWeights / ActivationCaptures / SteeredLabels for candidate tests (no model needed).

Shapes default to the tiny Qwen3 of ``subspace_sweep.toy`` (4 layers, d = 64, 4 heads, 2 kv
heads, head_dim 16, d_mlp 192). Values are seeded Gaussians with enough structure that every
candidate is well defined: activations drift across layers, the persona conditions differ by a
low-rank shift, token rows are right-aligned with zero padding and attention rows sum to 1 over
each prompt's real tokens.
"""

from __future__ import annotations

import torch

from subspace_sweep.capture_types import ActivationCaptures, SteeredLabels
from subspace_sweep.weights import BaseWeights, LayerWeights


def synthetic_weights(
    seed: int = 0,
    *,
    n_layers: int = 4,
    d: int = 64,
    n_heads: int = 4,
    n_kv: int = 2,
    head_dim: int = 16,
    d_mlp: int = 192,
    vocab: int = 400,
    scale: float = 0.1,
) -> BaseWeights:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def gain(n: int) -> torch.Tensor:  # non-trivial norm gains (SPEC §4.1), exp(N(0, 0.3²))
        return torch.exp(0.3 * torch.randn(n, generator=g))

    layers = tuple(
        LayerWeights(
            q=randn(n_heads * head_dim, d),
            k=randn(n_kv * head_dim, d),
            v=randn(n_kv * head_dim, d),
            o=randn(d, n_heads * head_dim),
            gate=randn(d_mlp, d),
            up=randn(d_mlp, d),
            down=randn(d, d_mlp),
            attn_gain=gain(d),
            mlp_gain=gain(d),
            q_gain=gain(head_dim).repeat(n_heads),  # per row of W_q: one gain shared by the heads (Qwen3)
            k_gain=gain(head_dim).repeat(n_kv),
        )
        for _ in range(n_layers)
    )
    unembed = randn(vocab, d)
    return BaseWeights(
        layers=layers, unembed=unembed, final_gain=gain(d),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
    )


def synthetic_captures(
    seed: int = 0, *, n_layers: int = 4, d: int = 64, n: int = 16, T: int = 12, min_len: int = 5
) -> ActivationCaptures:
    g = torch.Generator().manual_seed(1000 + seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    # A residual stream that drifts across layers (so churn and the magnitude features are not trivial).
    base = torch.cumsum(randn(n_layers, n, d), dim=0)
    shift = randn(n_layers, 3, d)  # persona contrast lives mostly in a 3-dim subspace
    coef = randn(n, 3)
    persona_pos = base + 0.5 * torch.einsum("nk,lkd->lnd", coef, shift) + 0.1 * randn(n_layers, n, d)
    persona_neg = base - 0.5 * torch.einsum("nk,lkd->lnd", coef, shift) + 0.1 * randn(n_layers, n, d)

    lengths = torch.randint(min_len, T + 1, (n,), generator=g)
    lengths[0] = T
    real = torch.arange(T)[None, :] >= (T - lengths)[:, None]  # right-aligned: padding first
    tokens_pos = randn(n_layers, n, T, d) * real[None, :, :, None]
    tokens_neg = (tokens_pos + 0.3 * randn(n_layers, n, T, d)) * real[None, :, :, None]

    def attention() -> torch.Tensor:
        logits = randn(n_layers, n, T).masked_fill(~real[None], float("-inf"))
        return torch.softmax(logits, dim=-1)

    return ActivationCaptures(
        clean=base,
        persona_pos=persona_pos,
        persona_neg=persona_neg,
        up_in_clean=randn(n_layers, n, d),
        up_in_pos=randn(n_layers, n, d),
        up_in_neg=randn(n_layers, n, d),
        up_written_pos=randn(n_layers, n, d),
        up_written_neg=randn(n_layers, n, d),
        tokens_pos=tokens_pos,
        tokens_neg=tokens_neg,
        attn_pos=attention(),
        attn_neg=attention(),
        sink=randn(n_layers, d),
    )


def synthetic_labels(seed: int = 0, *, n_layers: int = 4, d: int = 64, n_fit: int = 16, n_eval: int = 16) -> SteeredLabels:
    g = torch.Generator().manual_seed(2000 + seed)
    return SteeredLabels(eval=torch.randn(n_layers, n_eval, d, generator=g), fit=torch.randn(n_layers, n_fit, d, generator=g))
