"""The sweep's weight-side scoring without forward passes: for tests that score many deltas
against one A-side (planted recovery, storage precision). Uses the sweep's own functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import polars as pl
from torch import Tensor

from subspace_sweep import compute
from subspace_sweep.candidates import Candidate
from subspace_sweep.scoring import Target
from subspace_sweep.sweep import SweepConfig, prepare_spectra, score_layers, summarise, weight_targets

CONFIG = SweepConfig(quiet=True)


def weight_summary(
    candidates: Sequence[Candidate], delta: Mapping[str, Tensor], layers: Sequence[int], *,
    slice_dim: Callable[[Target], int] | None = None, per_layer: bool = False,
    write_gains: Mapping[int, Mapping[str, Tensor]] | None = None,
) -> pl.DataFrame:
    """The sweep's summary (or per_layer frame) of ``candidates`` on the delta's weight targets
    alone. ``slice_dim`` replaces the LoRA slice's dimension rule (for legacy cases);
    ``write_gains`` are a post-norm model's (``model.write_gains``)."""
    targets = {layer: weight_targets(delta, layer, (write_gains or {}).get(layer)) for layer in layers}
    widest = max(int(B.shape[1]) for c in candidates for B in c.bases.values())
    with compute.policy():
        slice_dims = prepare_spectra(targets, widest)
        if slice_dim is not None:
            slice_dims = {layer: slice_dim(per["combined"]) for layer, per in targets.items()}
        rows, _ = score_layers(candidates, targets, slice_dims, CONFIG)
    frame = pl.DataFrame(rows)
    return frame if per_layer else summarise(frame)


def standardized_weight_summary(
    candidates: Sequence[Candidate], delta: Mapping[str, Tensor], layers: Sequence[int],
    coordinate_rms: Mapping[int, Tensor], write_gains: Mapping[int, Mapping[str, Tensor]] | None = None,
) -> pl.DataFrame:
    """``candidates`` scored on the delta's combined weight target in the standardized view (SPEC §5,
    concern 14: ``outliers.StandardizedView`` of the A-side's coordinate scales, the sweep's own
    ``score_standardized``), best first in the rank-fair order of gain_w_combined_std: one row per
    candidate with the means over ``layers`` (and Stouffer's z)."""
    from subspace_sweep.outliers import StandardizedView
    from subspace_sweep.report import rank_fair_order
    from subspace_sweep.sweep import score_standardized, writer_rows

    rows = []
    for layer in layers:
        view = StandardizedView.of(coordinate_rms[layer])
        writers = [Target.from_matrix(f"{name}_std@{layer}", view.vectors(M), stored=M.dtype)
                   for name, M in writer_rows(delta, layer, (write_gains or {}).get(layer)).items()]
        combined = Target.combine(f"combined_std@{layer}", writers)
        for c, scores in zip(candidates, score_standardized(candidates, layer, {"combined": combined}, view, CONFIG)):
            rows.append({"candidate": c.name, "rank": int(c.bases[layer].shape[1]), **scores})
    frame = pl.DataFrame(rows)
    summary = frame.group_by("candidate", maintain_order=True).agg(
        pl.col("rank").cast(pl.Float64).mean(),
        *[pl.col(c).mean() for c in ("gain_w_combined_std", "pct_oracle_combined_std", "R_w_combined_std")],
        (pl.col("z_w_combined_std").sum() / pl.len().sqrt()).alias("z_w_combined_std"),
    )
    return rank_fair_order(summary, "gain_w_combined_std", "z_w_combined_std")
