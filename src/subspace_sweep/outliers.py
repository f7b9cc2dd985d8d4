"""Outlier coordinates (SPEC §6 concern 14, issue 24): how much a handful of residual coordinates
decide the energy shares, and a ranking view they do not decide.

Real residual streams carry a few coordinates of enormous scale (massive activations; norm gains
in the hundreds in front of the residual writers). In residual coordinates the weight target
``diag(γ_post)·ΔW`` and every writer basis then put most of their energy on those few
coordinates, and energy shares stop telling hypotheses apart.

- **Concentration** (``top_coordinates``): the share of a target's energy on its top-8
  coordinates, ``Σ_{top 8 j} G_jj / tr G``. The reference ``8/d`` is the share of any 8 fixed
  coordinates of an isotropic target (G ∝ I); the top 8 of a finite target lie above it (a random
  rank-16 target's top-8 share at d = 576 is 0.03, rank 8 0.04), an outlier-decided one near 1.
- **Standardized coordinates** (``StandardizedView``): each coordinate is measured in units of its
  own typical size in the base model's residual, where that size is above the median's:
  ``σ_j = max(rms_j, median_k rms_k)``, ``rms_j`` the coordinate's RMS over every real token of the
  A-side's persona captures at the layer (``coordinate_rms``; the first and template tokens where
  massive activations sit included). A vector of the residual stream (a writer's output, an
  activation change, a write or activation basis's directions) is read as ``D u`` with
  ``D = diag(1/σ)``; a covector (a reader's row, a read basis's directions) as ``D⁻¹ r``, so that
  what a reader reads of a vector, ``rᵀu = (D⁻¹r)ᵀ(D u)``, is the same number in both coordinates.
  Targets become ``D G D`` (each weight tensor's rows ``D·M``, the activation label's rows ``D·u_i``,
  the combination balanced in the new coordinates), bases ``orth(D B)`` (vectors) or ``orth(D⁻¹ B)``
  (read bases), and every score of SPEC §5 is taken there unchanged: energy, the exact null (a
  subspace uniform on the Grassmannian of the standardized space), z, the Ky Fan oracle and the
  gain. Coordinates at or below the median scale are all divided by the same number, which no
  share sees; where every coordinate has the same scale the view IS the residual view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import linalg
from .scoring import Target

#: How many coordinates the concentration diagnostic counts.
TOP_COORDINATES = 8
#: Above this share of a target's energy on its top-8 coordinates the conclusion warns.
OUTLIER_SHARE = 0.5
#: A coordinate's norm gain or residual scale this many times its layer's median names it as the
#: source (a norm gain, a massive activation) in the warning.
SOURCE_RATIO = 10.0


#: How each family's directions transform (SPEC §5, standardized coordinates): a vector of the
#: residual stream (a writer's output, an activation) as ``D u``; a covector (a reader's row, the
#: unembedding's, the QK form's, which reads the residual on both sides) as ``D⁻¹ r``; the random
#: baseline is drawn uniformly, which is the same law in any orthonormal coordinates, so its own
#: draw is taken as the standardized basis (the null made visible stays the null).
FAMILY_TRANSFORM: dict[str, str] = {
    "W:unembed": "covector",
    "W:read": "covector",
    "W:QK": "covector",
    "baseline": "uniform",
}
TRANSFORMS = ("vector", "covector", "uniform")


def transform_of(family: str) -> str:
    """How a family's basis enters the standardized view (``FAMILY_TRANSFORM``; else a vector)."""
    return FAMILY_TRANSFORM.get(family, "vector")


def coordinate_rms(acts, layers: Sequence[int]) -> dict[int, Tensor]:
    """Per layer, each coordinate's RMS (float64, (d,)) over every real token of the persona±
    token-level captures (padding positions are stored as exact zero rows and left out)."""
    out = {}
    for layer in layers:
        i = acts.token_index(layer)
        rows = []
        for tokens in (acts.tokens_pos[i], acts.tokens_neg[i]):
            X = linalg.as64(tokens.reshape(-1, tokens.shape[-1]))
            rows.append(X[X.abs().amax(dim=1) > 0])
        out[layer] = torch.cat(rows).pow(2).mean(dim=0).sqrt()
    return out


def standard_scales(rms: Tensor) -> Tensor:
    """σ_j = max(rms_j, median_k rms_k) (float64): the units each coordinate is measured in. (A
    residual whose median coordinate is 0 is measured in units of its largest: 1 where all are 0.)"""
    rms = linalg.as64(rms)
    floor = float(rms.median())
    if not floor > 0.0:
        floor = float(rms.max()) if float(rms.max()) > 0.0 else 1.0
    return torch.clamp(rms, min=floor)


def top_coordinates(target: Target, k: int = TOP_COORDINATES) -> tuple[float, list[int]]:
    """(share of tr G on the k largest diagonal entries, their coordinates, largest first; ties
    to the lower index)."""
    diag = torch.diagonal(target.gram)
    order = torch.sort(-diag, stable=True).indices[:k]
    return float(diag[order].sum()) / target.trace, [int(j) for j in order]


