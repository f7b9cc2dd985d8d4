"""The two ranking views on concern 14's toy (SPEC §5, §6; ``demo.outlier_toy``): the README's
table. A tiny Gemma-2 (post-norm writers) with post-norm gains ×300 on 4 coordinates; a delta
planted in ``chars_clusters``'s span with zero residual write on them, plus a generic rank-2 part in
the writers' own coordinates whose residual energy is 1000x the planted part's (the setting of
``tests/properties/test_review_concern14_outliers.py``).

    python docs/outlier_views.py
"""

from __future__ import annotations

import polars as pl

from subspace_sweep.demo import OUTLIER_COORDINATES, OUTLIER_GENERIC_RATIO, outlier_toy, plant_away_from
from subspace_sweep.report import rank_fair_order
from subspace_sweep.sweep import SweepConfig, sweep

PLANT = "chars_clusters"


def main() -> None:
    config = SweepConfig(quiet=True)
    model, tok, layers, a_side = outlier_toy(config)
    plant = next(c for c in a_side.candidates if c.name == PLANT)
    delta = plant_away_from(model, plant, layers, OUTLIER_COORDINATES, generic_ratio=OUTLIER_GENERIC_RATIO, seed=0)
    run = sweep(model, tok, delta, config, a_side=a_side)
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
