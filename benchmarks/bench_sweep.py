"""Benchmark of the whole sweep at Qwen3-0.6B's exact shapes, offline (a script, not a test).

    .venv/bin/python benchmarks/bench_sweep.py                # Qwen3-0.6B shapes, bfloat16
    .venv/bin/python benchmarks/bench_sweep.py --shape tiny   # a quick run on the tiny model

Random weights (no download), a rank-32 synthetic delta on layers 8..21 for all seven
projections (Frobenius norm 1% of each base weight), the package's probes tokenised by an
offline word-level BPE (Qwen-like lengths: ~19 tokens per raw probe, ~55 per chat-formatted
persona probe), then every phase of ``run_sweep``: captures, candidates, scoring, report.
Then a rerun with another delta on the same base model (the daily case): its A-side comes from
the cache the first run stored (``--a-side-cache``, a temporary folder here); ``--no-rerun`` skips it.
Prints ONE JSON line: seconds per phase of both runs, forward passes, peak RSS, torch threads,
device, and the prompt token counts actually used. ``--causal K`` adds the causal check (SPEC §8)
to the first run and its seconds per restricted delta (2 EVAL forward passes each).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from subspace_sweep import report
from subspace_sweep.capture import chat_texts
from subspace_sweep.delta import random_delta
from subspace_sweep.model import ATTN_PROJS, MLP_PROJS, resolve_device
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.sweep import SweepConfig, model_manifest, sweep
from subspace_sweep.toy import WORD_LEVEL_VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer

QWEN3_06B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6,
)


def build_qwen_shaped(dtype: torch.dtype, device: torch.device):
    config = Qwen3Config(**QWEN3_06B)
    config._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype (no fp32 copy first)
    try:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device).eval().requires_grad_(False)
    tokenizer = build_tiny_tokenizer(WORD_LEVEL_VOCAB_SIZE)
    return model, tokenizer


def token_counts(tokenizer, probes) -> dict[str, float]:
    raw = [len(tokenizer(p)["input_ids"]) for p in probes.fit]
    chat = [len(tokenizer(t)["input_ids"]) for t in chat_texts(tokenizer, probes.fit, probes.persona_pos)]
    return {"raw_probe_mean": sum(raw) / len(raw), "chat_persona_probe_mean": sum(chat) / len(chat)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("qwen3-0.6b", "tiny"), default="qwen3-0.6b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-rerun", action="store_true",
                    help="skip the rerun with another delta that loads the A-side from the cache")
    ap.add_argument("--causal", type=int, default=0, metavar="K",
                    help="also run the causal check on the first run (top K; reports its time per restricted delta)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.shape == "tiny":
        model, tokenizer = build_tiny_model(seed=0)
        layers = [1, 2]
    else:
        model, tokenizer = build_qwen_shaped(dtype, device)
        layers = list(range(8, 22))
    timings["model_build"] = time.perf_counter() - t0

    projections = [f"self_attn.{p}" for p in ATTN_PROJS] + [f"mlp.{p}" for p in MLP_PROJS]
    probes = load_probe_set()

    def run_once(delta_seed: int, cache: str, causal: int = 0) -> tuple[dict[str, float], object]:
        delta = random_delta(model, layers, rank=32 if args.shape != "tiny" else 4, seed=delta_seed, scale=0.01,
                             projections=projections)
        config = SweepConfig(model=f"random:{args.shape}", quiet=True, a_side_cache=cache, causal=causal)
        t_sweep = time.perf_counter()
        result = sweep(model, tokenizer, delta, config, probes)
        phases = dict(result.timings)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            report.write_run(result, config, Path(tmp) / "run", {**model_manifest(model, config, result), "delta": "synthetic"})
            phases["report"] = time.perf_counter() - t0
        phases["sweep_total_after_build"] = time.perf_counter() - t_sweep
        return phases, result

    with tempfile.TemporaryDirectory() as cache:
        # First run: the A-side is built (and stored: a cache miss). Rerun: a new delta on the same
        # base model, what a researcher does daily; the A-side comes from the cache.
        first, result = run_once(0, cache, args.causal)
        timings.update(first)
        rerun, rerun_result = run_once(1, cache) if not args.no_rerun else (None, None)

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "shape": args.shape,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "candidates_plus_scoring_s": round(timings["candidates"] + timings["scoring"], 2),
        "forward_passes": result.forward_passes,
        "prompts_per_pass": {"fit": len(probes.fit), "eval": len(probes.eval)},
        "tokens": token_counts(tokenizer, probes),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "scored_layers": result.scored_layers,
        "n_candidates": len(result.candidates),
        "a_side_cache": result.a_side_cache["status"],
        **({} if result.causal is None else {
            "causal_k": args.causal,
            "causal_forward_passes": result.causal.forward_passes,
            "causal_restricted_deltas": result.causal.forward_passes // 2,
            "causal_s_per_restricted_delta": round(timings["causal"] / (result.causal.forward_passes // 2), 3),
        }),
        **({} if rerun is None else {
            "rerun_seconds": {k: round(v, 2) for k, v in rerun.items()},
            "rerun_candidates_plus_scoring_s": round(rerun["candidates"] + rerun["scoring"], 2),
            "rerun_forward_passes": rerun_result.forward_passes,
            "rerun_a_side_cache": rerun_result.a_side_cache["status"],
        }),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