@dataclass(frozen=True)
class StandardizedView:
    """The standardized coordinates of one layer (module docstring): ``D = diag(1/σ)``."""

    scales: Tensor  # σ, (d,) float64, all > 0

    @classmethod
    def of(cls, rms: Tensor) -> StandardizedView:
        return cls(standard_scales(rms))

    def vectors(self, rows_or_columns: Tensor, *, columns: bool = True) -> Tensor:
        """D·u for the columns (or rows) of a residual-space array, float64."""
        X = linalg.as64(rows_or_columns)
        return X / (self.scales[:, None] if columns else self.scales[None, :])

    def basis(self, B: Tensor, transform: str) -> Tensor:
        """The orthonormal standardized basis of a residual basis B: of span(D·B) for vectors, of
        span(D⁻¹·B) for covectors, B itself for a uniform draw (``FAMILY_TRANSFORM``); an empty
        basis stays empty. D is invertible, so the rank is B's."""
        if transform not in TRANSFORMS:
            raise ValueError(f"transform {transform!r} is not one of {TRANSFORMS}")
        B = linalg.as64(B)
        if B.shape[1] == 0 or transform == "uniform":
            return B
        return linalg.orthonormalize(B * self.scales[:, None] if transform == "covector" else self.vectors(B))

    def targets(self, layer: int, label_rows: Tensor, writer_rows: Mapping[str, Tensor]) -> dict[str, Target]:
        """The layer's standardized targets: ``act`` of the rows D·u_i (each normalised in the new
        coordinates) and, where the delta writes to the residual, ``combined``: the
        Frobenius-balanced combination of each writer's D·M (``writer_rows``: d x n_in, as
        ``delta.writer_rows`` reads them), each with the noise floor of the dtype M was stored in."""
        out = {"act": Target.from_rows(f"act_std@{layer}", self.vectors(label_rows, columns=False))}
        writers = [Target.from_matrix(f"{name}_std@{layer}", self.vectors(M), stored=M.dtype)
                   for name, M in writer_rows.items()]
        if writers:
            out["combined"] = Target.combine(f"combined_std@{layer}", writers)
        return out


def source_of(coordinate: int, rms: Tensor | None, gains: Mapping[str, Tensor]) -> str | None:
    """Why one coordinate is an outlier, in words, or None: each writer's post-norm gain there and
    the residual's RMS there, against its layer's median, named when ≥ ``SOURCE_RATIO``."""
    why = []
    for writer, g in sorted(gains.items()):
        g = linalg.as64(g).abs()
        ratio = float(g[coordinate]) / max(float(g.median()), 1e-30)
        if ratio >= SOURCE_RATIO:
            why.append(f"{writer}'s post-norm gain {ratio:.0f}x median")
    if rms is not None:
        ratio = float(rms[coordinate]) / max(float(linalg.as64(rms).median()), 1e-30)
        if ratio >= SOURCE_RATIO:
            why.append(f"residual RMS {ratio:.0f}x median (a massive activation)")
    return ", ".join(why) if why else None


@dataclass(frozen=True)
class Concentration:
    """One target at one layer whose top-8 coordinates hold more than ``OUTLIER_SHARE`` of its energy."""

    layer: int
    target: str  # "act" or "combined"
    share: float
    coordinates: list[int]


def concentrated(layer: int, targets: Mapping[str, Target]) -> list[Concentration]:
    """The layer's activation and combined weight targets above ``OUTLIER_SHARE``."""
    out = []
    for name in ("act", "combined"):
        if name in targets:
            share, coords = top_coordinates(targets[name])
            if share > OUTLIER_SHARE:
                out.append(Concentration(layer, name, share, coords))
    return out


def met_most(flags: Sequence[Concentration]) -> list[int]:
    """The coordinates among the flagged targets' top 8 met most often, up to 8 (ties to the lower index)."""
    counts: dict[int, int] = {}
    for f in flags:
        for j in f.coordinates:
            counts[j] = counts.get(j, 0) + 1
    return sorted(counts, key=lambda j: (-counts[j], j))[:TOP_COORDINATES]


def warning_line(flags: Sequence[Concentration], n_layers: int, d: int, sources: Mapping[int, str | None]) -> str | None:
    """The conclusion's one line on outlier coordinates (None when no target is concentrated):
    which targets at how many layers, the largest share against 8/d, the coordinates met most
    often (up to 8, ties to the lower index) and why each is an outlier (``sources``)."""
    if not flags:
        return None
    what = {"act": "activation", "combined": "weight"}
    parts = []
    for name in ("combined", "act"):
        mine = [f for f in flags if f.target == name]
        if mine:
            parts.append(f"the {what[name]} target at {len({f.layer for f in mine})} of {n_layers} scored layers "
                         f"(up to {max(f.share for f in mine):.2f})")
    top = met_most(flags)
    named = [f"{j}: {sources[j]}" for j in top if sources.get(j)]
    rest = [str(j) for j in top if not sources.get(j)]
    unnamed = f"{', '.join(rest)} (no norm gain or residual scale ≥ {SOURCE_RATIO:g}x its median)" if rest else ""
    found = "Coordinates met most often: " + ("; ".join(named) + (f"; also {unnamed}" if rest else "") if named
                                              else unnamed) + "."
    return (f"Outlier coordinates (SPEC §6 concern 14): the top-{TOP_COORDINATES} coordinates hold more than "
            f"{OUTLIER_SHARE:g} of the energy of {' and of '.join(parts)}; an isotropic target's {TOP_COORDINATES} "
            f"coordinates hold {TOP_COORDINATES}/d = {TOP_COORDINATES / d:.4f}. {found} "
            "In residual coordinates these decide the energy shares; the standardized ranking (`joint_gain_std`, "
            "SPEC §5) is the one they do not decide, and it leads this report (the BLUF, the figures and the causal "
            "check's winner; SPEC §12).")
