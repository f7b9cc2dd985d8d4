"""How much of a trained delta the base model's first gradient predicts, as training goes on (SPEC §13,
issue 34): the README's table. For each delta (made by ``subspace-sweep delta``, so that it records its
adapter family and seed), the weight gains at rank r of every gradient variant and of the best of the
seed's 43 bases, on the same base model, examples and layers: the gradient bases and the A-side are
built once and every delta is scored against them (weight targets only: no label, no causal check;
``subspace-sweep run`` gives those).

    python docs/gradient_steps.py --model smollm2-135m-instruct --delta w5.safetensors w20.safetensors w80.safetensors
    python docs/gradient_steps.py --model MODEL --delta W.safetensors ... [--behaviour FILE --n-train N] [--r 8]

Any model and pairs the sweep takes (the Gemma tier's too): the delta's adapter record names its
family, so each row's ``grad_behaviour_family`` is that family's own variant. Prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from subspace_sweep import compute
from subspace_sweep.a_side import build_a_side_for
from subspace_sweep.candidates import BEHAVIOUR_DATA, GRAD_NAMES
from subspace_sweep.delta import load_adapter_record, load_delta
from subspace_sweep.gradients import gradient_bases_for
from subspace_sweep.model import load_model, n_layers_of, write_gains
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.report import rank_fair_order
from subspace_sweep.sweep import SweepConfig, prepare_spectra, score_layers, summarise, weight_targets


def weight_gains(model, tokenizer, deltas: list[Path], config: SweepConfig) -> pl.DataFrame:
    """One row per delta: its training steps (from its record), gain_w_combined of every gradient
    variant, the best of the seed's bases by gain_w_combined, and the combined target's participation."""
    probes = load_probe_set(config.n_fit)
    loaded = [load_delta(p) for p in deltas]
    layers = sorted({layer for d in loaded for layer in config.scored_layers(d, n_layers_of(model))})
    a_side = build_a_side_for(model, tokenizer, config, layers, probes)
    gradients = gradient_bases_for(model, tokenizer, config, layers, probes)
    gains = {layer: write_gains(model, layer) for layer in layers}
    rows = []
    for path, delta in zip(deltas, loaded):
        record = load_adapter_record(path)
        grad, family = gradients.candidates(model, record)
        candidates = [*a_side.candidates, *grad]
        scored = config.scored_layers(delta, n_layers_of(model))
        targets = {layer: weight_targets(delta, layer, gains[layer]) for layer in scored}
        widest = max(int(B.shape[1]) for c in candidates for B in c.bases.values())
        with compute.policy():
            slice_dims = prepare_spectra(targets, widest)
            per_layer, _ = score_layers(candidates, targets, slice_dims, config)
        summary = summarise(pl.DataFrame(per_layer))  # weight targets only: the act columns are NaN
        seed = rank_fair_order(summary.filter((pl.col("sees") != BEHAVIOUR_DATA) & (pl.col("family") != "grad:neutral")
                                              & pl.col("axis_kind").is_in(["write", "mixed"])),
                               "gain_w_combined", "z_w_combined").row(0, named=True)
        by_name = {r["candidate"]: r for r in summary.iter_rows(named=True)}
        training = ((record or {}).get("training") or {}).get("pos") or {}
        rows.append({"delta": path.name, "steps": training.get("steps"), "family": (record or {}).get("peft_type"),
                     **{n: by_name[n]["gain_w_combined"] for n in GRAD_NAMES},
                     "best_seed_basis": seed["candidate"], "best_seed_gain_w": seed["gain_w_combined"],
                     "family_variant": family})
    return pl.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--delta", nargs="+", type=Path, required=True)
    ap.add_argument("--behaviour", default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    config = SweepConfig(model=args.model, r=args.r, behaviour=args.behaviour, n_train=args.n_train, quiet=True)
    table = weight_gains(model, tokenizer, args.delta, config)
    names = list(GRAD_NAMES)
    print("| delta | steps | " + " | ".join(names) + " | best of the seed's bases (gain_w) |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r in table.iter_rows(named=True):
        print(f"| {r['delta']} | {r['steps']} | " + " | ".join(f"{r[n]:.3f}" for n in names)
              + f" | {r['best_seed_basis']} ({r['best_seed_gain_w']:.3f}) |")
    print()
    for r in table.iter_rows(named=True):
        print(f"{r['delta']}: family variant: {r['family_variant']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
