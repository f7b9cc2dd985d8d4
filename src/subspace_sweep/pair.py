"""The pair's own geometry (SPEC §8, issue 30): weight only, from the delta file's midpoint.

With τ± the two adapters' merged changes, w = τ⁺ − τ⁻ (the behaviour axis) and the shared drift
M = (τ⁺ + τ⁻)/2 (what ``subspace-sweep delta`` stores beside w), τ⁺ = M + w/2 and τ⁻ = M − w/2.
Every figure follows from three float64 sums over the tensors of a group: ‖w‖², ‖M‖² and ⟨w, M⟩:

- ⟨τ⁺, −τ⁻⟩ = ‖w‖²/4 − ‖M‖², ‖τ±‖² = ‖M‖² ± ⟨w, M⟩ + ‖w‖²/4;
- cos(τ⁺, −τ⁻) (1: the adapters move in exactly opposite directions; −1: the same direction) is
  positive exactly when ‖M‖ < ‖w‖/2, i.e. ``drift_over_axis`` = ‖M‖/‖w‖ < 1/2;
- |cos(w, M)|: how much of the drift lies along the behaviour axis.

Groups: the whole delta, each module type (the parameter's module name: ``o_proj``, ``down_proj``,
``embed_tokens``, …) and each decoder layer. The sums of a group are the sums over its tensors, so
the per-module (or per-layer, plus the tensors outside the layers) squared norms add up to the
overall ones. A tensor present in only one of w and M is zero in the other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import polars as pl
import torch
from torch import Tensor

from .errors import InputError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
#: The BLUF's words: above ``OPPOSITE_COS`` the adapters move "mostly in opposite directions", below
#: ``SHARED_COS`` "mostly in a shared direction", between them neither. With M ⟂ w, cos(τ⁺, −τ⁻) =
#: (1/4 − ρ²)/(1/4 + ρ²) for ρ = ‖M‖/‖w‖: ±0.5 are ρ = 0.29 and 0.87 (the drift a bit over half the
#: axis at most, or nearly the axis itself); cos = 0 is ρ = 1/2 exactly, whatever the angle of M to w.
OPPOSITE_COS = 0.5
SHARED_COS = -0.5

COLUMNS = {
    "scope": pl.String,  # all | module | layer
    "name": pl.String,  # all; the module type; the layer index
    "tensors": pl.Int64,
    "w_sq": pl.Float64,  # ‖w‖²
    "drift_sq": pl.Float64,  # ‖M‖²
    "w_dot_drift": pl.Float64,  # ⟨w, M⟩
    "cos_plus_neg_minus": pl.Float64,  # cos(τ⁺, −τ⁻)
    "norm_ratio": pl.Float64,  # ‖τ⁺‖/‖τ⁻‖
    "drift_over_axis": pl.Float64,  # ‖M‖/‖w‖
    "abs_cos_w_drift": pl.Float64,  # |cos(w, M)|
}


def module_type(key: str) -> str:
    """The parameter's module name: ``model.layers.3.self_attn.o_proj.weight`` -> ``o_proj``."""
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def check_shapes(w: Mapping[str, Tensor], drift: Mapping[str, Tensor]) -> None:
    """InputError naming the first tensor that w and the midpoint both hold in different shapes."""
    for key in sorted(set(w) & set(drift)):
        if tuple(w[key].shape) != tuple(drift[key].shape):
            raise InputError(f"the delta file's w and midpoint disagree on the shape of '{key}': "
                             f"{tuple(w[key].shape)} and {tuple(drift[key].shape)}")


def tensor_sums(w: Mapping[str, Tensor], drift: Mapping[str, Tensor]) -> dict[str, tuple[float, float, float]]:
    """key -> (‖w‖², ‖M‖², ⟨w, M⟩) in float64, over the union of the two dicts' keys."""
    check_shapes(w, drift)
    out = {}
    for key in sorted(set(w) | set(drift)):
        a = w.get(key)
        b = drift.get(key)
        a64 = a.detach().double() if a is not None else None
        b64 = b.detach().double() if b is not None else None
        ww = float(a64.square().sum()) if a64 is not None else 0.0
        mm = float(b64.square().sum()) if b64 is not None else 0.0
        wm = float((a64 * b64).sum()) if a64 is not None and b64 is not None else 0.0
        out[key] = (ww, mm, wm)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def figures(ww: float, mm: float, wm: float) -> dict[str, float]:
    """The four figures of a group from its sums (see the module doc)."""
    plus = mm + wm + ww / 4
    minus = mm - wm + ww / 4
    return {
        "cos_plus_neg_minus": _ratio(ww / 4 - mm, math.sqrt(max(plus, 0.0) * max(minus, 0.0))),
        "norm_ratio": math.sqrt(max(plus, 0.0)) / math.sqrt(minus) if minus > 0 else math.nan,
        "drift_over_axis": math.sqrt(mm) / math.sqrt(ww) if ww > 0 else math.nan,
        "abs_cos_w_drift": abs(_ratio(wm, math.sqrt(ww * mm))),
    }


