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
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor

from . import linalg, scoring
from .errors import InputError
from .outliers import TOP_COORDINATES, top_coordinates
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


SCOPE_VERDICTS = ("scope artifact", "real mismatch", "no scope artifact")


def scope_verdict_code(scope: pl.DataFrame) -> str:
    """``SCOPE_VERDICTS``: the block-local label agrees (beyond the null, 1.5x the cumulative
    overlap) → scope artifact; neither label beyond the null → real mismatch; else none."""
    m = {c: float(scope[c].mean()) for c in ("overlap_w_cumulative", "overlap_w_local", "z_w_cumulative", "z_w_local")}
    if m["z_w_local"] > 2 and m["overlap_w_local"] > 1.5 * m["overlap_w_cumulative"]:
        return SCOPE_VERDICTS[0]
    if m["z_w_local"] <= 2 and m["z_w_cumulative"] <= 2:
        return SCOPE_VERDICTS[1]
    return SCOPE_VERDICTS[2]


def scope_verdict(scope: pl.DataFrame) -> str:
    """One line: is a low weight-vs-activation agreement a scope artifact or a real mismatch?"""
    m = {c: float(scope[c].mean()) for c in ("overlap_w_cumulative", "overlap_w_local", "z_w_cumulative",
                                             "z_w_local", "null_w_local")}
    head = (f"Scope: the combined weight oracle overlaps the cumulative label's oracle {m['overlap_w_cumulative']:.2f} "
            f"(z = {m['z_w_cumulative']:.1f}) and the block-local one {m['overlap_w_local']:.2f} (z = {m['z_w_local']:.1f}; "
            f"random subspaces: {m['null_w_local']:.2f}), mean over the scored layers. ")
    code = scope_verdict_code(scope)
    if code == SCOPE_VERDICTS[0]:
        return head + "The weights agree with what each block writes, not with the accumulated change: a low act-vs-weight agreement on the cumulative label is a scope artifact."
    if code == SCOPE_VERDICTS[1]:
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
    """Long rows (layer, target, k, energy): every target's curve, its participation rank, the share
    of its energy on its own top-8 coordinates (target ``<name>_top8_coordinates``, k = 8, which
    coordinates in ``coordinates``; SPEC §6 concern 14), and the combined weight energy inside the
    top-k activation oracle (target ``w_combined_in_act_topk``)."""
    rows = []
    for layer in layers:
        per = targets[layer]
        for name in ("act", "o_proj", "down_proj", "combined"):
            t = per.get(name)
            if t is None:
                continue
            pr = participation_rank(t)
            rows += [{"layer": layer, "target": name, "k": k, "energy": e, "participation_rank": pr, "coordinates": None}
                     for k, e in zip(ks, topk_energy(t, ks))]
            # concern 14: the share on the target's own top-8 coordinates (an isotropic target: 8/d)
            share, coords = top_coordinates(t)
            rows.append({"layer": layer, "target": f"{name}_top{TOP_COORDINATES}_coordinates", "k": TOP_COORDINATES,
                         "energy": share, "participation_rank": math.nan,
                         "coordinates": " ".join(str(j) for j in coords)})
        if "act" in per and "combined" in per:
            act, comb = per["act"], per["combined"]
            kmax = min(max(ks), act.d)
            vecs = act.spectrum(kmax)[1]
            for k in ks:
                rows.append({"layer": layer, "target": "w_combined_in_act_topk", "k": k,
                             "energy": scoring.energy(comb, vecs[:, :min(k, vecs.shape[1])]),
                             "participation_rank": math.nan, "coordinates": None})
    return rows


# ---------------------------------------------------------------------------- readout


