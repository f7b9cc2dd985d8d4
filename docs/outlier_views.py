"""The two ranking views on a toy with planted outlier coordinates (SPEC §5, §6 concern 14): the
README's table. A tiny Gemma-2 (post-norm writers) with post-norm gains ×300 on 4 coordinates; a
delta planted in ``chars_clusters``'s span with zero residual write on them, plus a generic rank-2
part in the writers' own coordinates whose residual energy is 1000x the planted part's (the test
``tests/properties/test_review_concern14_outliers.py`` is this setting).

    python docs/outlier_views.py
"""

from __future__ import annotations

import polars as pl

from subspace_sweep.a_side import build_a_side_for
from subspace_sweep.demo import default_layers, plant_away_from
from subspace_sweep.prompts import load_probe_set
from subspace_sweep.report import rank_fair_order
from subspace_sweep.sweep import SweepConfig, sweep
from subspace_sweep.toy import build_tiny_decoder, plant_outlier_gains

OUTLIERS, PLANT = [3, 17, 29, 41], "chars_clusters"


def main() -> None:
    model, tok = build_tiny_decoder("gemma2", seed=0, n_layers=4)
    plant_outlier_gains(model, OUTLIERS, 300.0)
    config = SweepConfig(quiet=True)
    layers = default_layers(model.config.num_hidden_layers)
    a_side = build_a_side_for(model, tok, config, layers, load_probe_set(config.n_fit))
    plant = next(c for c in a_side.candidates if c.name == PLANT)
    run = sweep(model, tok, plant_away_from(model, plant, layers, OUTLIERS, generic_ratio=1000.0, seed=0), config,
                a_side=a_side)
    print(run.outlier_warning, "\n")
    top8 = run.spectra.filter(pl.col("target").is_in(["act_top8_coordinates", "combined_top8_coordinates"]))
    print(top8.select("layer", "target", "energy", "coordinates"), "\n")
    rows = run.summary.filter(pl.col("side") == "A")
    res = rank_fair_order(rows, "gain_w_combined", "z_w_combined").head(6)
    std = rank_fair_order(rows, "gain_w_combined_std", "z_w_combined_std").head(6)
    print("| # | residual view | gain_w_combined | standardized view | gain_w_combined_std |")
    print("|---|---|---|---|---|")
    for i, (a, b) in enumerate(zip(res.iter_rows(named=True), std.iter_rows(named=True)), 1):
        print(f"| {i} | {a['candidate']} | {a['gain_w_combined']:.4f} | {b['candidate']} | {b['gain_w_combined_std']:.3f} |")


if __name__ == "__main__":
    main()