def pair_geometry(w: Mapping[str, Tensor], drift: Mapping[str, Tensor]) -> pl.DataFrame:
    """``pair.tsv``: one row for the whole delta, one per module type, one per decoder layer."""
    sums = tensor_sums(w, drift)
    groups: dict[tuple[str, str], list[str]] = {("all", "all"): list(sums)}
    for key in sums:
        groups.setdefault(("module", module_type(key)), []).append(key)
    layers = sorted({int(m[1]) for key in sums if (m := _LAYER.match(key))})
    for layer in layers:
        groups[("layer", str(layer))] = [k for k in sums if (m := _LAYER.match(k)) and int(m[1]) == layer]
    rows = []
    for (scope, name), keys in groups.items():
        ww, mm, wm = (math.fsum(sums[k][i] for k in keys) for i in range(3))
        rows.append({"scope": scope, "name": name, "tensors": len(keys), "w_sq": ww, "drift_sq": mm, "w_dot_drift": wm,
                     **figures(ww, mm, wm)})
    order = {"all": 0, "module": 1, "layer": 2}
    rows.sort(key=lambda r: (order[r["scope"]], int(r["name"]) if r["scope"] == "layer" else 0, r["name"]))
    return pl.DataFrame(rows, schema=COLUMNS)


def geometry_line(table: pl.DataFrame) -> str:
    """The BLUF's line on the pair's geometry."""
    row = table.filter(pl.col("scope") == "all").row(0, named=True)

    def f(x, spec=".3f"):
        return "nan" if x is None or not math.isfinite(x) else format(x, spec)

    cos = row["cos_plus_neg_minus"]
    if cos is not None and cos > OPPOSITE_COS:
        how = "the two adapters move mostly in opposite directions (their shared drift M is small beside the behaviour axis w)"
    elif cos is not None and cos < SHARED_COS:
        how = "the two adapters move mostly in a shared direction (their shared drift M is as large as the behaviour axis w or larger)"
    else:
        # ⟨τ⁺, τ⁻⟩ = ‖M‖² − ‖w‖²/4: the sign of cos(τ⁺, −τ⁻) is the sign of ‖w‖/2 − ‖M‖
        fact = ("negative exactly when ‖M‖ > ‖w‖/2" if cos is not None and cos < 0
                else "zero exactly when ‖M‖ = ‖w‖/2" if cos == 0 else "positive exactly when ‖M‖ < ‖w‖/2")
        how = ("the two adapters move neither mostly apart nor mostly together (their shared drift M is about half the "
               f"behaviour axis w: cos(τ⁺, −τ⁻) is {fact})")
    modules = table.filter(pl.col("scope") == "module").sort("drift_over_axis", descending=True, nulls_last=True)
    top = modules.row(0, named=True) if modules.height else None
    most = (f"; the largest drift relative to the axis is in `{top['name']}` (‖M‖/‖w‖ = {f(top['drift_over_axis'])})"
            if top is not None and modules.height > 1 else "")
    return (f"The pair's geometry (weight only, `pair.tsv`; τ± the adapters' changes, w = τ⁺ − τ⁻, M = (τ⁺ + τ⁻)/2): "
            f"{how}: cos(τ⁺, −τ⁻) = {f(cos)}, ‖τ⁺‖/‖τ⁻‖ = {f(row['norm_ratio'])}, ‖M‖/‖w‖ = "
            f"{f(row['drift_over_axis'])}, |cos(w, M)| = {f(row['abs_cos_w_drift'])}{most}. A θ ± α·w experiment around "
            "the base leaves M out; `--causal-centre midpoint` steers around θ + M.")
