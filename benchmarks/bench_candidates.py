"""Time ``build_a_side`` on random weights and captures with Qwen3-0.6B's shapes (a script, not a test).

    .venv/bin/python benchmarks/bench_candidates.py [--profile] [--threads N]

Builds seeded float32 BaseWeights directly (28 layers, d 1024, d_mlp 3072, 16 heads, 8 kv heads,
head_dim 128, vocab 151936, tied; no transformers model) and ActivationCaptures of realistic size
(16 FIT prompts, T = 60 right-aligned tokens), then times all candidates for layers 8..21 (the
seed's scored layers) and for all 28 layers. Prints one JSON line. ``--profile`` adds the top of a
cProfile of the all-layers build on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import sys
import time

import torch

from subspace_sweep.candidates import build_a_side
from subspace_sweep.capture_types import ActivationCaptures
from subspace_sweep.weights import BaseWeights, LayerWeights

QWEN3_06B = dict(n_layers=28, d=1024, d_mlp=3072, n_heads=16, n_kv=8, head_dim=128, vocab=151936)


def random_weights(seed: int = 0, *, n_layers: int, d: int, d_mlp: int, n_heads: int, n_kv: int, head_dim: int,
                   vocab: int) -> BaseWeights:
    """Seeded float32 weights with the scale of a trained checkpoint's initialisation (std 0.02)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).mul_(0.02)

    def gain(n: int) -> torch.Tensor:  # norm gains around 1, as in a trained checkpoint
        return torch.exp(0.3 * torch.randn(n, generator=g))

    layers = tuple(
        LayerWeights(
            q=randn(n_heads * head_dim, d), k=randn(n_kv * head_dim, d), v=randn(n_kv * head_dim, d),
            o=randn(d, n_heads * head_dim), gate=randn(d_mlp, d), up=randn(d_mlp, d), down=randn(d, d_mlp),
            attn_gain=gain(d), mlp_gain=gain(d), q_gain=gain(head_dim).repeat(n_heads), k_gain=gain(head_dim).repeat(n_kv),
        )
        for _ in range(n_layers)
    )
    embed = randn(vocab, d)  # tied: the unembedding is the embedding
    return BaseWeights(layers=layers, unembed=embed, final_gain=gain(d),
                       n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)


def random_captures(seed: int = 0, *, n_layers: int, d: int, n: int = 16, T: int = 60, **_: int) -> ActivationCaptures:
    """Residual-stream-like captures: norms growing with depth, persona± differing by a low-rank shift,
    token rows right-aligned with zero padding (lengths 45..60), attention rows summing to 1."""
    g = torch.Generator().manual_seed(10_000 + seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    base = torch.cumsum(randn(n_layers, n, d), dim=0)
    shift = torch.einsum("nk,lkd->lnd", randn(n, 4), randn(n_layers, 4, d))
    lengths = torch.randint(45, T + 1, (n,), generator=g)
    real = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).float()
    tokens_pos = randn(n_layers, n, T, d).mul_(real[None, :, :, None])
    tokens_neg = (tokens_pos + 0.3 * randn(n_layers, n, T, d)).mul_(real[None, :, :, None])

    def attention() -> torch.Tensor:
        return torch.softmax(randn(n_layers, n, T).masked_fill(real[None] == 0, float("-inf")), dim=-1)

    return ActivationCaptures(
        clean=base, persona_pos=base + shift + 0.1 * randn(n_layers, n, d), persona_neg=base - shift,
        up_in_clean=randn(n_layers, n, d), up_in_pos=randn(n_layers, n, d), up_in_neg=randn(n_layers, n, d),
        up_written_pos=randn(n_layers, n, d), up_written_neg=randn(n_layers, n, d),
        tokens_pos=tokens_pos, tokens_neg=tokens_neg, attn_pos=attention(), attn_neg=attention(),
        sink=randn(n_layers, d),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="cProfile the all-layers build (stderr)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    weights = random_weights(**QWEN3_06B)
    acts = random_captures(**QWEN3_06B)
    setup_s = time.perf_counter() - t0

    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    mid = build_a_side(weights, acts, layers=range(8, 22))
    layers_8_21_s, layers_8_21_cpu = time.perf_counter() - t0, time.process_time() - c0

    prof = cProfile.Profile() if args.profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    full = build_a_side(weights, acts)
    if prof:
        prof.disable()
    all_layers_s, all_layers_cpu = time.perf_counter() - t0, time.process_time() - c0

    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        print(buf.getvalue(), file=sys.stderr)
    print(json.dumps({
        "benchmark": "build_a_side",
        "shapes": "Qwen3-0.6B (random float32)",
        "candidates": len(full),
        "layers_8_21_s": round(layers_8_21_s, 2),
        "all_28_layers_s": round(all_layers_s, 2),
        # CPU seconds of this process: wall >> cpu/threads means other processes held the cores
        "layers_8_21_cpu_s": round(layers_8_21_cpu, 2),
        "all_28_layers_cpu_s": round(all_layers_cpu, 2),
        "load_avg_1min_before": round(load_before, 2),
        "setup_s": round(setup_s, 2),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "n_mid": len(mid),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
