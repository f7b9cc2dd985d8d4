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