@dataclass(frozen=True)
class Readout:
    """What the output reads of the residual stream (SPEC §10): Û = lm·diag(γ_final) with unit
    rows (V of them) through its d x d Gram, and the answers' readout direction."""

    unit_gram: Tensor  # ÛᵀÛ (d x d, float64), rows of Û normalised to unit length
    vocab: int
    direction: Tensor  # diag(γ_final)(u_yes − u_no) (d,), float64: the Yes/No logit difference's reader
    final_gain: Tensor  # (d,) float64
    eps: float  # the final norm's eps

    @classmethod
    def of(cls, model, yes_id: int, no_id: int, chunk: int = 8192) -> Readout:
        from .arch import architecture_of
        from .model import norm_gain

        arch = architecture_of(model.config)
        final = model.get_submodule(arch.final_norm)
        d = int(model.config.hidden_size)
        gain = norm_gain(final, d).double()
        U = model.get_output_embeddings().weight.detach()
        G = torch.zeros(d, d, dtype=torch.float64)
        g32 = gain.float()
        for start in range(0, U.shape[0], chunk):  # float32 chunks, summed in float64 (as linalg.col_gram)
            X = U[start:start + chunk].to("cpu", torch.float32) * g32[None, :]
            X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-30)
            G += linalg.col_gram(X)
        direction = (U[yes_id].double().cpu() - U[no_id].double().cpu()) * gain
        eps = float(getattr(final, "variance_epsilon", getattr(final, "eps", 1e-6)))
        return cls(G, int(U.shape[0]), direction, gain, eps)

    def token_energy(self, v: Tensor) -> float:
        """``(d/V)·‖Û v̂‖²``, with V taken as tr(ÛᵀÛ) (= V up to the float32 rounding of the unit
        rows): exactly 1 in expectation over uniformly random unit directions (E[v̂v̂ᵀ] = I/d);
        > 1: the output reads v more than a random direction."""
        v = v.double()
        n = float(v.norm())
        if n == 0.0:
            return math.nan
        v = v / n
        return float(v @ self.unit_gram @ v) * self.unit_gram.shape[0] / float(torch.trace(self.unit_gram))

    def logit_lens(self, delta_rows: Tensor, base_rows: Tensor) -> float:
        """Mean over prompts of the first-order change of logit(yes) − logit(no) if the final norm
        read the residual here: ``rᵀ J(h_i) Δh_i`` with r = the readout direction and J the final
        norm's Jacobian at h_i, ``diag(γ)(I/ρ − h hᵀ/(d ρ³))``, ρ = √(mean(h²) + eps) (γ is in r)."""
        h, dh = base_rows.double(), delta_rows.double()
        d = h.shape[1]
        rho = torch.sqrt(h.pow(2).mean(1) + self.eps)
        r = self.direction  # diag(γ)(u_yes − u_no): the gain of J is folded into r
        first = (dh @ r) / rho
        second = (h @ r) * (h * dh).sum(1) / (d * rho**3)
        return float((first - second).mean())

    def share(self, B: Tensor) -> float:
        """``‖P_B r‖² / ‖r‖²``: the share of the readout direction inside span(B)."""
        r = self.direction
        return float((B.double().T @ r).pow(2).sum() / (r @ r)) if B.shape[1] else 0.0


def readout_rows(readout: Readout, layers: Sequence[int], labels_eval: Tensor, midpoint: Tensor,
                 candidates: Sequence) -> list[dict]:
    """Per scored layer (kind ``layer``): the token energy of the mean label and of the mean clean
    reference (the midpoint of the ±1-steered residuals), the logit lens; per candidate (kind
    ``candidate``): its share of the readout direction, mean over the layers."""
    rows = []
    for layer in layers:
        rows.append({"kind": "layer", "name": str(layer), "layer": layer,
                     "token_energy_label": readout.token_energy(labels_eval[layer].double().mean(0)),
                     "token_energy_clean": readout.token_energy(midpoint[layer].double().mean(0)),
                     "logit_lens": readout.logit_lens(labels_eval[layer], midpoint[layer]),
                     "readout_share": math.nan})
    for c in candidates:
        shares = [readout.share(c.bases[layer]) for layer in layers]
        rows.append({"kind": "candidate", "name": c.name, "layer": None, "token_energy_label": math.nan,
                     "token_energy_clean": math.nan, "logit_lens": math.nan,
                     "readout_share": sum(shares) / len(shares)})
    return rows
