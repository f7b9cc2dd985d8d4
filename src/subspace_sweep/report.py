"""The run folder (SPEC §7): tables, definitions, conclusion and figures.

It is published through ``publish.write_folder`` (staged beside ``--out``, renamed into place:
a crash leaves no partial output, and an existing folder is replaced only with ``overwrite``
and only if it is a run folder). ``manifest.json`` is written last, so a folder with a manifest
is complete.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from . import html_report, publish
from .causal import COHERENT_SHARE, MIN_ANSWER_MASS, NORM_ONLY_KEEPS
from .figures import save_png_pdf
from .pair import geometry_line
from .strength import KL_QUANTILE, MAX_EVALUATIONS, START_RATIO
from .provenance import package_versions
from .scoring import TARGETS, WEIGHT_TARGETS

PANELS = ("joint", "read", "reference")
SUMMARY_COLS = ["candidate", "family", "axis_kind", "sees", "side", "expected_rank", "rank", "joint_gain", "gain_act",
                *[f"gain_w_{t}" for t in WEIGHT_TARGETS], "R_act", "z_act",
                *[f"{k}_w_{t}" for t in WEIGHT_TARGETS for k in ("R", "z")], "z_slice_w_combined",
                "joint", "act_w_gap_log2",
                # the standardized view (SPEC §5, concern 14): its place in the panel and its scores
                "rank_in_panel_std", "joint_gain_std", "gain_act_std", "gain_w_combined_std", "z_act_std",
                "z_w_combined_std"]
#: Columns that exist only with an option: bootstrap intervals (--n-boot > 0), topic holdout.
OPTIONAL_COLS = ["R_act_lo", "R_act_hi", "joint_lo", "joint_hi", "R_act_holdout", "z_act_holdout",
                 "gain_act_holdout", "pct_oracle_act_holdout", "joint_holdout", "joint_gain_holdout"]
PCT_COLS = ["candidate", "family", "axis_kind", "sees", "side", "rank", "joint_gain", "gain_act", "gain_w_combined",
            "R_act", "R_w_combined", "joint",
            *[f"pct_oracle_{t}" for t in TARGETS], *[f"cos_oracle_{t}_{m}" for t in TARGETS for m in ("mean", "min")],
            "bisector_cos_mean", "bisector_cos_min"]
#: Gains closer than this are ties (SPEC §5): a basis and a larger one containing it reach the
#: same gain up to round-off, and 0.1% of the attainable excess energy is no evidence either way.
GAIN_RESOLUTION = 1e-3


def sort_best_first(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    """Descending by ``column`` with NaN and null last, ties by candidate name: a total order.

    (polars sorts NaN above every number, so NaN is mapped to null first.)
    """
    key = pl.when(pl.col(column).is_nan()).then(None).otherwise(pl.col(column))
    return frame.with_columns(_key=key).sort(["_key", "candidate"], descending=[True, False], nulls_last=True).drop("_key")


def rank_fair_order(frame: pl.DataFrame, gain: str, z: str | tuple[str, ...]) -> pl.DataFrame:
    """Best first by the oracle gain ``gain`` (SPEC §5, rank-fair): gains on a grid of step
    ``GAIN_RESOLUTION`` (closer ones tie), ties to the lower rank, then to the higher z (with
    several z columns: the smallest of them, i.e. the weaker axis), then by name; NaN last."""
    def no_nan(expr: pl.Expr) -> pl.Expr:
        return pl.when(expr.is_nan()).then(None).otherwise(expr)

    zs = (z,) if isinstance(z, str) else tuple(z)
    z_key = pl.min_horizontal([no_nan(pl.col(c).cast(pl.Float64)) for c in zs])
    if len(zs) > 1:  # min_horizontal skips nulls: a NaN on either axis must rank last, not win
        z_key = pl.when(pl.any_horizontal([pl.col(c).is_nan() for c in zs])).then(None).otherwise(z_key)
    return frame.with_columns(
        _gain=no_nan((pl.col(gain) / GAIN_RESOLUTION).round(0)), _z=z_key,
    ).sort(["_gain", "rank", "_z", "candidate"], descending=[True, False, True, False], nulls_last=True).drop("_gain", "_z")



# ------------------------------------------------------------------------------- tables


def ranked_summary(result) -> pl.DataFrame:
    """The summary with ``panel`` and ``rank_in_panel``: joint (A-side write+mixed+null), then
    read (A-side), then the B-side references, each best first."""
    parts = []
    for panel in PANELS:
        frame, std = ((result.references(), result.references("standardized")) if panel == "reference" else
                      (result.ranking(panel), result.ranking(panel, "standardized")))
        std_place = pl.DataFrame({"candidate": std["candidate"], "rank_in_panel_std": range(1, std.height + 1)})
        parts.append(frame.with_columns(panel=pl.lit(panel), rank_in_panel=pl.int_range(1, frame.height + 1))
                     .join(std_place, on="candidate", how="left", maintain_order="left"))
    out = pl.concat(parts)
    missing = set(result.summary["candidate"]) - set(out["candidate"])
    if missing:  # every row must land in exactly one panel
        raise AssertionError(f"candidates in no panel: {sorted(missing)}")
    return out


def _tsv(frame: pl.DataFrame, path: Path) -> None:
    frame.write_csv(path, separator="\t", float_precision=6)


def _csv(frame: pl.DataFrame, path: Path) -> None:
    frame.write_csv(path, float_precision=6)




def gradient_definitions(gradients: Mapping[str, object] | None) -> list[str]:
    """definitions.md's section on the gradient bases of this run (SPEC §13)."""
    if gradients is None:
        return []
    not_built = gradients.get("not_built") or {}
    lines = [
        "",
        "## Gradient bases (`grad_*`, SPEC §13)",
        "",
        "They answer \"does the base model, asked about the behaviour, predict the delta?\", not \"do its weights "
        "and activations alone\": each sees the behaviour's training examples (except `grad_neutral`, which sees "
        "the prompts without answers) but never the trained pair. G_T = ∂L/∂W_T of each residual writer's weight "
        "at the base model (one forward and one backward pass per loss, no training); the basis is the top-r "
        "eigenvectors of the combined target Σ_T G_T G_Tᵀ/‖G_T‖²_F (post-norm gains folded in as for the delta). "
        "One plain SGD step of a full-weight fine-tune from the base gives w = η(∇L⁻ − ∇L⁺) exactly; a LoRA's "
        "first step gives η s²(∇L⁻ − ∇L⁺)·AᵀA, inside that gradient's column span.",
        f"Examples: {gradients.get('source') or 'none'}. Family variant: {gradients.get('family_variant')}. "
        # (the passes they took when built: a cached rerun writes the same definitions; its manifest says "hit")
        f"Cost: {gradients.get('passes_to_build')} forward and backward passes.",
    ]
    if not_built:
        lines.append("Empty here: " + "; ".join(f"`{k}`: {v}" for k, v in not_built.items()) + ".")
    return lines


