"""Diagnostics that decide how to read a sweep (SPEC §10), each with its exact null.

- **Scope.** The cumulative label (the block output's change, which carries what earlier steered
  layers already changed) and the block-local one (the change of output − input: what the block
  itself writes) are both scored. Per layer the principal overlap ``‖AᵀB‖²_F / min(r_A, r_B)``
  between the combined weight oracle and each label's oracle, and between the two label oracles;
  against random subspaces of those ranks (the overlap is ``r_A/min · e(B)`` with e the energy of
  B in the isotropic target ``P_A``, so its null moments are ``scoring.null_moments`` of ``P_A``:
  mean ``r_A r_B / (d·min)``); and the norm ratio ‖local‖/‖cumulative‖ of the label rows.
- **Spectra.** Per layer and target: the participation rank ``(Σλ)²/Σλ² = t²/‖G‖²_F`` (k for a
  rank-k isotropic target), the top-k energy curve k = 1..32 (the Ky Fan sums), and the delta's
  combined weight energy inside the top-k activation oracle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import polars as pl
import torch
from torch import Tensor

from . import scoring
from .errors import InputError
from .scoring import Target

CURVE_KS = tuple(range(1, 33))


def principal_overlap(A: Tensor, B: Tensor) -> float:
    """``‖AᵀB‖²_F / min(r_A, r_B)`` of two orthonormal bases: 1 when one span contains the other."""
    m = min(A.shape[1], B.shape[1])
    if m == 0:
        return math.nan
    return float((A.double().T @ B.double()).pow(2).sum()) / m


def overlap_null(r_a: int, r_b: int, d: int) -> tuple[float, float]:
    """Exact mean and SD of ``principal_overlap(A, B)`` for B uniform among rank-r_b subspaces."""
    if min(r_a, r_b) == 0:
        return math.nan, math.nan
    iso = Target.from_gram("P_A", torch.diag(torch.cat([torch.ones(r_a), torch.zeros(d - r_a)]).double()))
    mean, var = scoring.null_moments(iso, r_b)
    scale = r_a / min(r_a, r_b)  # overlap = ‖AᵀB‖²/min = e(B)·tr(P_A)/min
    return mean * scale, math.sqrt(var) * scale


def _overlap_row(prefix: str, A: Tensor, B: Tensor, d: int) -> dict[str, float]:
    ov = principal_overlap(A, B)
    mean, sd = overlap_null(A.shape[1], B.shape[1], d)
    return {f"overlap_{prefix}": ov, f"null_{prefix}": mean,
            f"z_{prefix}": (ov - mean) / sd if sd and sd > 0 and math.isfinite(ov) else math.nan}


def scope_rows(layers: Sequence[int], combined: Mapping[int, Target], cumulative: Tensor, local: Tensor,
               r: int) -> list[dict]:
    """One row per scored layer (``cumulative`` / ``local``: (L, n, d) label rows)."""
    rows = []
    for layer in layers:
        d = combined[layer].d
        w = combined[layer].oracle_basis(r)
        u_c, u_l = cumulative[layer].double(), local[layer].double()
        try:
            a_c = Target.from_rows(f"cumulative@{layer}", u_c).oracle_basis(r)
            a_l = Target.from_rows(f"local@{layer}", u_l).oracle_basis(r)
        except InputError:  # a label that vanishes at the layer has no oracle
            a_c = a_l = torch.zeros(d, 0, dtype=torch.float64)
        ratio = (u_l.norm(dim=1) / u_c.norm(dim=1).clamp_min(1e-300)).mean()
        rows.append({"layer": layer, "rank_w": int(w.shape[1]), "rank_cumulative": int(a_c.shape[1]),
                     "rank_local": int(a_l.shape[1]),
                     **_overlap_row("w_cumulative", w, a_c, d), **_overlap_row("w_local", w, a_l, d),
                     **_overlap_row("cumulative_local", a_c, a_l, d), "norm_ratio_local_cumulative": float(ratio)})
    return rows


def scope_verdict(scope: pl.DataFrame) -> str:
    """One line: is a low weight-vs-activation agreement a scope artifact or a real mismatch?"""
    m = {c: float(scope[c].mean()) for c in ("overlap_w_cumulative", "overlap_w_local", "z_w_cumulative",
                                             "z_w_local", "null_w_local")}
    head = (f"Scope: the combined weight oracle overlaps the cumulative label's oracle {m['overlap_w_cumulative']:.2f} "
            f"(z = {m['z_w_cumulative']:.1f}) and the block-local one {m['overlap_w_local']:.2f} (z = {m['z_w_local']:.1f}; "
            f"random subspaces: {m['null_w_local']:.2f}), mean over the scored layers. ")
    if m["z_w_local"] > 2 and m["overlap_w_local"] > 1.5 * m["overlap_w_cumulative"]:
        return head + "The weights agree with what each block writes, not with the accumulated change: a low act-vs-weight agreement on the cumulative label is a scope artifact."
    if m["z_w_local"] <= 2 and m["z_w_cumulative"] <= 2:
        return head + "Neither label's oracle overlaps the weight oracle beyond random subspaces: a real mismatch between where the delta writes and where the activations move."
    return head + "The weight oracle agrees with the cumulative label at least as well as with the block-local one: no scope artifact."


def participation_rank(target: Target) -> float:
    """``(Σλ)²/Σλ² = t²/‖G‖²_F``: exactly k for a target isotropic on k dimensions."""
    return target.trace**2 / float((target.gram * target.gram).sum())


def topk_energy(target: Target, ks: Sequence[int] = CURVE_KS) -> list[float]:
    """The Ky Fan sums e_max(k) for each k (capped at d): monotone, 1 from the target's rank on."""
    kmax = min(max(ks), target.d)
    evals = target.spectrum(kmax)[0]
    csum = torch.cumsum(evals, 0) / target.trace
    return [min(1.0, float(csum[min(k, kmax) - 1])) for k in ks]


def spectra_rows(layers: Sequence[int], targets: Mapping[int, Mapping[str, Target]],
                 ks: Sequence[int] = CURVE_KS) -> list[dict]:
    """Long rows (layer, target, k, energy): every target's curve, its participation rank, and the
    combined weight energy inside the top-k activation oracle (target ``w_combined_in_act_topk``)."""
    rows = []
    for layer in layers:
        per = targets[layer]
        for name in ("act", "o_proj", "down_proj", "combined"):
            t = per.get(name)
            if t is None:
                continue
            pr = participation_rank(t)
            rows += [{"layer": layer, "target": name, "k": k, "energy": e, "participation_rank": pr}
                     for k, e in zip(ks, topk_energy(t, ks))]
        if "act" in per and "combined" in per:
            act, comb = per["act"], per["combined"]
            kmax = min(max(ks), act.d)
            vecs = act.spectrum(kmax)[1]
            for k in ks:
                rows.append({"layer": layer, "target": "w_combined_in_act_topk", "k": k,
                             "energy": scoring.energy(comb, vecs[:, :min(k, vecs.shape[1])]),
                             "participation_rank": math.nan})
    return rows
