"""The sweep: captures -> candidates -> scores -> frames (SPEC §5).

``sweep(model, tokenizer, delta, config)`` works on a loaded model and writes nothing;
``run_sweep(config)`` checks every input it can before the weights load (``preflight.py``),
loads the model and the delta, runs ``sweep`` and publishes the run folder through
``report.write_run`` (``publish.write_folder``: staged, renamed into place).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import compute, linalg, outliers, preflight, publish, report, scoring
from .a_side import ASide, build_a_side_for
from .config import JOINT_PANEL_SIZE, SweepConfig  # noqa: F401 - re-exported: `from subspace_sweep.sweep import SweepConfig`
from .candidates import BEHAVIOUR_DATA, Candidate, build_b_side, merge_layers, ranking_pool
from .causal import BehaviourSet, CausalResult, probe_answer_tokens, run_causal
from .diagnostics import CURVE_KS, Readout, readout_rows, scope_rows, spectra_rows
from .gradients import GradientBases, grad_summary, gradient_bases_for, training_seed
from .capture import capture_labels, count_forward_passes
from .delta import check_keys_and_shapes, unscored_keys, validate_delta, weight_targets, writer_rows  # noqa: F401 - re-exported
from .provenance import sha256_file
from .errors import InputError
from .model import load_model, n_layers_of, state_dict_sha256, write_gains
from .pair import pair_geometry
from .strength import parse_strength
from .weights import residual_rows
from .prompts import ProbeSet, holdout_rows, load_probe_set  # noqa: F401 - holdout_rows: re-exported
from .report import rank_fair_order
from .scoring import TARGETS, WEIGHT_TARGETS, Target


@dataclass
class SweepResult:
    per_layer: pl.DataFrame
    summary: pl.DataFrame
    specific_per_layer: pl.DataFrame
    specific_summary: pl.DataFrame
    candidates: list[Candidate]
    scored_layers: list[int]
    n_eval: int
    n_fit: int
    d_model: int
    timings: dict[str, float] = field(default_factory=dict)
    forward_passes: int = 0
    n_lora_train_topics: int | None = None
    oracle_bases: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # weight oracles, for compare
    a_side_cache: dict[str, str] | None = None  # {dir, key, model_sha256, status} when the A-side went through a cache
    causal: CausalResult | None = None  # the restricted-steering check (``--causal K``)
    scope: pl.DataFrame | None = None  # per layer: weight vs label oracle overlaps (diagnostics.py)
    spectra: pl.DataFrame | None = None  # per layer and target: top-k energy curves, participation ranks
    readout: pl.DataFrame | None = None  # token energy, logit lens per layer; readout share per candidate
    outlier_warning: str | None = None  # concern 14: the conclusion's line when targets sit on a few coordinates
    pair: pl.DataFrame | None = None  # the pair's geometry (pair.tsv) when the delta file stores the midpoint
    outlier_coordinates: list[int] = field(default_factory=list)  # the coordinates the warning names, most met first

    @property
    def leading_view(self) -> str:
        """The view the conclusion, the BLUF and the figures lead with (SPEC §12): the standardized
        one where the concentration warning fires (a few coordinates decide the residual view's
        shares), else the residual one (the seed's)."""
        return leading_view(self.outlier_warning)
    #: the gradient bases (SPEC §13): their examples, what the family variant is built from, why a variant
    #: is empty (``gradients.grad_summary``), and the delta's adapter record it was built for
    gradients: dict | None = None
    adapter: dict | None = None

    def ranking(self, panel: str, view: str = "residual") -> pl.DataFrame:
        """A-side ranking of one panel ("joint" = write+mixed+null, "read"), best first, in the
        residual view (SPEC §5) or the standardized one (``view="standardized"``, concern 14)."""
        names = [c.name for c in ranking_pool(self.candidates, panel)]  # type: ignore[arg-type]
        return rank_rows(self.summary.filter(pl.col("candidate").is_in(names)), view)

    def references(self, view: str = "residual") -> pl.DataFrame:
        return rank_rows(self.summary.filter(pl.col("side") == "B"), view)


#: The columns each ranking view sorts on: (joint gain, the two axes' Stouffer z).
VIEW_COLUMNS = {"residual": ("joint_gain", ("z_act", "z_w_combined")),
                "standardized": ("joint_gain_std", ("z_act_std", "z_w_combined_std"))}


def leading_view(outlier_warning: str | None) -> str:
    """"standardized" where the concentration warning fired (SPEC §6 concern 14, §12), else "residual"."""
    return "standardized" if outlier_warning else "residual"


def steering_centre(config: SweepConfig, centre: Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
    """What the causal check steers around (SPEC §8): the delta file's stored midpoint unless
    ``--causal-centre base`` (auto: wherever the file stores it; midpoint: the preflight required
    it); None: the base model. The stored midpoint is read whatever the centre: the pair's geometry."""
    return None if config.causal_centre == "base" else centre


def causal_candidates(summary: pl.DataFrame, pool: set[str], k: int, lead: str,
                      base_only: set[str] | None = None) -> tuple[list[str], int]:
    """(the joint panel's candidates in the order the causal check takes them, how many it tests):
    the top ``k`` of the leading view, then those of the top ``k`` of the other view not among them
    (SPEC §12: where the views disagree, both views' winners are tested), then, where a basis that
    sees the behaviour's data is among them (SPEC §13: not in ``base_only``, the write/mixed bases
    built from the base model alone), the leading view's best of ``base_only`` (the seed's
    question), then the rest of the leading view's order. The first is the check's winner."""
    rows = summary.filter(pl.col("candidate").is_in(pool))
    first = rank_rows(rows, lead)["candidate"].to_list()
    other = rank_rows(rows, "residual" if lead == "standardized" else "standardized")["candidate"].to_list()
    tested = first[:k] + [n for n in other[:k] if n not in first[:k]]
    if base_only is not None and any(n not in base_only for n in tested):
        best = next((n for n in first if n in base_only), None)
        if best is not None and best not in tested:
            tested.append(best)
    return tested + [n for n in first if n not in tested], len(tested)


def rank_rows(summary: pl.DataFrame, view: str = "residual") -> pl.DataFrame:
    """The ranking order (SPEC §5, rank-fair): joint_gain (of the view), best first; ties to the
    lower rank, then to the higher z (the smaller of the two axes' Stouffer z)."""
    gain, zs = VIEW_COLUMNS[view]
    return rank_fair_order(summary, gain, zs)


# ------------------------------------------------------------------------------- targets


def build_targets(
    labels_eval: Tensor, delta: Mapping[str, Tensor], layers: Sequence[int], holdout: Sequence[int] | None = None,
    gains: Mapping[int, Mapping[str, Tensor]] | None = None,
) -> dict[int, dict[str, Target]]:
    """Per scored layer: the activation target, each present weight target (SPEC §5) and, with a
    topic holdout, the activation target on the held-out EVAL rows only (``act_holdout``)."""
    out: dict[int, dict[str, Target]] = {}
    for layer in layers:
        per: dict[str, Target] = {"act": Target.from_rows(f"act@{layer}", labels_eval[layer])}
        if holdout is not None:
            per["act_holdout"] = Target.from_rows(f"act_holdout@{layer}", labels_eval[layer][list(holdout)])
        per.update(weight_targets(delta, layer, (gains or {}).get(layer)))
        out[layer] = per
    return out


# ------------------------------------------------------------------------------- scoring


def _mc_z(target: Target, B: Tensor, null: str, n_null: int, seed: int, layer: int) -> float | None:
    """The Monte-Carlo z (``--null mc``), or None when the exact z stands."""
    if null == "exact" or B.shape[1] == 0:
        return None
    return scoring.mc_score_z(target, B, n_null, scoring.stable_seed(seed, layer, target.name, B.shape[1]))


def score_columns(prefix: str, pct: str, t: Target | None, B: Tensor, e: float, *, null: str, n_null: int, seed: int,
                  layer: int) -> dict[str, float]:
    """One basis's per_layer columns on one target, its energy ``e`` known: e, R, z (the exact
    null's, or the Monte-Carlo one's with ``--null mc``), pct_oracle and gain; NaN where the layer
    has no such target."""
    names = (f"e_{prefix}", f"R_{prefix}", f"z_{prefix}", f"pct_oracle_{pct}", f"gain_{prefix}")
    if t is None:
        return dict.fromkeys(names, math.nan)
    s = scoring.score_energy(t, int(B.shape[1]), e)
    z = _mc_z(t, B, null, n_null, seed, layer)
    return dict(zip(names, (s.energy, s.concentration, s.z if z is None else z, s.pct_oracle, s.gain)))


def score_layer(
    candidates: Sequence[Candidate],
    layer: int,
    targets: Mapping[str, Target],
    oracles: Mapping[str, Tensor],
    slice_null: scoring.RestrictedNull | None,
    *,
    null: str,
    n_null: int,
    seed: int,
) -> list[dict[str, float | int | str]]:
    """The per_layer rows of every candidate at one layer: each target's energy, R, z,
    pct_oracle and cos with the oracle. Energies of all candidates come from one product per target."""
    bases = [c.bases[layer] for c in candidates]
    names = [*TARGETS, "act_holdout"] if "act_holdout" in targets else list(TARGETS)
    energies = {name: scoring.energies(targets[name], bases) for name in names if name in targets}
    rows = []
    for i, (candidate, B) in enumerate(zip(candidates, bases)):
        r = int(B.shape[1])
        row: dict[str, float | int | str] = {
            "layer": layer,
            "candidate": candidate.name,
            "family": candidate.family,
            "axis_kind": candidate.axis_kind,
            "sees": candidate.sees,
            "side": candidate.side,
            "rank": r,
            "expected_rank": candidate.declared_rank(layer),
        }
        for name in names:
            prefix = name if name.startswith("act") else f"w_{name}"
            row.update(score_columns(prefix, name, targets.get(name), B,
                                     float(energies[name][i]) if name in energies else math.nan,
                                     null=null, n_null=n_null, seed=seed, layer=layer))
            if name not in TARGETS:
                continue
            cos = linalg.principal_cosines(B, oracles[name]) if name in oracles else torch.zeros(0)
            row[f"cos_oracle_{name}_mean"] = float(cos.mean()) if cos.numel() else math.nan
            row[f"cos_oracle_{name}_min"] = float(cos.min()) if cos.numel() else math.nan
        row["z_slice_w_combined"] = slice_null.z_of(r, float(energies["combined"][i])) if slice_null is not None else math.nan
        diag = candidate.diagnostics.get(layer, {})
        row["bisector_cos_mean"] = float(diag.get("cos_mean", math.nan))
        row["bisector_cos_min"] = float(diag.get("cos_min", math.nan))
        rows.append(row)
    return rows


#: The standardized view's per_layer columns take these suffixes (concern 14).
STD_TARGETS = {"act": "act_std", "combined": "w_combined_std"}


def score_standardized(candidates: Sequence[Candidate], layer: int, targets: Mapping[str, Target],
                       view: outliers.StandardizedView, config: SweepConfig) -> list[dict[str, float]]:
    """Per candidate, its scores in the standardized coordinates (``outliers.py``): e, R, z,
    pct_oracle and gain of the standardized activation and combined weight targets, every
    formula of SPEC §5 unchanged (the exact null and the Ky Fan oracle of the standardized space)."""
    bases = [view.basis(c.bases[layer], outliers.transform_of(c.family)) for c in candidates]
    rows: list[dict[str, float]] = [{} for _ in candidates]
    for name, suffix in STD_TARGETS.items():
        t = targets.get(name)
        energies = scoring.energies(t, bases) if t is not None else None
        for i, B in enumerate(bases):
            rows[i].update(score_columns(suffix, suffix.removeprefix("w_"), t, B,
                                         float(energies[i]) if energies is not None else math.nan,
                                         null=config.null, n_null=config.n_null, seed=config.seed, layer=layer))
    return rows


def prepare_spectra(targets: Mapping[int, Mapping[str, Target]], k: int) -> dict[int, int]:
    """Compute each target's top-k spectrum and the combined targets' full eigenvalues (cached on
    the targets) and return, per layer with a combined target, the dimension of the LoRA slice:
    the writers' column space, which is the range of the combined Gram (its numerical rank at
    the delta's storage precision). Runs as independent jobs (``compute.run_jobs``), one per
    target: inside ``scoring.shared_reductions`` the combined target's two requests share one
    reduction, which two jobs would wait for each other on."""

    def job(t: Target, name: str) -> None:
        t.spectrum(k)
        if name == "combined":
            t.eigenvalues()

    compute.run_jobs({(layer, name): functools.partial(job, t, name)
                      for layer, per in targets.items() for name, t in per.items()})
    return {layer: per["combined"].numerical_rank() for layer, per in targets.items() if "combined" in per}


def score_layers(
    candidates: Sequence[Candidate], targets: Mapping[int, Mapping[str, Target]], slice_dims: Mapping[int, int],
    config: SweepConfig,
) -> tuple[list[dict[str, float | int | str]], dict[int, dict[str, Tensor]]]:
    """Every candidate's per_layer rows at every layer of ``targets`` (after ``prepare_spectra``),
    and the weight targets' oracle bases per layer."""
    rows: list[dict[str, float | int | str]] = []
    weight_oracles: dict[int, dict[str, Tensor]] = {}
    for layer, per in targets.items():
        oracles = {name: per[name].oracle_basis(config.r) for name in TARGETS if name in per}
        weight_oracles[layer] = {n: b for n, b in oracles.items() if n in WEIGHT_TARGETS}
        comb = per.get("combined")
        slice_null = scoring.RestrictedNull.top_eigenspace(comb, slice_dims[layer]) if comb is not None else None
        rows += score_layer(candidates, layer, per, oracles, slice_null,
                            null=config.null, n_null=config.n_null, seed=config.seed)
    return rows, weight_oracles


@dataclass(frozen=True)
class Specificity:
    """Activation scoring after removing the clean PCs C (SPEC §5): label rows and candidates are
    projected away from C and scored inside the complement of C (dimension D = d - rank C).

    The projected label lives in the complement, so its null there needs only D and its spectrum
    (``RestrictedNull.top_eigenspace``); energies are taken in ambient coordinates.
    """

    clean_pcs: Tensor
    target: Target | None  # None when the label lies entirely inside C
    null: scoring.RestrictedNull | None

    @classmethod
    def at_layer(cls, label_rows: Tensor, clean_pcs: Tensor, layer: int) -> Specificity:
        try:
            target = Target.from_rows(f"specific@{layer}", linalg.project_out(clean_pcs, label_rows.T).T)
        except InputError:
            return cls(clean_pcs, None, None)
        # clean_pcs is a candidate basis: orthonormal, so its width is rank C
        return cls(clean_pcs, target, scoring.RestrictedNull.top_eigenspace(target, target.d - clean_pcs.shape[1]))

    def rows(self, candidates: Sequence[Candidate], layer: int) -> list[dict]:
        projected = [linalg.project_away(c.bases[layer], self.clean_pcs) for c in candidates]
        energies = scoring.energies(self.target, projected) if self.target is not None else None
        out = []
        for i, (c, B) in enumerate(zip(candidates, projected)):
            r = int(B.shape[1])
            row = {"layer": layer, "candidate": c.name, "family": c.family, "axis_kind": c.axis_kind, "sees": c.sees,
                   "side": c.side, "specific_rank": r,
                   "specific_e_act": math.nan, "specific_R_act": math.nan, "specific_z_act": math.nan}
            if energies is not None and r > 0:
                e = float(energies[i])
                row.update(specific_e_act=e, specific_R_act=e / (r / self.null.dim), specific_z_act=self.null.z_of(r, e))
            out.append(row)
        return out


# ------------------------------------------------------------------------------- summaries

MEAN_COLS = [
    "rank", "e_act", "R_act", "gain_act", "pct_oracle_act",
    *[f"{k}_w_{t}" for t in WEIGHT_TARGETS for k in ("e", "R", "gain")],
    *[f"pct_oracle_{t}" for t in WEIGHT_TARGETS],
    *[f"cos_oracle_{t}_{m}" for t in TARGETS for m in ("mean", "min")],
    "bisector_cos_mean", "bisector_cos_min",
]
#: Summary z columns: Stouffer's Σ_l z_l / √L over the L scored layers (layers are not
#: independent, so it is a screening figure, not a p-value).
STOUFFER_COLS = ["z_act", *[f"z_w_{t}" for t in WEIGHT_TARGETS], "z_slice_w_combined"]
HOLDOUT_COLS = ["e_act_holdout", "R_act_holdout", "gain_act_holdout", "pct_oracle_act_holdout"]
#: The standardized view's columns (every sweep has them; weight-only scoring in tests does not).
STD_MEAN_COLS = [*[f"{k}_{suffix}" for suffix in STD_TARGETS.values() for k in ("e", "R", "gain")],
                 *[f"pct_oracle_{suffix.removeprefix('w_')}" for suffix in STD_TARGETS.values()]]
STD_STOUFFER_COLS = [f"z_{suffix}" for suffix in STD_TARGETS.values()]


def _joint_gain(act: str, w: str) -> pl.Expr:
    """√(max(gain_act, 0)·max(gain_w, 0)), NaN where either gain is NaN."""
    clip = lambda c: pl.when(pl.col(c) < 0).then(0.0).otherwise(pl.col(c))  # noqa: E731 (NaN stays NaN)
    return (clip(act) * clip(w)).sqrt()


def summarise(per_layer: pl.DataFrame) -> pl.DataFrame:
    """Mean over scored layers of every energy, R, gain and pct column, Stouffer's z over layers
    (NaN-aware: a NaN layer makes the summary NaN, never silently dropped), and the joint scores."""
    optional = [c for c in (*HOLDOUT_COLS, *STD_MEAN_COLS) if c in per_layer.columns]
    stouffer = [c for c in (*STOUFFER_COLS, "z_act_holdout", *STD_STOUFFER_COLS) if c in per_layer.columns]
    out = per_layer.group_by("candidate", maintain_order=True).agg(
        pl.col("family").first(), pl.col("axis_kind").first(), pl.col("sees").first(), pl.col("side").first(),
        pl.col("expected_rank").max(),
        *[pl.col(c).cast(pl.Float64).mean().alias(c) for c in (*MEAN_COLS, *optional)],
        *[(pl.col(c).cast(pl.Float64).sum() / pl.len().sqrt()).alias(c) for c in stouffer],
    ).with_columns(
        joint=(pl.col("R_act") * pl.col("R_w_combined")).sqrt(),
        joint_gain=_joint_gain("gain_act", "gain_w_combined"),
        act_w_gap_log2=(pl.col("R_act") / pl.col("R_w_combined")).log(2),
    )
    if "gain_act_std" in out.columns:
        out = out.with_columns(joint_gain_std=_joint_gain("gain_act_std", "gain_w_combined_std"))
    if "R_act_holdout" in out.columns:
        out = out.with_columns(joint_holdout=(pl.col("R_act_holdout") * pl.col("R_w_combined")).sqrt(),
                               joint_gain_holdout=_joint_gain("gain_act_holdout", "gain_w_combined"))
    return out


def with_bootstrap(summary: pl.DataFrame, prompt_R: Mapping[str, Tensor], config: SweepConfig) -> pl.DataFrame:
    """Add percentile intervals of R_act and joint over bootstrap resamples of the EVAL prompts.

    ``prompt_R[name]`` is R_act per EVAL prompt (mean over scored layers), so R_act is its mean;
    R_w does not depend on the prompts, so joint's interval is √(interval of R_act · R_w).
    """
    names = summary["candidate"].to_list()
    values = torch.stack([prompt_R[n] for n in names])
    lo, hi = scoring.bootstrap_mean_ci(values, config.n_boot, config.seed, config.ci_level)
    return summary.with_columns(
        R_act_lo=pl.Series(lo.numpy()), R_act_hi=pl.Series(hi.numpy()),
    ).with_columns(
        joint_lo=(pl.col("R_act_lo") * pl.col("R_w_combined")).sqrt(),
        joint_hi=(pl.col("R_act_hi") * pl.col("R_w_combined")).sqrt(),
    )


def summarise_specific(specific: pl.DataFrame) -> pl.DataFrame:
    return specific.group_by("candidate", maintain_order=True).agg(
        pl.col("family").first(), pl.col("axis_kind").first(), pl.col("sees").first(), pl.col("side").first(),
        *[pl.col(c).cast(pl.Float64).mean() for c in ("specific_rank", "specific_e_act", "specific_R_act", "specific_z_act")],
    )


# ------------------------------------------------------------------------------- the sweep


def prompt_concentrations(candidate: Candidate, labels_eval: Tensor, layers: Sequence[int], d: int) -> Tensor:
    """R_act per EVAL prompt, mean over the scored layers: R_act is the mean of this vector."""
    per_layer = []
    for layer in layers:
        B = candidate.bases[layer]
        if B.shape[1] == 0:
            return torch.full((labels_eval.shape[1],), math.nan, dtype=torch.float64)
        per_layer.append(scoring.row_fractions(labels_eval[layer], B) * (d / B.shape[1]))
    return torch.stack(per_layer).mean(0)


def sweep(
    model,
    tokenizer,
    delta: Mapping[str, Tensor],
    config: SweepConfig,
    probes: ProbeSet | None = None,
    a_side: ASide | None = None,
    centre: Mapping[str, Tensor] | None = None,
    gradients: GradientBases | None = None,
    adapter: Mapping | None = None,
) -> SweepResult:
    """Run captures, candidates and scores on a loaded model and a validated delta.

    ``a_side`` (from ``build_a_side_for`` on the same model, prompts and config) skips the
    A-side captures and candidate building; ``gradients`` (``gradients.gradient_bases_for``, the
    same) the gradient bases' passes. ``adapter``: the delta's adapter record
    (``delta.load_adapter_record``), from which the family variant of the gradient bases is built
    (SPEC §13; None: that variant is empty). ``centre``: the pair's midpoint offset, which
    the causal check steers around unless ``config.causal_centre == "base"`` (``delta.load_centre``;
    None: around the base model); whenever given, the pair's geometry is computed from it
    (``pair.pair_geometry``).
    """
    config.validate()
    probes = probes or load_probe_set(config.n_fit)
    n_layers = n_layers_of(model)
    d = int(model.config.hidden_size)
    config.validate_for_model(d, n_layers, "the loaded model")
    layers = config.scored_layers(delta, n_layers)
    holdout = holdout_rows(probes, config.topic_holdout) if config.topic_holdout is not None else None
    # the causal check's prompts and answers: a tokenizer without them is refused before any work
    answers = probe_answer_tokens(tokenizer, probes.eval) if config.causal and config.behaviour is None else None
    bset = (BehaviourSet.from_jsonl(config.behaviour, tokenizer) if config.behaviour is not None
            else BehaviourSet.from_probes(tokenizer, probes.eval, answers) if config.causal else None)
    timings: dict[str, float] = {}
    bar = tqdm(total=3, desc="sweep", disable=config.quiet, unit="phase")

    built_a_side = a_side is None or not set(layers) <= set(a_side.layers)
    if built_a_side:
        a_side = build_a_side_for(model, tokenizer, config, layers, probes)
    t0 = time.perf_counter()
    with count_forward_passes(model) as counter:
        labels = capture_labels(model, tokenizer, delta, probes, label=config.label)
    # A-side work reused from an earlier sweep counts 0 here.
    fresh = a_side.forward_passes if built_a_side else 0
    timings["captures"] = time.perf_counter() - t0 + (a_side.capture_seconds if built_a_side else 0.0)
    # The gradient bases (SPEC §13): A-side, an entry of their own in the A-side cache; a forward and a
    # backward pass per loss, shared by the deltas of one run_sweeps; the family variant from this delta's
    # adapter record.
    seed = training_seed(adapter, config.behaviour)
    built_gradients = gradients is None or not set(layers) <= set(gradients.layers) or gradients.seed != seed
    if built_gradients:
        gradients = gradient_bases_for(model, tokenizer, config, layers, probes, seed,
                                       (a_side.cache or {}).get("model_sha256"))
    t0 = time.perf_counter()
    grad_candidates, family_note = gradients.candidates(model, adapter)
    timings["gradients"] = time.perf_counter() - t0 + (gradients.seconds if built_gradients else 0.0)
    fresh += gradients.forward_passes if built_gradients else 0
    bar.update(1)

    # B-side and scoring, one layer at a time: a layer's d x d targets (4 float64 Grams, 134 MB
    # at Qwen3-1.7B shapes) are dropped once its rows are written, so the targets of all layers
    # never coexist (issue 16). Only the combined ones stay, for the causal check.
    gains = {layer: write_gains(model, layer) for layer in layers}
    # every spectrum the B-side and the scores need: top-k for k = the widest basis (pct_oracle
    # is rank-matched)
    a_candidates = [*a_side.candidates, *grad_candidates]
    widest = max([config.r, *(int(B.shape[1]) for c in a_candidates for B in c.bases.values())])
    clean_pcs = next(c for c in a_side.candidates if c.name == "layer_clean_resid_pca")
    b_parts: list[list[Candidate]] = []
    rows: list[dict] = []
    specific: list[dict] = []
    scope: list[dict] = []
    spectra: list[dict] = []
    weight_oracles: dict[int, dict[str, Tensor]] = {}
    combined: dict[int, Target] = {}
    flags: list[outliers.Concentration] = []  # concern 14: targets on a few coordinates, and why
    sources: dict[int, str | None] = {}
    b_side_s = scoring_s = 0.0
    for layer in tqdm(layers, desc="B-side and scoring", disable=config.quiet, leave=False, unit="layer"):
        t0 = time.perf_counter()
        targets = build_targets(labels.eval, delta, [layer], holdout, gains)
        view = outliers.StandardizedView.of(a_side.coordinate_rms[layer])
        std_targets = view.targets(layer, labels.eval[layer], writer_rows(delta, layer, gains[layer]))
        for flag in outliers.concentrated(layer, targets[layer]):
            flags.append(flag)
            for j in flag.coordinates:  # its source at the first flagged layer that shows one
                if sources.get(j) is None:
                    sources[j] = outliers.source_of(j, a_side.coordinate_rms[layer], gains[layer])
        # each weight target is reduced to tridiagonal form once for all its spectra (3 reductions
        # per layer instead of 7, same bits; the standardized combined target's one more), the
        # reductions freed with the layer
        with scoring.shared_reductions([*targets[layer].values(), *std_targets.values()]):
            with compute.policy():
                # the spectra as parallel jobs, and the LoRA slice's dimension (the combined Gram's rank);
                # the standardized targets' top-k at the widest basis once (scoring asks for each rank)
                slice_dims = prepare_spectra(targets, widest)
                compute.run_jobs({name: functools.partial(t.spectrum, widest) for name, t in std_targets.items()})
                b_parts.append(build_b_side(labels, {layer: {n: t for n, t in targets[layer].items() if n in TARGETS}},
                                            r=config.r))
                t1 = time.perf_counter()
                at_layer = [*a_candidates, *b_parts[-1]]
                layer_rows, oracles = score_layers(at_layer, targets, slice_dims, config)
                for row, std in zip(layer_rows, score_standardized(at_layer, layer, std_targets, view, config)):
                    row.update(std)
                rows += layer_rows
                weight_oracles.update(oracles)
                specific += Specificity.at_layer(labels.eval[layer], clean_pcs.bases[layer], layer).rows(at_layer, layer)
            scope += scope_rows([layer], {layer: targets[layer]["combined"]}, labels.eval_cumulative,
                                labels.eval_local, config.r)
            with compute.policy():
                # the spectra diagnostics' curves reach k = 32: those spectra as parallel jobs too
                # (after the scores and the scope, which read the rank-matched top-k above)
                prepare_spectra(targets, max(CURVE_KS))
            spectra += spectra_rows([layer], targets)
        if config.causal:
            combined[layer] = targets[layer]["combined"]
        b_side_s += t1 - t0
        scoring_s += time.perf_counter() - t1
    candidates = [*a_candidates, *merge_layers(b_parts)]
    # candidates = the A-side build (0 when reused) + the targets, their spectra and the B-side
    timings["candidates_b_side"] = b_side_s
    timings["candidates"] = b_side_s + (a_side.build_seconds if built_a_side else 0.0)
    bar.update(1)
    t0 = time.perf_counter()
    per_layer = pl.DataFrame(rows)
    specific_per_layer = pl.DataFrame(specific)
    summary = summarise(per_layer)
    if config.n_boot:
        prompt_R = {c.name: prompt_concentrations(c, labels.eval, layers, d) for c in candidates}
        summary = with_bootstrap(summary, prompt_R, config)
    scope = pl.DataFrame(scope)
    spectra = pl.DataFrame(spectra, infer_schema_length=None)
    readout = None
    try:
        tokens = answers or probe_answer_tokens(tokenizer, probes.eval)
    except InputError as exc:
        warnings.warn(f"no readout diagnostics: {exc}")
    else:
        reader = Readout.of(model, tokens.yes_id, tokens.no_id)
        readout = pl.DataFrame(readout_rows(reader, layers, labels.eval, labels.eval_midpoint, candidates))
    timings["scoring"] = scoring_s + time.perf_counter() - t0  # the per-layer scores and the summaries
    warning = outliers.warning_line(flags, len(layers), d, sources)
    bar.update(1)
    bar.close()
    causal = None
    if config.causal:
        t0 = time.perf_counter()
        by_name = {c.name: c for c in candidates}
        joint_pool = ranking_pool(candidates, "joint")
        base_only = {c.name for c in joint_pool if c.sees != BEHAVIOUR_DATA and c.axis_kind in ("write", "mixed")}
        names, n_tested = causal_candidates(summary, {c.name for c in joint_pool}, config.causal,
                                            leading_view(warning), base_only)
        act_oracles = [(f"oracle_act_{kind}", {layer: Target.from_rows(f"{kind}@{layer}", rows[layer]).oracle_basis(config.r)
                                                for layer in layers})
                       for kind, rows in (("cumulative", labels.eval_cumulative), ("local", labels.eval_local))]
        causal = run_causal(model, tokenizer, delta, bset.texts, [(n, by_name[n].bases) for n in names],
                            combined, k=n_tested,
                            n_null=config.causal_null, seed=config.seed, answers=bset, write_gains=gains,
                            alphas=config.causal_alpha, progress=not config.quiet,
                            centre=steering_centre(config, centre),
                            act_oracles=act_oracles, kl_target=parse_strength(config.causal_strength),
                            n_norm_only=config.causal_null, curve_ranks=config.causal_curve)
        timings["causal"] = time.perf_counter() - t0
    return SweepResult(
        per_layer=per_layer,
        summary=summary,
        specific_per_layer=specific_per_layer,
        specific_summary=summarise_specific(specific_per_layer),
        candidates=candidates,
        scored_layers=layers,
        n_eval=len(probes.eval),
        n_fit=len(probes.fit),
        d_model=d,
        timings=timings,
        forward_passes=counter.n + fresh + (causal.forward_passes if causal is not None else 0),
        n_lora_train_topics=probes.n_lora_train_topics,
        oracle_bases=weight_oracles,
        a_side_cache=a_side.cache,
        causal=causal,
        scope=scope,
        spectra=spectra,
        readout=readout,
        outlier_warning=warning,
        outlier_coordinates=outliers.met_most(flags),
        pair=pair_geometry(delta, centre) if centre is not None else None,
        gradients=grad_summary(gradients, family_note),
        adapter=dict(adapter) if adapter is not None else None,
    )


def model_manifest(model, config: SweepConfig, result: SweepResult | None = None) -> dict[str, object]:
    """Provenance of the model; the weights' sha256 is taken from ``result`` when its A-side cache
    key already hashed them (1.2 s at Qwen3-0.6B size)."""
    from .gguf_models import convert, is_gguf_source

    path = Path(str(config.model)).expanduser()
    known = (result.a_side_cache or {}).get("model_sha256") if result is not None else None
    # A GGUF source: its file's sha256 and quantisation, and the converted folder that was loaded
    # (its verified cache entry: the load converted it already).
    source = convert(config.model).provenance() if is_gguf_source(config.model) else None
    folder = Path(source["converted_folder"]) if source else path.resolve() if path.is_dir() else None
    return {
        "model": str(path.resolve()) if path.is_dir() or path.suffix.lower() == ".gguf" else str(config.model),
        "model_path": str(folder) if folder is not None else None,
        "model_source": source,
        "model_revision": getattr(model.config, "_commit_hash", None),
        "model_sha256": known or state_dict_sha256(model),  # what compare checks: same weights, whatever the path
        "model_dtype": str(next(model.parameters()).dtype),
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
    }


#: ‖w‖_F/‖θ‖_F over the parameters a delta changes, outside of which it is not LoRA-sized: a
#: LoRA step changes a few percent of the weights (the demo plants 0.2 of each writer); at 1 the
#: delta is as large as the weights themselves, below 1e-6 it is float32 rounding noise.
LORA_RATIO_RANGE = (1e-6, 1.0)


def delta_weight_ratio(delta: Mapping[str, Tensor], model) -> float:
    """‖w‖_F/‖θ‖_F over the parameters the delta changes (keys checked by ``validate_delta``)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    w2 = sum(float(v.detach().double().square().sum()) for v in delta.values())
    theta2 = sum(float(params[k].detach().double().square().sum()) for k in delta)
    return math.sqrt(w2 / theta2) if theta2 > 0 else math.inf


def run_sweep(config: SweepConfig) -> SweepResult:
    """Load, validate, sweep and (when ``config.out`` is set) publish the run folder.

    Every input check runs before the first forward pass, and nothing is written on bad input.
    """
    if config.delta is None:
        raise InputError("a delta is required (--delta PATH)")
    return run_sweeps(config, [config.delta])[0]


def run_sweeps(config: SweepConfig, deltas: Sequence[str], *, snapshot: publish.Snapshot | None = None,
               ) -> list[SweepResult]:
    """One sweep per delta on the same model and prompts, the A-side built once.

    With one delta, ``config.out`` is its run folder; with several, ``config.out`` holds one run
    folder per delta (named by the file's stem), published together (``publish.write_folder``).
    ``snapshot``: what a caller's ``publish.check_destination`` of ``config.out`` saw when it
    started (the demo checks before it builds its model), else it is taken here.
    """
    # Everything that needs no weights, in one place (what a killed run left is cleaned first).
    checked = preflight.check_run(config, deltas, snapshot)
    probes, snapshot, names, loaded, centres = (checked.probes, checked.snapshot, checked.names, checked.deltas,
                                                checked.centres)
    adapters = checked.adapters
    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    load_s = time.perf_counter() - t0
    if config.causal:  # a tokenizer that cannot tell the answers apart: before any forward pass
        BehaviourSet.from_jsonl(config.behaviour, tokenizer) if config.behaviour else probe_answer_tokens(tokenizer, probes.eval)
    ratios = []
    for path, delta, centre in zip(deltas, loaded, centres):
        validate_delta(delta, model)
        if centre is not None:
            check_keys_and_shapes(centre, model)
        ratios.append(delta_weight_ratio(delta, model))
        if not LORA_RATIO_RANGE[0] <= ratios[-1] <= LORA_RATIO_RANGE[1]:
            warnings.warn(f"delta {path}: ‖w‖/‖θ‖ = {ratios[-1]:.3g} over the weights it changes, far outside what a "
                          f"LoRA does ({LORA_RATIO_RANGE[0]:g}..{LORA_RATIO_RANGE[1]:g}): θ ± w is then no small "
                          "steering step; check the delta's scale", stacklevel=2)
        if unscored := unscored_keys(delta):
            warnings.warn(f"{path}: {len(unscored)} delta tensors are steered with but not scored (the weight score "
                          f"reads the residual writers only), e.g. {unscored[0]}; all are listed in the manifest")
    n_layers = n_layers_of(model)
    union = sorted({layer for delta in loaded for layer in config.scored_layers(delta, n_layers)})
    a_side = build_a_side_for(model, tokenizer, config, union, probes)
    # shared by the deltas of the first one's training seed (the others' are built in their sweep)
    gradients = gradient_bases_for(model, tokenizer, config, union, probes, training_seed(adapters[0], config.behaviour),
                                   (a_side.cache or {}).get("model_sha256"))
    results = []
    for i, delta in enumerate(loaded):
        result = sweep(model, tokenizer, delta, config, probes, a_side=a_side, centre=centres[i], gradients=gradients,
                       adapter=adapters[i])
        # The shared A-side is charged to the first run; the others reuse it.
        result.timings["model_load"] = load_s if i == 0 else 0.0
        result.timings["captures"] += a_side.capture_seconds if i == 0 else 0.0
        result.timings["candidates"] += a_side.build_seconds if i == 0 else 0.0
        result.forward_passes += a_side.forward_passes if i == 0 else 0
        # the gradient bases likewise (their family variant is each delta's own)
        result.timings["gradients"] += gradients.seconds if i == 0 else 0.0
        result.forward_passes += gradients.forward_passes if i == 0 else 0
        results.append(result)
    if config.out is not None:
        t0 = time.perf_counter()
        base = model_manifest(model, config, results[0])
        outs = [snapshot.path] if len(deltas) == 1 else [snapshot.path / name for name in names]
        runs = [(r, replace(config, delta=str(p)),
                 {**base, "delta": str(Path(p).resolve()), "delta_sha256": sha256_file(p), "out": str(o),
                  "delta_weight_norm_ratio": ratio, "a_side_shared_by": names, "a_side_cache": r.a_side_cache,
                  "delta_unscored_keys": unscored_keys(delta), "adapter": r.adapter, "gradient_bases": r.gradients})
                for r, p, o, ratio, delta in zip(results, deltas, outs, ratios, loaded)]
        if len(runs) == 1:
            report.write_run(*runs[0][:2], config.out, runs[0][2], snapshot)
        else:
            publish.write_folder(
                config.out,
                lambda tmp: [report.fill_run(tmp / name, *run) for name, run in zip(names, runs)],
                overwrite=config.overwrite, snapshot=snapshot,
            )
        for r in results:
            r.timings["report"] = time.perf_counter() - t0
    return results