def definitions_markdown(candidates, causal=None, pair=None, gradients=None) -> str:
    lines = [
        "# Candidate definitions",
        "",
        "A-side candidates never see the trained pair: the LoRA delta is used only to score them. The seed's",
        "43 are built from the base model's weights and its activations on the shipped prompts; the gradient",
        "bases (`grad_*`, SPEC §13) also see the behaviour's training examples. B-side rows are references",
        "built from the LoRA and are never ranked as hypotheses. `axis_kind` is derived from `family` by one",
        "table; `sees` says what a candidate is built from: `weights`, `activations`, `weights+activations` (of",
        "the base model), `behaviour data` (the behaviour's training examples, prompts with the adapters'",
        "answers), `nothing` (the random baseline), `trained pair` (B-side).",
        "",
        "**Coordinates.** Every basis lives in the residual stream itself. A block reads",
        "`n(x) = γ ⊙ x / rms(x)`; the per-token `1/rms(x)` drops out of every subspace, the gain `γ` does",
        "not, so each reader is taken as the module sees the residual: `W·diag(γ)`, with `γ_attn` (the",
        "attention norm) for W_q, W_k, W_v, `γ_mlp` (the norm before the MLP) for W_gate, W_up, and the final",
        "norm's gain for the unembedding `lm`; the QK circuit also carries q_norm/k_norm's `γ_q ⊙ γ_k`.",
        "Each gain is read from its norm module's own forward pass (what it multiplies `x/rms(x)` by).",
        "o_proj and down_proj write into the residual directly (no gain on the write side) in Llama, Mistral,",
        "Qwen2/3 and Phi-3. Behind a post-projection norm (Gemma2/3, OLMo2) a writer's output is",
        "`γ_post ⊙ n(W z)`: its write space is `diag(γ_post)·col(W)`, and the weight target of a delta there",
        "is `diag(γ_post)·ΔW` to first order (the norm's own rescaling, along each token's output, is left",
        "out). A writer's bias delta Δb is one more column of its weight target, `[ΔW ‖ Δb]` (what it adds",
        "for an input z is `[ΔW ‖ Δb]·[z; 1]`). Fused projections (Phi-3's qkv_proj and gate_up_proj) are",
        "split by their documented row layout ([q; k; v], [gate; up]).",
        "Captured activations (block outputs, the MLP's normed inputs, the sink token's normed residual)",
        "are used as the model computes them.",
        "",
        "**Positions** (which token each quantity reads). The R_act label (α = +1 minus α = −1 block outputs;",
        "also label_fit, the scope diagnostic's two labels and the readout's label directions) and the clean",
        "captures: the last token of the raw probe text, no chat template (the seed's convention, kept so that",
        "R_act stays comparable with the seed's numbers: the label is the change the LoRA makes to the",
        "representation of the probe text itself). The persona captures: the last token of the chat-formatted",
        "prompt (system = the persona, user = the probe) after the template's generation prompt, where the",
        "assistant's answer starts. The causal check's behaviour b and its answer mass: the last token of each",
        "EVAL prompt asked as the user turn of the chat template (no system prompt of ours; a template that",
        "inserts a default one keeps it) after the generation prompt, where the model produces its answer's",
        "first token (raw text only for a tokenizer without a chat template). On a chat model the raw probe's",
        "last token is where the model ends its turn: SmolLM2-135M-Instruct gives the two answers a probability",
        "of 1e-5 there against 0.45 after the generation prompt (SPEC §6, concern 13).",
        "",
        "**Scores and ranking.** For a basis of effective rank r: energy e (share of the target inside",
        "its span), R = e/(r/d), exact-null z, pct_oracle = 100·e/e_max(r) and the oracle gain",
        "(e − r/d)/(e_max(r) − r/d) (0 for a random subspace of any rank, 1 for the Ky Fan oracle of",
        "rank r). Rankings sort by joint_gain = √(max(gain_act, 0)·max(gain_w_combined, 0)) (means over",
        f"the scored layers), gains within {GAIN_RESOLUTION:g} tie, then the lower rank and the higher z win.",
        "Summary z is Stouffer's Σ_l z_l/√L. Numerical ranks of weight targets count eigenvalues above",
        "the rounding floor u²·tr(M Mᵀ) of the format the delta was stored in.",
        "",
        "| name | side | family | axis_kind | sees | expected rank | definition |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in candidates:
        note = f" ({c.rank_note})" if c.rank_note else ""
        lines.append(f"| `{c.name}` | {c.side} | {c.family} | {c.axis_kind} | {c.sees} | {c.expected_rank} | "
                     f"{c.definition}{note} |")
    lines += gradient_definitions(gradients)
    lines += [
        "",
        "## Scope (`scope.tsv`) and spectra (`spectra.tsv`)",
        "",
        "scope.tsv, per scored layer: `overlap_A_B = ‖AᵀB‖²_F / min(rank A, rank B)` between the combined "
        "weight oracle (w), the oracle of the cumulative label (the block output's change) and of the "
        "block-local label (the change of output − input); `null_A_B` its exact mean over random subspaces "
        "of those ranks (r_A·r_B/(d·min)), `z_A_B` against the exact null SD; `norm_ratio_local_cumulative` "
        "the mean over EVAL prompts of ‖local row‖/‖cumulative row‖. At the first steered layer the two "
        "labels are equal.",
        "spectra.tsv, per scored layer and target: `energy` = the top-k Ky Fan sum / trace for k = 1..32, "
        "`participation_rank` = (Σλ)²/Σλ² (k for a target isotropic on k dimensions); target "
        "`w_combined_in_act_topk`: the combined weight energy inside the top-k activation oracle; targets "
        "`<target>_top8_coordinates` (k = 8): the concentration, the share of the target's energy on its 8 largest "
        "residual coordinates, Σ_{top 8 j} G_jj / tr G, which coordinates in `coordinates` (largest first). 8 fixed "
        "coordinates of an isotropic target hold 8/d; the top 8 of a generic low-rank target a little more (0.03 "
        "for rank 16 at d = 576); above 0.5 a few outlier coordinates (a norm gain in the hundreds, a massive "
        "activation) decide the energy shares, and the conclusion says so.",
        "",
        "## The standardized view (columns `*_std`, SPEC §5 and §6 concern 14)",
        "",
        "Every residual coordinate j is measured in units of its own scale in the base model, σ_j = max(rms_j, "
        "median_k rms_k), rms_j its RMS over every real token of the persona± FIT captures at the layer. With D = "
        "diag(1/σ): vectors of the residual stream (activation changes, writers' outputs, write and activation "
        "bases) become D·u, covectors (readers' rows: the read and unembedding families, the QK form) D⁻¹·r, so "
        "that what a reader reads of a vector is unchanged; the random baseline is its own draw (uniform in any "
        "orthonormal coordinates). The activation target is built from the rows D·u_i, the combined weight target "
        "from each writer's D·diag(γ)·ΔW (balanced as in the residual view), each basis is orthonormalised after "
        "the map, and every score of SPEC §5 is taken there unchanged: e, R, the exact null (a uniformly random "
        "subspace of the standardized space) and its z, the Ky Fan oracle, pct_oracle and gain; joint_gain_std = "
        "√(max(gain_act_std, 0)·max(gain_w_combined_std, 0)) and `rank_in_panel_std` its rank-fair place. "
        "Coordinates at or below the median scale are all divided by the same number, which no share sees; where "
        "every coordinate has the same scale the view IS the residual view. The residual view stays the default "
        "ranking (the one the seed's numbers compare with).",
        "readout.tsv (Û = the unembedding·diag(γ_final) with unit rows, V of them; r = diag(γ_final)·(u_Yes − "
        "u_No), the answer tokens of the causal check): per layer `token_energy_label` = (d/V)·‖Û v̂‖² of the "
        "mean EVAL label (exactly 1 in expectation for a uniformly random direction; this is the plain "
        "unit-row variant, not Wendler et al.'s), `token_energy_clean` the same for the mean unsteered "
        "residual (the midpoint of the ±1-steered ones), `logit_lens` = mean over prompts of rᵀJ(h)Δh, the "
        "first-order change of logit(Yes) − logit(No) if the final norm (Jacobian J at h) read the residual "
        "there (before any final logit softcap); per candidate `readout_share` = ‖P_B r‖²/‖r‖², mean over "
        "the scored layers.",
    ]
    if causal is not None:
        lines += [
            "",
            "## Causal check (`causal.tsv`)",
            "",
            f"Behaviour metric on {causal.answers.source} ({len(causal.answers.texts)} prompts): "
            f"{causal.answers.description} Effect E(w) = mean over the prompts of "
            "b(+α) − b(−α) under weight steering W ← W + α·w (around the pair's midpoint θ + (Δ⁺ + Δ⁻)/2 "
            "with ±α·w/2 instead where the delta holds the midpoint (`--causal-centre auto`, the default, or `midpoint`): α = 1 is then the two trained models; "
            f"this run: {causal.centre}); `effect_plus` / `effect_minus` are "
            "b(+α) − b(0) and b(−α) − b(0) (the unsteered model: row `alpha_0`), `mass_plus` / `mass_minus` "
            "the mean probability of the two answers' first tokens (coherence). The strength with `--causal-strength "
            f"grid`: rows `strength` read the whole delta at every α of the grid ({', '.join(f'{a:g}' for a in causal.alphas)}); "
            f"every other row is read at the largest α whose mass under +α and −α both stay ≥ {COHERENT_SHARE:g} × max(mass at "
            f"α = 0, {MIN_ANSWER_MASS:g}) (the smallest when none does"
            + (f"; this run: α = {causal.alpha:g}, {'coherent' if causal.coherent else 'none of the grid coherent'}"
               if causal.kl_target is None else "; not this run's rule, see below") +
            "); column `alpha`. Rows `act_oracle`: the oracles of "
            "the cumulative and block-local labels (rank r) as restricted subspaces, curves included. w_writes = the residual writers (o_proj, "
            "down_proj) of w at the scored layers; w_B = each writer's ΔW replaced by P_B·ΔW (B the layer's basis), "
            "everything else dropped; the ablation uses (I − P_B)·ΔW. kept = E(w_B)/E(w_writes), ablated = 1 − "
            f"E(w_ablate)/E(w_writes). The null: {causal.n_null} seeded random subspaces of the same per-layer "
            "ranks (z against their mean and sample SD). Curves: the first k directions of the combined weight "
            "oracle (eigen-order) and of the top candidate, trained norm and norm-matched (rescaled to ‖w_writes‖_F).",
            "",
            strength_definition(causal),
        ]
        if causal.n_norm_only:
            lines += ["", f"Rows `norm_only` (the norm-only control, {causal.n_norm_only} draws): w_writes with every tensor "
                          "(each writer's weight and bias) replaced by a standard Gaussian tensor of its shape, seeded by "
                          "(seed, draw, tensor name), rescaled to that tensor's Frobenius norm, read at the same strengths; "
                          f"kept = E/E(w_writes). The verdict calls the subspace question moot when their mean kept is ≥ "
                          f"{NORM_ONLY_KEEPS:g}."]
    if pair is not None:
        lines += [
            "",
            "## The pair's geometry (`pair.tsv`)",
            "",
            "Weight only, from the midpoint the delta file stores beside w (`subspace-sweep delta`): τ± the two "
            "adapters' merged changes, w = τ⁺ − τ⁻, the shared drift M = (τ⁺ + τ⁻)/2 (so τ± = M ± w/2). Per group "
            "of tensors (`scope` all; `module`: by the parameter's module name; `layer`: by decoder layer; a tensor "
            "held by only one of w and M is zero in the other): `w_sq` = ‖w‖², `drift_sq` = ‖M‖², `w_dot_drift` = ⟨w, M⟩ "
            "(float64 sums, which add up over groups), `cos_plus_neg_minus` = cos(τ⁺, −τ⁻) = (‖w‖²/4 − ‖M‖²)/(‖τ⁺‖‖τ⁻‖) "
            "(positive exactly when ‖M‖ < ‖w‖/2), `norm_ratio` = ‖τ⁺‖/‖τ⁻‖, `drift_over_axis` = ‖M‖/‖w‖, "
            "`abs_cos_w_drift` = |cos(w, M)|.",
        ]
    return "\n".join(lines) + "\n"


def strength_definition(causal) -> str:
    """definitions.md's paragraph on the strength rule of this run (grid, or a KL budget)."""
    if causal.kl_target is None:
        return ("Strength rule of this run: `--causal-strength grid` (the coherence grid above; `alpha_minus` = `alpha`).")
    cost = causal.calibration_cost
    return (f"Strength rule of this run: `--causal-strength {causal.strength}` (SPEC §8, issue 30): each arm's α is the "
            f"one at which the {KL_QUANTILE:.0%} quantile, over every generated position of every prompt, of the per-token "
            f"KL(steered ‖ unsteered) (float64) equals {causal.kl_target:g} nat within ±5% (|log(KL/target)| ≤ log 1.05). "
            f"The continuations: {causal.kl_tokens} greedy tokens generated by the steered model from each prompt as b reads "
            "it (KV cache, one left-padded batch), ending at the model's end-of-turn/end-of-text token (that position "
            "counts, later ones do not); the unsteered model (θ + (Δ⁺ + Δ⁻)/2 around the midpoint: the model the arms are "
            "steered from) reads the same tokens. The root finder: bracketing by ×4 from the α where ‖α·w‖ is "
            f"{START_RATIO:g} of the weights it changes, then Illinois regula falsi in (log α, log KL), at most "
            f"{MAX_EVALUATIONS} evaluations per arm, α ≤ {cost.get('bound', math.nan):.4g} (‖α·w‖ = the weights' own norm); "
            "a target not reached there is read at the bound. Rows `calibration` (per arm `plus` / `minus`): `alpha`, "
            "`kl` reached, `evaluations`, `converged`; rows `kl_trace`: every evaluation (α, KL) in order. Every other "
            "steered row is read at +`alpha`·w and −`alpha_minus`·w (the two arms' α). The calibration's cost: "
            f"{int(cost.get('prefill_passes', 0))} full passes over the prompts, {int(cost.get('decode_steps', 0))} "
            f"one-token steps, {cost.get('seconds', math.nan):.1f} s.")


def _fmt(x: float, spec: str = ".2f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def standardized_line(joint: pl.DataFrame, best: Mapping[str, object]) -> str:
    """The BLUF's line on the standardized view (SPEC §5, concern 14): its best write/mixed row
    and where the residual view's best lands in it."""
    order = joint.sort("rank_in_panel_std")
    top = order.row(0, named=True)
    place = order["candidate"].to_list().index(best["candidate"]) + 1
    same = top["candidate"] == best["candidate"]
    return (f"In standardized coordinates (each residual coordinate in units of its own scale in the base model, so "
            f"that a few outlier coordinates do not decide the shares; SPEC §5, concern 14) the best is "
            f"**`{top['candidate']}`**: joint_gain_std = {_fmt(top['joint_gain_std'], '.3f')} (gain_act_std = "
            f"{_fmt(top['gain_act_std'], '.3f')}, gain_w_combined_std = {_fmt(top['gain_w_combined_std'], '.3f')})"
            + (" — the same candidate." if same else
               f"; the residual view's best is at place {place} there (joint_gain_std = {_fmt(best['joint_gain_std'], '.3f')})."))


#: The summary columns of each view's BLUF row (SPEC §12): the residual view's, and the standardized
#: view's under the same names with ``_std`` (``gain_w_combined`` -> ``gain_w_combined_std``, ...).
BLUF_COLS = ("joint_gain", "gain_act", "gain_w_combined", "R_act", "z_act", "R_w_combined", "z_w_combined",
             "pct_oracle_act", "pct_oracle_combined")


def view_col(column: str, view: str) -> str:
    return f"{column}_std" if view == "standardized" else column


def view_order(frame: pl.DataFrame, view: str) -> pl.DataFrame:
    """A panel's rows in the view's ranking order (``ranked_summary``'s rank_in_panel(_std))."""
    return frame.sort("rank_in_panel_std" if view == "standardized" else "rank_in_panel")


def bluf_row(row: Mapping[str, object], view: str, label: str) -> str:
    fmt = {"joint_gain": ".3f", "gain_act": ".3f", "gain_w_combined": ".3f", "z_act": ".1f", "z_w_combined": ".1f",
           "pct_oracle_act": ".1f", "pct_oracle_combined": ".1f"}
    return "| " + " | ".join([label, *(_fmt(row[view_col(c, view)], fmt.get(c, ".2f")) for c in BLUF_COLS)]) + " |"


def coordinates_text(coordinates) -> str:
    return ", ".join(str(j) for j in coordinates) if coordinates else "a few outlier coordinates"


def residual_line(joint: pl.DataFrame, best: Mapping[str, object], coords: str) -> str:
    """The BLUF's line on the residual view where the standardized view leads (SPEC §12): its best
    write/mixed row, marked as decided by the named coordinates, and where the leader lands in it."""
    order = joint.sort("rank_in_panel")
    top = order.row(0, named=True)
    place = order["candidate"].to_list().index(best["candidate"]) + 1
    return (f"In residual coordinates (the seed's view; decided by coordinates {coords}, whose scale dwarfs the "
            f"rest) the best is `{top['candidate']}`: joint_gain = {_fmt(top['joint_gain'], '.3f')} (gain_act = "
            f"{_fmt(top['gain_act'], '.3f')}, gain_w_combined = {_fmt(top['gain_w_combined'], '.3f')}, "
            f"{_fmt(top['pct_oracle_combined'], '.1f')}% of the combined weight oracle)"
            + (" — the same candidate." if top["candidate"] == best["candidate"] else
               f"; the standardized view's best is at place {place} there."))


def causal_views_line(causal, ranked: pl.DataFrame, best: str) -> str:
    """Where the views' winners differ, the causal check tested both (SPEC §12): their kept values."""
    t = causal.table.filter(pl.col("kind") == "candidate")
    joint = ranked.filter(pl.col("panel") == "joint").sort("rank_in_panel")
    residual_best = joint["candidate"][0]
    if residual_best == best:
        return "Both views' best candidate is the same; the check's winner is it."
    row = t.filter(pl.col("name") == residual_best)
    if not row.height:
        return f"The residual view's best, `{residual_best}`, was not tested."
    r = row.row(0, named=True)
    return (f"The residual view's best, `{residual_best}`, tested beside it: kept {_fmt(r['kept'])} (z = "
            f"{_fmt(r['z_kept'], '.1f')} against random subspaces of its rank), ablated {_fmt(r['ablated'])}.")


#: The BLUF table's head (one row per view: ``bluf_row``).
BLUF_HEAD = ["| view | joint_gain | gain_act | gain_w_combined | R_act | z_act (Stouffer) | R_w_combined | z_w_combined "
             "(Stouffer) | % of act oracle | % of combined weight oracle |",
             "|---|---|---|---|---|---|---|---|---|---|"]


def _causal_row(causal, name: str) -> Mapping[str, object] | None:
    if causal is None:
        return None
    rows = causal.table.filter((pl.col("kind") == "candidate") & (pl.col("name") == name))
    return rows.row(0, named=True) if rows.height else None


#: gradients.tsv's columns (SPEC §13): one row per gradient variant and one for the best joint basis
#: that sees no behaviour data (``role``), in joint-ranking order.
GRADIENT_COLS = ["role", "candidate", "family", "sees", "rank_in_panel", "rank", "gain_act", "gain_w_combined",
                 "joint_gain", "gain_act_holdout", "gain_w_combined_std", "joint_gain_std", "R_w_combined",
                 "z_w_combined", "kept", "z_kept", "ablated", "kept_oracle"]


def gradient_table(result, ranked: pl.DataFrame) -> pl.DataFrame:
    """Each gradient variant beside the best write/mixed basis that sees no behaviour data (the seed's
    question), with the causal check's kept/ablated where it tested them and the rank-matched combined
    oracle's kept (``gradients.tsv``: what a study aggregates per model, pair and adapter family)."""
    from .candidates import BEHAVIOUR_DATA

    joint = ranked.filter((pl.col("panel") == "joint") & pl.col("axis_kind").is_in(["write", "mixed"]))
    grad = joint.filter(pl.col("family").str.starts_with("grad:"))
    base = joint.filter(pl.col("sees") != BEHAVIOUR_DATA).head(1)
    causal = getattr(result, "causal", None)
    oracle = (causal.table.filter(pl.col("kind") == "oracle")["kept"].to_list() if causal is not None else [])
    rows = []
    for role, frame in (("gradient", grad), ("best_without_behaviour_data", base)):
        for r in frame.iter_rows(named=True):
            c = _causal_row(causal, r["candidate"])
            rows.append({"role": role, **{k: r.get(k) for k in GRADIENT_COLS if k in r},
                         "kept": c["kept"] if c else None, "z_kept": c["z_kept"] if c else None,
                         "ablated": c["ablated"] if c else None, "kept_oracle": oracle[0] if oracle else None})
    schema = {k: (pl.String if k in ("role", "candidate", "family", "sees") else pl.Int64 if k == "rank_in_panel"
                  else pl.Float64) for k in GRADIENT_COLS}
    return pl.DataFrame([{k: row.get(k) for k in GRADIENT_COLS} for row in rows], schema=schema)


def gradient_section(result, joint: pl.DataFrame, base: Mapping[str, object] | None) -> list[str]:
    """The conclusion's section on the gradient bases (SPEC §13): each variant beside the best basis that
    sees no behaviour data, with the causal check's kept where it tested them, and why a variant is empty."""
    info = getattr(result, "gradients", None)
    grad = joint.filter(pl.col("family").str.starts_with("grad:"))
    if info is None or not grad.height:
        return []
    causal = getattr(result, "causal", None)
    rows = [*grad.iter_rows(named=True), *([base] if base is not None else [])]
    table = ["| candidate | sees | place in the joint ranking | gain_act | gain_w_combined | joint_gain | causal kept "
             "(z vs random) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = _causal_row(causal, r["candidate"])
        kept = f"{_fmt(c['kept'])} (z = {_fmt(c['z_kept'], '.1f')})" if c is not None else "not tested"
        table.append(f"| `{r['candidate']}` | {r['sees']} | {r['rank_in_panel']} | {_fmt(r['gain_act'], '.3f')} | "
                     f"{_fmt(r['gain_w_combined'], '.3f')} | {_fmt(r['joint_gain'], '.3f')} | {kept} |")
    not_built = info.get("not_built") or {}
    mismatch = training_mismatch(getattr(result, "adapter", None), info)
    lines = [
        "## Gradient bases (SPEC §13)",
        "",
        "The base model's own loss gradient at its residual writers, before any training (A-side: they never see "
        "the trained pair; all but `grad_neutral` see the behaviour's training examples). Examples: "
        f"{info.get('source') or 'none'}. Family variant: {info.get('family_variant')}.",
        "",
        *table,
        "",
    ]
    if not_built:
        lines += ["Not built here: " + "; ".join(f"`{k}`: {v}" for k, v in not_built.items()) + ".", ""]
    if mismatch:
        lines += [mismatch, ""]
    return lines


def training_mismatch(adapter: Mapping[str, object] | None, info: Mapping[str, object]) -> str | None:
    """A line when the delta's adapter record says the pair trained on other examples than the
    gradient bases read (another data set, or another number of examples), else None."""
    trained = ((adapter or {}).get("training") or {}).get("pos") or {}
    n, data = trained.get("n_examples"), trained.get("data")
    if n is None and data is None:
        return None
    ours, source = (info.get("n_examples") or {}).get("train"), str(info.get("source") or "")
    shipped = data in (None, "the shipped sycophancy probes")
    if shipped == source.startswith("the shipped") and (n is None or ours is None or n == ours):
        return None
    return (f"Caveat: the pair's record says it trained on {data} ({n} examples), but these bases read {source} "
            f"({ours} training examples): pass the same --behaviour / --n-train as `train` did.")


def conclusion_markdown(result, ranked: pl.DataFrame, config) -> str:
    from .candidates import BEHAVIOUR_DATA

    lead = getattr(result, "leading_view", "residual")
    coords = coordinates_text(getattr(result, "outlier_coordinates", None))
    joint = view_order(ranked.filter((pl.col("panel") == "joint") & pl.col("axis_kind").is_in(["write", "mixed"])), lead)
    read = view_order(ranked.filter(pl.col("panel") == "read"), lead)
    refs = ranked.filter(pl.col("panel") == "reference")
    best = joint.row(0, named=True)
    # the seed's question: bases built from the base model alone (no behaviour data)
    base_only = joint.filter(pl.col("sees") != BEHAVIOUR_DATA)
    base = base_only.row(0, named=True) if base_only.height else None
    g_act, g_w, z_act, z_w = (view_col(c, lead) for c in ("gain_act", "gain_w_combined", "z_act", "z_w_combined"))
    top_act = rank_fair_order(base_only, g_act, z_act).head(5)["candidate"].to_list()
    top_w = rank_fair_order(base_only, g_w, z_w).head(5)["candidate"].to_list()
    overlap = [c for c in top_act if c in top_w]
    significant = (best[z_act] or 0) > 2 and (best[z_w] or 0) > 2
    std = lead == "standardized"

    def view_rows(row: Mapping[str, object]) -> list[str]:
        return ([bluf_row(row, "standardized", "standardized (leads)"),
                 bluf_row(row, "residual", f"residual (decided by coordinates {coords})")] if std else
                [bluf_row(row, "residual", "residual")])

    data_aware = best["sees"] == BEHAVIOUR_DATA
    seed_line = ([] if not data_aware or base is None else [
        f"It sees the behaviour's training examples (a gradient basis, SPEC §13): it answers \"does the base model, "
        "asked about the behaviour, predict the delta?\", not the seed's question. The best write/mixed basis built "
        f"from the base model's weights and activations alone (the seed's question) is **`{base['candidate']}`** "
        f"({base['family']}, sees {base['sees']}, rank {_fmt(base['rank'], '.0f')}, place "
        f"{base[view_col('rank_in_panel', lead)]}):", "", *BLUF_HEAD, *view_rows(base), ""])
    lines = [
        "# Conclusion",
        "",
        "## BLUF",
        "",
        *([f"The standardized view leads this report (SPEC §12): the concentration warning fired (see the caveats), "
           f"so in residual coordinates a few coordinates ({coords}) decide the energy shares; each residual coordinate "
           "is measured here in units of its own scale in the base model. The residual view's numbers stand beside "
           "it, marked.", ""] if std else []),
        f"Best A-side write/mixed candidate by joint oracle gain √(max(gain_act, 0)·max(gain_w_combined, 0))"
        f"{' in the standardized view' if std else ''}: "
        f"**`{best['candidate']}`** ({best['family']}, {best['axis_kind']}, sees {best['sees']}, rank "
        f"{_fmt(best['rank'], '.0f')}), "
        f"mean over {len(result.scored_layers)} scored layers {result.scored_layers[0]}..{result.scored_layers[-1]}:",
        "",
        *BLUF_HEAD,
        *view_rows(best),
        "",
        *seed_line,
        "gain = (e − r/d)/(e_max(r) − r/d) at each basis's own rank r: 0 for a random subspace of any rank, 1 "
        "for the best subspace of that rank (the Ky Fan oracle); ties (within "
        f"{GAIN_RESOLUTION:g}) go to the lower rank, then to the higher z. R = e/(r/d) is capped at d/r, so it is "
        "shown but not ranked on. Summary z = Stouffer's Σ_l z_l/√L over the scored layers (layers are not "
        "independent: a screening figure, not a p-value).",
        "",
        *([f"{100 * config.ci_level:.0f}% bootstrap interval over EVAL prompts ({config.n_boot} resamples): "
           f"R_act [{_fmt(best['R_act_lo'])}, {_fmt(best['R_act_hi'])}], joint [{_fmt(best['joint_lo'])}, "
           f"{_fmt(best['joint_hi'])}].", ""] if "R_act_lo" in best else []),
        *([f"Topic holdout (EVAL probes whose claim did not train the LoRA, claims ≥ {config.topic_holdout}): "
           f"gain_act = {_fmt(best['gain_act_holdout'], '.3f')}, R_act = {_fmt(best['R_act_holdout'])}, "
           f"z_act = {_fmt(best['z_act_holdout'], '.1f')}, joint_gain = {_fmt(best['joint_gain_holdout'], '.3f')}.", ""]
          if "R_act_holdout" in best else []),
        ("Both its activation and weight concentrations are above the exact random-subspace null (z > 2)"
         f"{' in the standardized view' if std else ''}." if significant else
         "It does NOT clear the exact random-subspace null on both axes (z > 2): treat it as no evidence."),
        "",
        residual_line(joint, best, coords) if std else standardized_line(joint, best),
        "",
        *([geometry_line(result.pair), ""] if getattr(result, "pair", None) is not None else []),
        f"Top-5 by {g_act} (A-side write/mixed, weights and activations only): {', '.join(f'`{c}`' for c in top_act)}.  ",
        f"Top-5 by {g_w} (A-side write/mixed, weights and activations only): "
        f"{', '.join(f'`{c}`' for c in top_w)}.  ",
        f"Overlap of the two top-5 lists: {', '.join(f'`{c}`' for c in overlap) if overlap else 'none'}.",
        "",
    ]
    if read.height:
        r0 = read.row(0, named=True)
        lines += [
            f"Best read-side row (own table; its weight score measures read/write alignment, not 'explains the "
            f"delta'): `{r0['candidate']}` {view_col('joint_gain', lead)} = {_fmt(r0[view_col('joint_gain', lead)], '.3f')}, "
            f"{view_col('R_act', lead)} = {_fmt(r0[view_col('R_act', lead)])}, "
            f"{view_col('R_w_combined', lead)} = {_fmt(r0[view_col('R_w_combined', lead)])}.",
            "",
        ]
    ref_bits = [f"`{r['candidate']}` gain_act = {_fmt(r['gain_act'], '.3f')}, gain_w_combined = "
                f"{_fmt(r['gain_w_combined'], '.3f')}" for r in refs.iter_rows(named=True)]
    lines += ["B-side references (built from the LoRA, never ranked): " + "; ".join(ref_bits) + ".", ""]
    deficient = [
        r["candidate"] for r in ranked.filter(pl.col("side") == "A").iter_rows(named=True)
        if r["rank"] is not None and r["rank"] < r["expected_rank"] - 1e-9
    ]
    n_train = getattr(result, "n_lora_train_topics", None)
    warning = getattr(result, "outlier_warning", None)
    lines += [
        "## Caveats",
        "",
        *([f"- {warning}"] if warning else []),
        "- A single delta (one LoRA seed): the ranking is anecdote-grade until repeated across seeds.",
        f"- A small probe set: {result.n_fit} FIT prompts build the activation bases and {result.n_eval} EVAL prompts "
        "score them" + ("; R_act has no confidence interval here." if not config.n_boot else
                         f"; intervals come from {config.n_boot} bootstrap resamples of those prompts."),
    ]
    if n_train and config.topic_holdout is None:
        lines.append(f"- Topic overlap: the first {n_train} probe claims were LoRA training topics, so EVAL probes are "
                     "not all held out from training (rerun with --topic-holdout to score the held-out ones too).")
    if config.label == "block_local":
        lines.append("- The activation label is block-local: the change of (block output − block input) at each layer.")
    lines += [
        "- The null is a uniformly random subspace of the residual stream; the residual stream is anisotropic, "
        "so see `specific_summary.tsv` (scores after removing the clean principal components).",
        f"- Bases have rank r = {config.r} unless declared lower (unions up to 2r); gain and pct_oracle use the Ky "
        "Fan oracle at each basis's own rank, so the ranking is fair across ranks.",
    ]
    if deficient:
        lines.append(f"- Below their declared rank on some layer (scored at their effective rank): "
                     f"{', '.join(f'`{c}`' for c in deficient)}.")
    if config.null == "mc":
        lines.append(f"- z from a seeded Monte-Carlo null ({config.n_null} draws, seed {config.seed}), not the exact null.")
    extra = []
    if getattr(result, "scope", None) is not None and result.scope.height:
        from .diagnostics import scope_verdict

        extra += ["## Scope", "", scope_verdict(result.scope), ""]
    causal = getattr(result, "causal", None)
    if causal is not None:
        from .causal import verdict

        extra += ["## Causal check", "", verdict(causal), ""]
        if std:
            extra += [causal_views_line(causal, ranked, best["candidate"]), ""]
        seed_best = _causal_row(causal, base["candidate"]) if base is not None and data_aware else None
        if seed_best is not None:
            extra += [f"The best basis that sees no behaviour data, `{base['candidate']}`, tested beside it: keeps "
                      f"{_fmt(seed_best['kept'])} of E(w_writes) (random subspaces of its ranks: "
                      f"{_fmt(seed_best['null_kept_mean'])} ± {_fmt(seed_best['null_kept_sd'])}, z = "
                      f"{_fmt(seed_best['z_kept'], '.1f')}); ablating it removes {_fmt(seed_best['ablated'])}.", ""]
    extra += gradient_section(result, joint, base)
    lines[lines.index("## Caveats"):lines.index("## Caveats")] = extra
    return "\n".join(lines) + "\n"


def save_oracles(oracle_bases: Mapping[int, Mapping[str, object]], path: Path) -> None:
    """The weight targets' Ky Fan oracle bases per layer (``{target}@{layer}``), so runs of
    different deltas can be compared by their principal angles without the deltas."""
    from safetensors.torch import save_file

    tensors = {f"{name}@{layer}": basis.contiguous() for layer, per in sorted(oracle_bases.items())
               for name, basis in sorted(per.items())}
    save_file(tensors, str(path))


def load_oracles(path: Path) -> dict[int, dict[str, object]]:
    from safetensors.torch import load_file

    out: dict[int, dict[str, object]] = {}
    for key, basis in load_file(str(path)).items():
        name, layer = key.rsplit("@", 1)
        out.setdefault(int(layer), {})[name] = basis
    return out


# ------------------------------------------------------------------------------- figures

FAMILY_MARKERS = {"write": "o", "mixed": "s", "null": "x", "read": "^"}


def _positive(x):
    x = np.asarray(x, dtype=float)
    return np.where(np.isfinite(x) & (x > 0), x, np.nan)


def plain_log_ticks(axis) -> None:
    """Label a log axis with plain numbers (2, 3, 6) rather than 2×10⁰."""
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "2358" else ""))


def scatter_figure(ranked: pl.DataFrame, path_png: Path, path_pdf: Path, view: str = "residual") -> None:
    """R_act vs R_w_combined, log-log, in ``view`` (SPEC §12: the leading one; the standardized
    view's R_act_std and R_w_combined_std): write+mixed panel and read panel, each panel's top 10
    in that view labelled; oracles starred."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), sharex=True, sharey=True)
    x, y = view_col("R_act", view), view_col("R_w_combined", view)
    refs = ranked.filter(pl.col("panel") == "reference")
    for ax, panel, title in [
        (axes[0], "joint", "A-side write + mixed (R_w: explains the delta)"),
        (axes[1], "read", "A-side read (R_w: read/write alignment only)"),
    ]:
        rows = view_order(ranked.filter(pl.col("panel") == panel), view)
        families = sorted(set(rows["family"].to_list()))
        cmap = plt.get_cmap("tab20", max(len(families), 1))
        for i, fam in enumerate(families):
            sub = rows.filter(pl.col("family") == fam)
            marker = FAMILY_MARKERS.get(sub["axis_kind"][0], "o")
            ax.scatter(_positive(sub[x]), _positive(sub[y]), s=46, alpha=0.85,
                       color=cmap(i), marker=marker, label=fam)
        ax.scatter(_positive(refs[x]), _positive(refs[y]), s=150, marker="*", color="black",
                   label="B-side references", zorder=5)
        for r in refs.iter_rows(named=True):
            if r[x] and r[y] and r[x] > 0 and r[y] > 0:
                ax.annotate(r["candidate"], (r[x], r[y]), fontsize=7, xytext=(4, -9),
                            textcoords="offset points", style="italic")
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.9)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain_log_ticks(ax.xaxis)
        plain_log_ticks(ax.yaxis)
        ax.set_xlabel(f"activation concentration {x} (null = 1)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.25, which="both")
        ax.legend(fontsize=7, ncols=2, loc="best")
        # the panel's top 10 in this view, labels moved apart where points coincide
        annotate_apart(ax, [(r[x], r[y], r["candidate"]) for r in rows.head(10).iter_rows(named=True)
                            if r[x] and r[y] and r[x] > 0 and r[y] > 0])
    axes[0].set_ylabel(f"weight concentration {y}, Frobenius-balanced combined (null = 1)")
    where = (" — standardized coordinates (each residual coordinate in units of its own scale; SPEC §12)"
             if view == "standardized" else "")
    fig.suptitle(f"Which base-model subspace explains the LoRA? (mean over scored layers){where}")
    fig.tight_layout()
    save_png_pdf(fig, path_png, path_pdf, dpi=150)


def spectra_figure(spectra: pl.DataFrame, path_png: Path, path_pdf: Path) -> None:
    """Top-k energy curves (mean over scored layers) of every target, and the combined weight
    energy inside the top-k activation oracle; participation ranks in the legend."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(("act", "o_proj", "down_proj", "combined", "w_combined_in_act_topk")):
        sub = spectra.filter(pl.col("target") == name)
        if not sub.height:
            continue
        curve = sub.group_by("k").agg(pl.col("energy").mean(), pl.col("participation_rank").mean()).sort("k")
        pr = curve["participation_rank"][0]
        label = name if name == "w_combined_in_act_topk" else f"{name} (participation rank {pr:.1f})"
        ax.plot(curve["k"].to_numpy(), curve["energy"].to_numpy(), "--" if "in_act" in name else "-o",
                markersize=3, color=f"C{i}", label=label)
    ax.set_xlabel("k")
    ax.set_ylabel("energy in the top-k directions (Ky Fan sum / trace)")
    ax.set_ylim(0, 1.02)
    ax.set_title("How low-rank is each side? (mean over scored layers)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.25)
    fig.tight_layout()
    save_png_pdf(fig, path_png, path_pdf, dpi=140)


def readout_figure(readout: pl.DataFrame, path_png: Path, path_pdf: Path, top: int = 20) -> None:
    """Three panels: token energy per layer (mean label vs clean reference; random direction = 1),
    the Yes/No logit lens per layer, and the candidates' share of the readout direction."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    layers = readout.filter(pl.col("kind") == "layer").sort("layer")
    x = layers["layer"].to_numpy()
    axes[0].plot(x, layers["token_energy_label"].to_numpy(), "-o", label="mean label")
    axes[0].plot(x, layers["token_energy_clean"].to_numpy(), "-s", label="clean reference")
    axes[0].axhline(1.0, color="grey", linestyle="--", linewidth=0.9, label="random direction (exactly 1)")
    axes[0].set_xticks(x)
    axes[1].set_xticks(x)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("token energy (d/V)·‖Û v̂‖²")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, layers["logit_lens"].to_numpy(), color="C2")
    axes[1].axhline(0.0, color="black", linewidth=0.8)
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("logit lens: Δ(logit Yes − logit No), first order")
    cands = readout.filter(pl.col("kind") == "candidate").sort("readout_share", descending=True).head(top)
    y = np.arange(cands.height)[::-1]
    axes[2].barh(y, cands["readout_share"].to_numpy(), color="C4")
    axes[2].set_yticks(y, cands["name"].to_list(), fontsize=7)
    axes[2].set_xlabel("share of the Yes/No readout direction in span(B), mean over layers")
    for ax, title in zip(axes, ("Does the output read the label?", "Logit lens of the label", "Who holds the readout direction?")):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.25)
    fig.tight_layout()
    save_png_pdf(fig, path_png, path_pdf, dpi=140)


def annotate_apart(ax, points, fontsize: float = 7) -> list:
    """Label each (x, y, text) next to its point; a label that would overlap one already placed
    moves up by its own height until it does not, so candidates whose points coincide read as a
    list instead of overprinting (issue 26). Call once the axes' data and scales are final."""
    ax.autoscale_view()
    renderer = ax.figure.canvas.get_renderer()
    placed, texts = [], []
    for x, y, label in sorted(points, key=lambda p: (p[1], p[0], p[2])):
        dy = 3.0
        while True:
            ann = ax.annotate(label, (x, y), fontsize=fontsize, xytext=(3, dy), textcoords="offset points")
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
            ann.remove()
            dy += box.height * 72.0 / ax.figure.dpi + 1.0  # pixels -> points, and a point of air
        placed.append(box)
        texts.append(ann)
    return texts


def causal_figure(table: pl.DataFrame, path_png: Path, path_pdf: Path) -> None:
    """``draw_causal`` saved as PNG and PDF."""
    fig = draw_causal(table)
    save_png_pdf(fig, path_png, path_pdf, dpi=140)


def draw_causal(table: pl.DataFrame):
    """Left: kept vs R_w_combined per tested candidate, the rank-matched oracle starred, the
    random null as a band (mean ± 2 SD per tested rank). Right: retention curves over k."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    cands = table.filter(pl.col("kind") == "candidate")
    oracles = table.filter(pl.col("kind") == "oracle")
    randoms = table.filter(pl.col("kind") == "random")
    for i, r in enumerate(oracles.iter_rows(named=True)):
        m, s = r["null_kept_mean"], r["null_kept_sd"]
        if m is not None and s is not None and math.isfinite(m) and math.isfinite(s):
            ax.axhspan(m - 2 * s, m + 2 * s, color="grey", alpha=0.2,
                       label=f"random subspaces, mean ± 2 SD (rank {r['rank']:.0f})" if i < 3 else None)
    ax.scatter(_positive(randoms["R_w_combined"]), randoms["kept"].to_numpy(), s=14, color="grey", marker="x",
               label="random draws")
    ax.scatter(_positive(cands["R_w_combined"]), cands["kept"].to_numpy(), s=50, color="C0", label="top candidates")
    ax.scatter(_positive(oracles["R_w_combined"]), oracles["kept"].to_numpy(), s=160, marker="*", color="black",
               label="rank-matched combined oracle", zorder=5)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=0.8)
    ax.axhline(0.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    annotate_apart(ax, [(r["R_w_combined"], r["kept"], r["name"]) for r in cands.iter_rows(named=True)
                        if r["R_w_combined"] and r["R_w_combined"] > 0 and r["kept"] is not None
                        and math.isfinite(r["kept"])])
    ax.set_xlabel("weight concentration R_w_combined of the subspace (null = 1)")
    ax.set_ylabel("kept = E(w_B) / E(w_writes)")
    ax.set_title("Does the subspace carry the behaviour?", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.25, which="both")
    curves = table.filter(pl.col("kind") == "curve")
    for j, name in enumerate(dict.fromkeys(curves["name"].to_list())):
        for matched, style in ((False, "-o"), (True, "--s")):
            sub = curves.filter((pl.col("name") == name) & (pl.col("norm_matched") == matched)).sort("k")
            ax2.plot(sub["k"].to_numpy(), sub["kept"].to_numpy(), style, color=f"C{j}", markersize=4,
                     label=f"{name}{' (norm-matched)' if matched else ''}")
    ax2.axhline(1.0, color="black", linestyle=":", linewidth=0.8)
    ax2.set_xscale("log", base=2)
    ks = sorted(set(curves["k"].drop_nulls().to_list()))
    ax2.set_xticks(ks, [str(k) for k in ks])
    ax2.set_xlabel("k (leading directions kept)")
    ax2.set_ylabel("kept")
    ax2.set_title("Retention over rank", fontsize=10)
    if curves.height:
        ax2.legend(fontsize=7, loc="best")
    else:  # a check without curves (--causal-curve none, or no rank within the bases): say so, not an empty legend
        ax2.text(0.5, 0.5, "no retention curve in this check", ha="center", va="center", transform=ax2.transAxes,
                 fontsize=9, color="grey")
    ax2.grid(alpha=0.25, which="both")
    fig.tight_layout()
    return fig


def heatmap_figure(per_layer: pl.DataFrame, order: list[str], path_png: Path, path_pdf: Path,
                   panel_ends: list[int] = (), view: str = "residual") -> None:
    """Candidates x scored layers: log2 R_act and log2 R_w_combined (0 = null) in ``view`` (the
    standardized view's ``*_std`` columns); lines separate panels."""
    layers = sorted(set(per_layer["layer"].to_list()))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2 + 0.45 * len(layers)) * 2, 0.24 * len(order) + 2.5))
    for ax, col, title in [(axes[0], view_col("R_act", view), f"log2 {view_col('R_act', view)}"),
                           (axes[1], view_col("R_w_combined", view), f"log2 {view_col('R_w_combined', view)}")]:
        grid = np.full((len(order), len(layers)), np.nan)
        idx = {c: i for i, c in enumerate(order)}
        lidx = {lay: j for j, lay in enumerate(layers)}
        for r in per_layer.select("candidate", "layer", col).iter_rows():
            if r[0] in idx and r[2] is not None and r[2] > 0:
                grid[idx[r[0]], lidx[r[1]]] = np.log2(r[2])
        finite = grid[np.isfinite(grid)]
        vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_yticks(range(len(order)), order, fontsize=7)
        for end in panel_ends:
            ax.axhline(end - 0.5, color="black", linewidth=1.2)
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.6, label="log2 concentration (0 = random subspace)")
    fig.tight_layout()
    save_png_pdf(fig, path_png, path_pdf, dpi=130)


# ------------------------------------------------------------------------------- the run folder


def write_run(result, config, out: str | Path, manifest: Mapping[str, object],
              snapshot: publish.Snapshot | None = None) -> Path:
    """Write every SPEC §7 output of ``result`` and publish it as ``out`` (``publish.write_folder``;
    ``snapshot``: what ``publish.check_destination`` saw when the run started, else taken now)."""
    if snapshot is None:
        snapshot = publish.check_destination(out, overwrite=config.overwrite)
    return publish.write_folder(out, lambda tmp: fill_run(tmp, result, config, manifest),
                                overwrite=config.overwrite, snapshot=snapshot)


def fill_run(tmp: Path, result, config, manifest: Mapping[str, object]) -> None:
    """Write every SPEC §7 output of ``result`` into the (new, empty) folder ``tmp``, then
    report.html of them (issue 33); the manifest last, with the time the tables and figures took
    (``timings_s.report``) and report.html's (``timings_s.report_html``)."""
    t0 = time.perf_counter()
    ranked = ranked_summary(result)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n")
    _csv(result.per_layer, tmp / "per_layer.csv")
    optional = [c for c in OPTIONAL_COLS if c in ranked.columns]
    _tsv(ranked.select(["panel", "rank_in_panel", *SUMMARY_COLS, *optional]), tmp / "summary.tsv")
    _tsv(ranked.select(["panel", "rank_in_panel", *PCT_COLS]), tmp / "summary_pct.tsv")
    _csv(result.specific_per_layer, tmp / "specific_per_layer.csv")
    _tsv(sort_best_first(result.specific_summary, "specific_R_act"), tmp / "specific_summary.tsv")
    save_oracles(result.oracle_bases, tmp / "weight_oracles.safetensors")
    causal = getattr(result, "causal", None)
    (tmp / "definitions.md").write_text(definitions_markdown(result.candidates, causal, getattr(result, "pair", None),
                                                             getattr(result, "gradients", None)))
    if getattr(result, "scope", None) is not None:
        _tsv(result.scope, tmp / "scope.tsv")
    if getattr(result, "spectra", None) is not None:
        _tsv(result.spectra, tmp / "spectra.tsv")
        spectra_figure(result.spectra, tmp / "spectra.png", tmp / "spectra.pdf")
    if getattr(result, "readout", None) is not None:
        _tsv(result.readout, tmp / "readout.tsv")
        readout_figure(result.readout, tmp / "readout.png", tmp / "readout.pdf")
    if getattr(result, "pair", None) is not None:
        _tsv(result.pair, tmp / "pair.tsv")
    if getattr(result, "gradients", None) is not None:
        _tsv(gradient_table(result, ranked), tmp / "gradients.tsv")
    if causal is not None:
        _tsv(causal.table, tmp / "causal.tsv")
        causal_figure(causal.table, tmp / "causal_kept.png", tmp / "causal_kept.pdf")
    (tmp / "conclusion.md").write_text(conclusion_markdown(result, ranked, config))
    lead = getattr(result, "leading_view", "residual")
    scatter_figure(ranked, tmp / "joint_act_weight_scatter.png", tmp / "joint_act_weight_scatter.pdf", lead)
    in_view = pl.concat([view_order(ranked.filter(pl.col("panel") == p), lead) for p in PANELS])
    panels = in_view["panel"].to_list()
    ends = [i for i in range(1, len(panels)) if panels[i] != panels[i - 1]]
    heatmap_figure(result.per_layer, in_view["candidate"].to_list(), tmp / "per_layer_heatmap.png",
                   tmp / "per_layer_heatmap.pdf", ends, lead)
    timings = {**result.timings, "report": time.perf_counter() - t0}
    full_manifest = {
        "package_versions": package_versions(),
        "scored_layers": result.scored_layers,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "forward_passes": result.forward_passes,
        "n_fit": result.n_fit,
        "n_eval": result.n_eval,
        "d_model": result.d_model,
        "seed": config.seed,
        "null": config.null,
        **manifest,
    }
    t_html = time.perf_counter()  # report.html reads the folder as written so far, the manifest from memory
    html_report.write_into(tmp, kind="run", manifest=full_manifest)
    full_manifest["timings_s"] = {**full_manifest["timings_s"], "report_html": round(time.perf_counter() - t_html, 3)}
    (tmp / publish.MANIFEST).write_text(json.dumps(full_manifest, indent=2, sort_keys=True, default=str) + "\n")

