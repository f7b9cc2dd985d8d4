"""A study's aggregate (issue 32, SPEC §12): the seed's claims as numbers per model × adapter
family, over training seeds, with every seed's value and a 95% interval.

Pure functions of the jobs' run folders: ``job_results`` reads one finished job's run folder
(summary.tsv, summary_pct.tsv or per_layer.csv, causal.tsv, pair.tsv) into one row of numbers and
its candidates' gains; ``aggregate``
turns the rows of all jobs into the tables, figures and conclusion of ``DIR/study/``. Nothing
here depends on how or where the jobs ran, on timings or on paths, so a study that was killed and
resumed writes the same aggregate, byte for byte, as one that ran straight through.

Views (SPEC §12): a job's numbers are read in the view its run leads with: the standardized one
(``*_std`` columns) where the run's outlier-coordinate warning fired (a few residual coordinates
decide the residual view's shares there, as on Gemma-3-270m), else the residual one (the seed's).
Its causal check already tested that view's winner. The residual view's values of the claims it
decides (``RESIDUAL_TWINS``) stand beside them in ``*_residual`` columns, marked in the conclusion.

Statistics (stated in every table): per model × family the seeds' values, their mean, sample SD
and the 95% Student-t interval ``mean ± t(0.975, n−1)·sd/√n`` (n = the seeds that gave a finite
value; n = 1 has no interval). With n = 3 the interval is wide (t = 4.30): the points are shown
beside it. A claim *holds* for a family when its interval lies entirely on the claimed side of
its threshold, *fails* (the opposite holds) when it lies entirely on the other side, and is
*undecided* otherwise (SPEC §12). Rankings' agreement across seeds is Kendall's W (with the
tie correction) over the candidates every seed ranked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from .compare import has_view_columns, outlier_warning
from .figures import save_png_pdf
from .report import view_col

#: The families whose bases write the residual stream from the weights alone (the seed's "write
#: family": natural weight-side bases).
WRITE_FAMILIES = ("W:write", "W:write-not-read")
#: The joint panel's axis kinds that are hypotheses (the null baseline is not).
HYPOTHESIS_AXES = ("write", "mixed")
TOP_K = 5
LEVEL = 0.95


@dataclass(frozen=True)
class Claim:
    """One of the seed's claims as a statistic of a job and a threshold: it holds when the
    interval of the statistic lies above (``above=True``) or below the threshold."""

    key: str
    column: str  # the per-job statistic
    threshold: float
    above: bool
    statement: str  # the claim, as the seed or its successors put it
    opposite: str  # what a failing family shows instead
    source: str


CLAIMS: tuple[Claim, ...] = (
    Claim("act_weight_overlap", "top5_overlap", 0.5, True,
          f"the top-{TOP_K} by gain_act and the top-{TOP_K} by gain_w_combined share at least one candidate",
          "no candidate is in both top-5s", "seed v7: chars_clusters and attn_min_taskdiff are top-5 by both"),
    Claim("write_family_at_null", "write_best_gain_w", 0.1, False,
          "the write family fails the weight-axis test: its best gain_w_combined is below 0.1 (less than a tenth "
          "of the way from a random subspace to the rank-matched oracle)",
          "a write-family basis holds a real share of the delta", "seed v7: write-family R_w_combined ~ 1.0"),
    Claim("base_predicts_little", "best_share", 0.5, False,
          "the best basis built from the base model alone (weights and activations) holds less than half of what "
          "the rank-matched combined weight oracle holds",
          "the base model predicts most of the delta", "the seed's successors: ~11% on Qwen3-0.6B"),
    Claim("behaviour_outside_act_oracle", "act_complement_minus_inside", 0.0, True,
          "the behaviour lives mostly outside the activation-oracle basis: the delta's complement of it keeps more "
          "of the causal effect than its restriction to it",
          "the behaviour lives mostly inside the activation-oracle basis",
          "the seed's successors: DeLoRA kept 7% inside, 89% in the complement"),
    Claim("winner_carries_behaviour", "winner_share_of_oracle", 0.5, True,
          "the joint winner carries the behaviour: restricted to it, the delta keeps at least half of what the "
          "rank-matched combined oracle keeps",
          "the winner keeps less than half of the oracle's share (significant or not)", "SPEC §8"),
    Claim("adapters_opposite", "cos_pos_neg", 0.0, True,
          "the two adapters move mostly in opposite directions: cos(τ⁺, −τ⁻) > 0",
          "they share a larger common drift than their opposite parts (cos(τ⁺, −τ⁻) < 0)",
          "the seed's successors: cos(τ⁺, −τ⁻) = −0.644 on a Qwen3-0.6B honesty pair"),
)

#: The gradient bases (issue 34, SPEC §13) read per job: each variant's gain_w_combined (the joint
#: panel's row of that candidate). They see the behaviour's data, so no claim of the seed's question
#: reads them (``hypotheses`` leaves them out); gradients.tsv sets them beside the seed's best basis.
GRAD_COLUMNS = {"grad_gain_w": "grad_behaviour", "grad_family_gain_w": "grad_behaviour_family",
                "grad_heldout_gain_w": "grad_heldout", "grad_shared_gain_w": "grad_shared",
                "grad_neutral_gain_w": "grad_neutral"}
#: gradients.tsv's rows per model × family: (label, per-job column), in this order. ``grad_kept``: the
#: causal kept of grad_behaviour where the check tested it; ``grad_family_minus_full``: which first
#: step predicts the delta, the family's own parametrization (> 0) or the full-weight gradient (< 0).
GRAD_ROWS = (*((name, col) for col, name in GRAD_COLUMNS.items()),
             ("seed's best A-side basis", "best_gain_w"), ("grad_behaviour kept (causal)", "grad_kept"),
             ("family variant − full-weight gain_w", "grad_family_minus_full"))

#: The per-job statistics a view decides whose residual values stand beside the lead view's
#: (``<column>_residual``, SPEC §12): the claims' (and the winner's, a name column).
RESIDUAL_TWINS = ("top5_overlap", "write_best_gain_w", "best_share")
#: Per-job numbers, in the order of per_job.tsv (the first four identify the job).
JOB_KEYS = ("model", "family", "seed", "job")
NUMBER_COLUMNS = (
    "top5_overlap", "write_mean_R_w", "write_mean_z_w", "write_best_gain_w", "best_share", "best_gain_w",
    "winner_gain_w", "winner_gain_act", "winner_joint_gain", "alpha_plus", "alpha_minus", "kl_plus", "kl_minus",
    "effect_w", "effect_writes", "winner_kept", "winner_z_kept", "oracle_kept", "random_kept_mean", "random_kept_sd",
    "winner_share_of_oracle", "act_oracle_kept", "act_complement_kept", "act_complement_minus_inside",
    "cos_pos_neg", "norm_ratio", "drift_over_w", "abs_cos_w_drift",
    *GRAD_COLUMNS, "grad_kept", "grad_family_minus_full", *(f"{c}_residual" for c in RESIDUAL_TWINS),
)
NAME_COLUMNS = ("view", "winner", "winner_residual", "best_share_candidate", "top5_overlap_candidates")

# ------------------------------------------------------------------------------- one job


def _float(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _read_tsv(path: Path) -> pl.DataFrame | None:
    return pl.read_csv(path, separator="\t", infer_schema_length=None) if path.is_file() else None


def _top_names(frame: pl.DataFrame, column: str, k: int) -> list[str]:
    """The k best by ``column`` (descending, NaN last, ties by name: a total order)."""
    key = pl.when(pl.col(column).is_nan()).then(None).otherwise(pl.col(column))
    ordered = frame.with_columns(_k=key).sort(["_k", "candidate"], descending=[True, False], nulls_last=True)
    return ordered["candidate"].head(k).to_list()


def hypotheses(summary: pl.DataFrame) -> pl.DataFrame:
    """The joint panel's A-side hypotheses built from the base model's weights and activations (the
    seed's bases): write and mixed axis kinds; not the null baseline, not a data-aware kind."""
    rows = summary.filter((pl.col("panel") == "joint") & pl.col("axis_kind").is_in(HYPOTHESIS_AXES))
    if "sees" in rows.columns:  # a column naming what a basis sees (weights / activations / behaviour data)
        rows = rows.filter(~pl.col("sees").str.contains("behaviour"))
    return rows.filter(~pl.col("family").str.starts_with("grad"))


def joint_order(summary: pl.DataFrame, view: str = "residual") -> list[str]:
    """The joint panel's ranking in ``view`` (its rank_in_panel column), best first."""
    joint = summary.filter(pl.col("panel") == "joint").sort(view_col("rank_in_panel", view), nulls_last=True)
    return joint["candidate"].to_list()


def _row(frame: pl.DataFrame | None, **match) -> dict | None:
    if frame is None:
        return None
    sel = frame
    for col, value in match.items():
        if col not in sel.columns:
            return None
        sel = sel.filter(pl.col(col) == value)
    return sel.row(0, named=True) if sel.height else None


def job_view(run: Path, summary: pl.DataFrame) -> str:
    """The view a job's run leads with (SPEC §12): "standardized" where its outlier-coordinate
    warning fired and summary.tsv has that view's columns, else "residual"."""
    return "standardized" if has_view_columns(summary.columns, "standardized") and outlier_warning(run) else "residual"


def _layer_means(run: Path, view: str) -> pl.DataFrame | None:
    """Per candidate, the view's R_w_combined and pct_oracle_combined, averaged over the scored layers
    as the run's summary averages them (a NaN layer makes the mean NaN): summary_pct.tsv for the
    residual view, per_layer.csv for the standardized one (summary.tsv keeps only its gains)."""
    cols = [view_col("R_w_combined", view), view_col("pct_oracle_combined", view)]
    if view == "residual":
        frame = _read_tsv(run / "summary_pct.tsv")
    else:
        layers = run / "per_layer.csv"
        frame = pl.read_csv(layers, infer_schema_length=None) if layers.is_file() else None
    if frame is None or not set(cols) <= set(frame.columns):
        return None
    if view == "residual":
        return frame
    return frame.group_by("candidate", maintain_order=True).agg(*[pl.col(c).cast(pl.Float64).mean() for c in cols])


def view_numbers(run: Path, summary: pl.DataFrame, view: str) -> dict[str, object]:
    """The statistics a view decides: the top-5 overlap, the write family's and the best A-side
    basis's numbers, the joint ranking and its winner, the gradient bases' gains."""
    def col(name: str) -> str:
        return view_col(name, view)

    out: dict[str, object] = {}
    hyp = hypotheses(summary)
    act, wgt = _top_names(hyp, col("gain_act"), TOP_K), _top_names(hyp, col("gain_w_combined"), TOP_K)
    both = sorted(set(act) & set(wgt))
    out["top5_overlap"] = float(len(both))
    out["top5_overlap_candidates"] = ";".join(both)
    means = _layer_means(run, view)
    write = hyp.filter(pl.col("family").is_in(WRITE_FAMILIES))
    if write.height:
        if means is not None:
            sel = means.filter(pl.col("candidate").is_in(write["candidate"].to_list()))
            out["write_mean_R_w"] = float(sel[col("R_w_combined")].mean()) if sel.height else math.nan
        out["write_mean_z_w"] = float(write[col("z_w_combined")].mean())
        out["write_best_gain_w"] = float(write[col("gain_w_combined")].fill_nan(None).max())
    if means is not None:
        shares = means.filter(pl.col("candidate").is_in(hyp["candidate"].to_list()))
        best = _top_names(shares, col("pct_oracle_combined"), 1)
        if best:
            out["best_share"] = _float(_row(shares, candidate=best[0])[col("pct_oracle_combined")]) / 100.0
            out["best_share_candidate"] = best[0]
    out["best_gain_w"] = float(hyp[col("gain_w_combined")].fill_nan(None).max()) if hyp.height else math.nan
    order = joint_order(summary, view)
    out["ranking"] = order
    if order:
        win = _row(summary, panel="joint", candidate=order[0])
        out["winner"] = order[0]
        out["winner_gain_w"], out["winner_gain_act"] = _float(win[col("gain_w_combined")]), _float(win[col("gain_act")])
        out["winner_joint_gain"] = _float(win[col("joint_gain")])
    for column, name in GRAD_COLUMNS.items():
        row = _row(summary, panel="joint", candidate=name)
        if row is not None:
            out[column] = _float(row[col("gain_w_combined")])
    return out


def job_results(run: str | Path) -> tuple[dict[str, object], list[dict[str, object]]]:
    """One finished job's numbers (``NUMBER_COLUMNS``, ``NAME_COLUMNS``; NaN or "" where the run
    has no such output, e.g. no causal check) in the view its run leads with (``view``), the residual
    view's twins beside them, and its joint ranking in that view (key ``ranking``); and the joint
    panel's gain_w_combined per candidate (not the null baseline) in that view, the heatmap's."""
    run = Path(run)
    summary = _read_tsv(run / "summary.tsv")
    if summary is None:
        raise FileNotFoundError(f"{run}: no summary.tsv")
    out: dict[str, object] = {c: math.nan for c in NUMBER_COLUMNS}
    out.update({c: "" for c in NAME_COLUMNS})
    view = job_view(run, summary)
    out["view"] = view
    out.update(view_numbers(run, summary, view))
    residual = out if view == "residual" else view_numbers(run, summary, "residual")
    out.update({f"{c}_residual": residual.get(c, math.nan) for c in RESIDUAL_TWINS})
    out["winner_residual"] = residual.get("winner", "")
    out["grad_family_minus_full"] = out["grad_family_gain_w"] - out["grad_gain_w"]  # NaN where either is
    _causal_numbers(_read_tsv(run / "causal.tsv"), out)
    _pair_numbers(_read_tsv(run / "pair.tsv"), out)
    panel = summary.filter((pl.col("panel") == "joint") & (pl.col("axis_kind") != "null"))
    gains = [{"candidate": r["candidate"], "gain_w_combined": r[view_col("gain_w_combined", view)]}
             for r in panel.iter_rows(named=True)]
    return out, gains


def _causal_numbers(causal: pl.DataFrame | None, out: dict) -> None:
    if causal is None:
        return
    ref = _row(causal, kind="reference", name="w")
    writes = _row(causal, kind="reference", name="w_writes")
    out["effect_w"] = _float(ref["effect"]) if ref else math.nan
    out["effect_writes"] = _float(writes["effect"]) if writes else math.nan
    alphas = {}
    if ref:
        for key in ("alpha_plus", "alpha_minus"):
            alphas[key] = _float(ref.get(key, ref.get("alpha")))
    for arm, sign in (("plus", "+"), ("minus", "-")):
        cal = _row(causal, kind="calibration", name=sign) or _row(causal, kind="calibration", name=arm)
        if cal is not None:
            alphas[f"alpha_{arm}"] = _float(cal.get("alpha"))
            out[f"kl_{arm}"] = _float(cal.get("kl", cal.get("effect")))
    out.update({k: v for k, v in alphas.items() if k in out})
    candidates = causal.filter(pl.col("kind") == "candidate")
    if candidates.height:
        win = candidates.row(0, named=True)  # the first tested candidate: the joint winner
        out["winner_kept"], out["winner_z_kept"] = _float(win["kept"]), _float(win["z_kept"])
        out["random_kept_mean"], out["random_kept_sd"] = _float(win["null_kept_mean"]), _float(win["null_kept_sd"])
    grad = _row(causal, kind="candidate", name=GRAD_COLUMNS["grad_gain_w"])
    if grad is not None:
        out["grad_kept"] = _float(grad["kept"])
    oracle = causal.filter(pl.col("kind") == "oracle")
    if oracle.height:
        out["oracle_kept"] = _float(oracle.row(0, named=True)["kept"])
    if math.isfinite(out["winner_kept"]) and math.isfinite(out["oracle_kept"]) and out["oracle_kept"] > 0:
        out["winner_share_of_oracle"] = out["winner_kept"] / out["oracle_kept"]
    act = _row(causal, kind="act_oracle", name="oracle_act_cumulative")
    if act is not None:
        out["act_oracle_kept"] = _float(act["kept"])
        out["act_complement_kept"] = 1.0 - _float(act["ablated"])  # E(w_ablate)/E(w_writes)
        out["act_complement_minus_inside"] = out["act_complement_kept"] - out["act_oracle_kept"]


#: pair.tsv's columns for the pair's geometry (the row of scope ``all``).
PAIR_COLUMNS = {"cos_pos_neg": "cos_plus_neg_minus", "norm_ratio": "norm_ratio", "drift_over_w": "drift_over_axis",
                "abs_cos_w_drift": "abs_cos_w_drift"}


def _pair_numbers(pair: pl.DataFrame | None, out: dict) -> None:
    if pair is None or not pair.height:
        return
    row = _row(pair, scope="all") or pair.row(0, named=True)
    for key, col in PAIR_COLUMNS.items():
        if col in row:
            out[key] = _float(row[col])


# ------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    values: tuple[float, ...]  # the finite values, in seed order
    mean: float
    sd: float
    lo: float
    hi: float

    @property
    def n(self) -> int:
        return len(self.values)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The finite ``values``' mean, sample SD and Student-t interval ``mean ± t((1+level)/2, n−1)·sd/√n``
    (NaN bounds for n < 2; an interval of zero width when every value is equal)."""
    import scipy.stats

    xs = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
    n = len(xs)
    if n == 0:
        return Interval(xs, math.nan, math.nan, math.nan, math.nan)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(xs, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(scipy.stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(xs, mean, sd, mean - half, mean + half)


def verdict(claim: Claim, interval: Interval) -> str:
    """"holds", "fails" or "undecided" (also for fewer than 2 finite values)."""
    if not (math.isfinite(interval.lo) and math.isfinite(interval.hi)):
        return "undecided"
    t = claim.threshold
    if (interval.lo > t) if claim.above else (interval.hi < t):
        return "holds"
    if (interval.hi < t) if claim.above else (interval.lo > t):
        return "fails"
    return "undecided"


def average_ranks(order: Sequence[str], items: Sequence[str]) -> list[float]:
    """Ranks 1..n of ``items`` in ``order`` restricted to ``items`` (no ties: a ranking is an order)."""
    pos = {name: i for i, name in enumerate(n for n in order if n in set(items))}
    return [float(pos[name] + 1) for name in items]


def kendalls_w(rank_matrix: Sequence[Sequence[float]]) -> float:
    """Kendall's coefficient of concordance W of m rankings (rows) of the same n items (columns),
    with the tie correction: ``W = 12·S / (m²(n³ − n) − m·Σ_j T_j)``, S = Σ_i (R_i − R̄)² of the
    items' rank sums, T_j = Σ (t³ − t) over rater j's groups of tied ranks. 1: identical rankings;
    0: no agreement; NaN for m < 2 or n < 2."""
    R = np.asarray(rank_matrix, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] < 2 or R.shape[1] < 2:
        return math.nan
    m, n = R.shape
    sums = R.sum(axis=0)
    S = float(((sums - sums.mean()) ** 2).sum())
    ties = 0.0
    for row in R:
        _, counts = np.unique(row, return_counts=True)
        ties += float((counts.astype(np.float64) ** 3 - counts).sum())
    denom = m * m * (n ** 3 - n) - m * ties
    return 12.0 * S / denom if denom > 0 else math.nan


# ------------------------------------------------------------------------------- the aggregate


@dataclass
class Aggregate:
    per_job: pl.DataFrame  # one row per finished job
    claims: pl.DataFrame  # model, family, view, claim, values, n, mean, sd, lo, hi, verdict (the lead view)
    across: pl.DataFrame  # model, claim, holds_for, fails_for, undecided_for, summary
    winners: pl.DataFrame  # model, family, candidate, wins, of
    kendall: pl.DataFrame  # model, family, n_seeds, n_candidates, W, distinct_pairs (distinct deltas over seeds)
    gain_w: pl.DataFrame  # model, family, candidate, mean gain_w_combined over seeds
    failed: list[dict]  # the jobs that did not finish: job, step, error, status ("failed" or "not finished")
    gradients: pl.DataFrame  # model, family, basis, statistic, n, values, mean, sd, lo, hi (GRAD_ROWS)
    residual: pl.DataFrame  # the claims of RESIDUAL_TWINS in the residual view, claims' columns (SPEC §12)


def _groups(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for r in rows:
        key = (str(r["model"]), str(r["family"]))
        if key not in seen:
            seen.append(key)
    return seen


def _fmt_values(values: Sequence[float]) -> str:
    return ",".join(f"{v:.6g}" for v in values)


def aggregate(rows: Sequence[Mapping[str, object]], gains: Sequence[Mapping[str, object]] = (),
              failed: Sequence[Mapping[str, str]] = ()) -> Aggregate:
    """The study's tables from the jobs' numbers (``job_results`` plus model, family, seed, job),
    in the order given (the study's job order). ``gains``: rows (model, family, seed, candidate,
    gain_w_combined) for the heatmap."""
    rows = list(rows)
    per_job = pl.DataFrame([{**{k: r[k] for k in JOB_KEYS}, **{c: r.get(c, math.nan) for c in NUMBER_COLUMNS},
                             **{c: r.get(c, "") for c in NAME_COLUMNS}} for r in rows],
                           schema={"model": pl.String, "family": pl.String, "seed": pl.Int64, "job": pl.String,
                                   **{c: pl.Float64 for c in NUMBER_COLUMNS}, **{c: pl.String for c in NAME_COLUMNS}})
    claim_rows, residual_rows, winner_rows, kendall_rows, grad_rows = [], [], [], [], []

    def claim_row(claim: Claim, column: str, view: str, members: Sequence[Mapping]) -> dict:
        iv = t_interval([_float(r.get(column)) for r in members])
        return {"model": model, "family": family, "view": view, "claim": claim.key, "statistic": column,
                "threshold": claim.threshold, "direction": "above" if claim.above else "below", "n": iv.n,
                "values": _fmt_values(iv.values), "mean": iv.mean, "sd": iv.sd, "lo": iv.lo, "hi": iv.hi,
                "verdict": verdict(claim, iv)}

    for model, family in _groups(rows):
        members = [r for r in rows if (r["model"], r["family"]) == (model, family)]
        view = ";".join(dict.fromkeys(str(r.get("view") or "residual") for r in members))
        for claim in CLAIMS:
            claim_rows.append(claim_row(claim, claim.column, view, members))
            if claim.column in RESIDUAL_TWINS:
                residual_rows.append(claim_row(claim, f"{claim.column}_residual", "residual", members))
        for label, column in GRAD_ROWS:
            iv = t_interval([_float(r.get(column)) for r in members])
            grad_rows.append({"model": model, "family": family, "basis": label, "statistic": column, "n": iv.n,
                              "values": _fmt_values(iv.values), "mean": iv.mean, "sd": iv.sd, "lo": iv.lo,
                              "hi": iv.hi})
        wins: dict[str, int] = {}
        for r in members:
            if r.get("winner"):
                wins[str(r["winner"])] = wins.get(str(r["winner"]), 0) + 1
        for name, count in sorted(wins.items(), key=lambda kv: (-kv[1], kv[0])):
            winner_rows.append({"model": model, "family": family, "candidate": name, "wins": count,
                                "of": len(members)})
        rankings = [list(r.get("ranking") or []) for r in members]
        common = sorted(set.intersection(*(set(x) for x in rankings))) if rankings and all(rankings) else []
        W = kendalls_w([average_ranks(x, common) for x in rankings]) if common else math.nan
        shas = [r.get("delta_sha256") for r in members if r.get("delta_sha256")]
        kendall_rows.append({"model": model, "family": family, "n_seeds": len(members), "n_candidates": len(common),
                             "W": W, "distinct_pairs": len(set(shas)) if shas else None})
    claim_schema = {"model": pl.String, "family": pl.String, "view": pl.String, "claim": pl.String,
                    "statistic": pl.String, "threshold": pl.Float64, "direction": pl.String, "n": pl.Int64,
                    "values": pl.String, "mean": pl.Float64, "sd": pl.Float64, "lo": pl.Float64, "hi": pl.Float64,
                    "verdict": pl.String}
    claims = pl.DataFrame(claim_rows, schema=claim_schema)
    residual = pl.DataFrame(residual_rows, schema=claim_schema)
    across_rows = []
    for model in dict.fromkeys(str(r["model"]) for r in rows):
        for claim in CLAIMS:
            sel = claims.filter((pl.col("model") == model) & (pl.col("claim") == claim.key))
            by = {v: sel.filter(pl.col("verdict") == v)["family"].to_list() for v in ("holds", "fails", "undecided")}
            if by["holds"] and not by["fails"] and not by["undecided"]:
                summary = "holds for every family"
            elif by["fails"] and not by["holds"] and not by["undecided"]:
                summary = "fails for every family"
            elif by["holds"] and by["fails"]:
                summary = f"flips: holds for {', '.join(by['holds'])}; fails for {', '.join(by['fails'])}"
            else:
                summary = "undecided for " + ", ".join(by["undecided"]) + (
                    f"; holds for {', '.join(by['holds'])}" if by["holds"] else "") + (
                    f"; fails for {', '.join(by['fails'])}" if by["fails"] else "")
            across_rows.append({"model": model, "claim": claim.key, "holds_for": ";".join(by["holds"]),
                                "fails_for": ";".join(by["fails"]), "undecided_for": ";".join(by["undecided"]),
                                "summary": summary})
    across = pl.DataFrame(across_rows, schema={"model": pl.String, "claim": pl.String, "holds_for": pl.String,
                                               "fails_for": pl.String, "undecided_for": pl.String,
                                               "summary": pl.String})
    winners = pl.DataFrame(winner_rows, schema={"model": pl.String, "family": pl.String, "candidate": pl.String,
                                                "wins": pl.Int64, "of": pl.Int64})
    kendall = pl.DataFrame(kendall_rows, schema={"model": pl.String, "family": pl.String, "n_seeds": pl.Int64,
                                                 "n_candidates": pl.Int64, "W": pl.Float64,
                                                 "distinct_pairs": pl.Int64})
    gradients = pl.DataFrame(grad_rows, schema={"model": pl.String, "family": pl.String, "basis": pl.String,
                                                "statistic": pl.String, "n": pl.Int64, "values": pl.String,
                                                "mean": pl.Float64, "sd": pl.Float64, "lo": pl.Float64,
                                                "hi": pl.Float64})
    gain_rows = []
    for model, family in _groups(rows):
        sel = [g for g in gains if (g["model"], g["family"]) == (model, family)]
        for name in dict.fromkeys(str(g["candidate"]) for g in sel):
            iv = t_interval([_float(g["gain_w_combined"]) for g in sel if g["candidate"] == name])
            gain_rows.append({"model": model, "family": family, "candidate": name, "n": iv.n, "mean": iv.mean})
    gain_w = pl.DataFrame(gain_rows, schema={"model": pl.String, "family": pl.String, "candidate": pl.String,
                                             "n": pl.Int64, "mean": pl.Float64})
    return Aggregate(per_job, claims, across, winners, kendall, gain_w, [dict(f) for f in failed], gradients,
                     residual)


# ------------------------------------------------------------------------------- figures


def forest_figure(agg: Aggregate, stem: Path) -> None:
    """The best A-side basis's share of the rank-matched combined oracle per model × family: every
    seed's point, the mean and its 95% t-interval."""
    sel = agg.claims.filter(pl.col("claim") == "base_predicts_little")
    labels = [_label(r["model"], r["family"], r["view"]) for r in sel.iter_rows(named=True)]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * max(len(labels), 2) + 1.4))
    for i, r in enumerate(sel.iter_rows(named=True)):
        y = len(labels) - 1 - i
        vals = [float(v) for v in r["values"].split(",") if v] if r["values"] else []
        ax.scatter(vals, [y] * len(vals), s=14, color="0.55", zorder=2, label="seeds" if i == 0 else None)
        if math.isfinite(r["lo"]) and math.isfinite(r["hi"]):
            ax.plot([max(r["lo"], -0.05), r["hi"]], [y, y], color="C0", lw=2, zorder=1,
                    label="95% t-interval" if i == 0 else None)
        if math.isfinite(r["mean"]):
            ax.scatter([r["mean"]], [y], marker="D", s=36, color="C0", zorder=3, label="mean" if i == 0 else None)
    ax.axvline(0.11, color="C3", ls=":", lw=1, label="the successors' ~11%")
    ax.axvline(0.5, color="0.3", ls="--", lw=0.8, label="half (the claim's threshold)")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(list(reversed(labels)), fontsize=8)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlim(0, 1)  # a share of the oracle: 0 (nothing) to 1 (all of it)
    ax.set_xlabel("best base-model basis's share of the rank-matched combined weight oracle")
    ax.set_title("What the base model predicts of the delta, per adapter family", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    save_png_pdf(fig, stem.with_suffix(".png"), stem.with_suffix(".pdf"), dpi=140)


def _label(model: str, family: str, view: str) -> str:
    """A figure's row: model · family, marked where its jobs are read in another view than the residual."""
    return f"{model} · {family}" + ("" if view == "residual" else f" ({view} view)")


def heatmap_figure(agg: Aggregate, stem: Path) -> None:
    """Rows model · family, columns candidates (ordered by their mean over rows), colour = the mean
    gain_w_combined over seeds (in the view the jobs lead with; marked where not the residual one)."""
    g = agg.gain_w
    views = {(r["model"], r["family"]): r["view"] for r in agg.claims.iter_rows(named=True)}
    label = {(m, f): _label(m, f, views.get((m, f), "residual")) for m, f in zip(g["model"], g["family"])}
    rows = list(dict.fromkeys(label.values()))
    if not rows:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.text(0.5, 0.5, "no finished job", ha="center", va="center")
        ax.set_axis_off()
        save_png_pdf(fig, stem.with_suffix(".png"), stem.with_suffix(".pdf"), dpi=140)
        return
    overall = g.group_by("candidate").agg(pl.col("mean").fill_nan(None).mean().alias("m")).sort(
        ["m", "candidate"], descending=[True, False], nulls_last=True)
    cols = overall["candidate"].to_list()
    M = np.full((len(rows), len(cols)), np.nan)
    index = {c: j for j, c in enumerate(cols)}
    for r in g.iter_rows(named=True):
        M[rows.index(label[r["model"], r["family"]]), index[r["candidate"]]] = r["mean"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(cols) + 2.5), 0.4 * len(rows) + 2.2))
    im = ax.imshow(M, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    fig.colorbar(im, ax=ax, label="gain_w_combined (mean over seeds)")
    ax.set_title("Families × candidates: the weight oracle gain", fontsize=10)
    save_png_pdf(fig, stem.with_suffix(".png"), stem.with_suffix(".pdf"), dpi=140)


# ------------------------------------------------------------------------------- conclusion


def _f(x: float, spec: str = ".3f") -> str:
    return "nan" if x is None or not math.isfinite(x) else format(x, spec)


def conclusion_markdown(agg: Aggregate, n_jobs: int, merged: int = 0) -> str:
    """``merged``: how many of the finished jobs came from another aggregate's inputs (``study --merge``)."""
    done = agg.per_job.height
    lines = [
        "# Study: the seed's claims across adapter families and seeds", "",
        f"{done} of {n_jobs} jobs finished" + (f"; {_unfinished(agg.failed)} (listed at the end)." if agg.failed else ".")
        + (f" {merged} of the finished jobs were merged from another aggregate's inputs (their job hashes match "
           "this spec's; their outputs were verified where they ran, not here: manifest.json names the files by "
           "sha256)." if merged else ""),
        f"Each value below is per model × family over training seeds: every seed's value, the mean and the "
        f"{LEVEL:.0%} Student-t interval (mean ± t·sd/√n; n = 3 seeds give t = 4.30, so the points matter as much "
        "as the interval). A claim holds for a family when its interval lies entirely on the claimed side of the "
        "threshold, fails when it lies entirely on the other side, and is undecided otherwise.", "",
    ]
    other = {(r["model"], r["family"]): r["view"] for r in agg.claims.iter_rows(named=True) if r["view"] != "residual"}
    if other:
        lines += ["Views (SPEC §12): a job's numbers are read in the view its run leads with. Where the run's "
                  "outlier-coordinate warning fired, a few residual coordinates decide the residual view's energy "
                  "shares, and the run leads with the standardized view (each coordinate in units of its own scale "
                  "in the base model; its causal check tested that view's winner): "
                  + "; ".join(f"{m} · {f} ({v})" for (m, f), v in other.items())
                  + ". The residual view's values of the claims a view decides follow their tables, marked.", ""]

    def values(r: Mapping) -> str:
        return ", ".join(_f(float(v)) for v in r["values"].split(",")) if r["values"] else "—"

    for claim in CLAIMS:
        sel = agg.claims.filter(pl.col("claim") == claim.key)
        lines += [f"## {claim.statement}", "",
                  f"Statistic `{claim.column}`, threshold {claim.threshold:g} ({'above' if claim.above else 'below'}); "
                  f"source: {claim.source}.", "",
                  "| model | family | view | seeds' values | mean | 95% interval | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in sel.iter_rows(named=True):
            lines.append(f"| {r['model']} | {r['family']} | {r['view']} | {values(r)} | {_f(r['mean'])} | "
                         f"[{_f(r['lo'])}, {_f(r['hi'])}] | {r['verdict']} |")
        for r in agg.residual.filter(pl.col("claim") == claim.key).iter_rows(named=True):
            if (r["model"], r["family"]) in other:
                lines += ["", f"In the residual view (decided by a few coordinates there), {r['model']} · "
                              f"{r['family']}: {values(r)}; mean {_f(r['mean'])} [{_f(r['lo'])}, {_f(r['hi'])}], "
                              f"{r['verdict']}."]
        for r in agg.across.filter(pl.col("claim") == claim.key).iter_rows(named=True):
            lines += ["", f"Across families ({r['model']}): **{r['summary']}**."]
        lines.append("")
    lines += ["## Which candidate wins, and how much the seeds agree", "",
              "| model | family | winners (wins of seeds) | Kendall's W of the joint rankings |", "|---|---|---|---|"]
    for r in agg.kendall.iter_rows(named=True):
        w = agg.winners.filter((pl.col("model") == r["model"]) & (pl.col("family") == r["family"]))
        names = "; ".join(f"{x['candidate']} ({x['wins']}/{x['of']})" for x in w.iter_rows(named=True)) or "—"
        lines.append(f"| {r['model']} | {r['family']} | {names} | {_f(r['W'])} (over {r['n_candidates']} candidates) |")
    lines += _gradient_lines(agg.gradients)
    same = [r for r in agg.kendall.iter_rows(named=True) if r["distinct_pairs"] == 1 and r["n_seeds"] > 1]
    if same:
        lines += ["", "Caveat: " + "; ".join(f"every seed of {r['model']} · {r['family']} trained the same pair "
                                             "(identical deltas)" for r in same)
                  + ": a spread of zero there is one experiment repeated, not agreement between seeds."]
    if agg.failed:
        lines += ["", "## Jobs that did not finish", ""]
        lines += [f"- `{f['job']}` ({f.get('step', '?')}): {f.get('error', '')}" for f in agg.failed]
    return "\n".join(lines) + "\n"


def _unfinished(jobs: Sequence[Mapping[str, str]]) -> str:
    """"2 failed and 19 not finished": a job failed when its record says so (an entry without a
    status is a failure), else it has not run to the end (an interim aggregate, --aggregate-only)."""
    failed = sum(f.get("status", "failed") == "failed" for f in jobs)
    parts = [f"{failed} failed"] if failed else []
    parts += [f"{len(jobs) - failed} not finished"] if len(jobs) > failed else []
    return " and ".join(parts)


def _gradient_lines(gradients: pl.DataFrame) -> list[str]:
    """The conclusion's section on the gradient bases: per model × family, each variant's gain_w_combined
    beside the seed's best basis, grad_behaviour's causal kept, and which first step predicts more."""
    if gradients.filter((pl.col("n") > 0) & pl.col("statistic").is_in(list(GRAD_COLUMNS))).is_empty():
        return []

    def cell(r: Mapping) -> str:
        if not r["n"]:
            return "—"
        return _f(r["mean"]) + (f" [{_f(r['lo'])}, {_f(r['hi'])}]" if r["n"] > 1 else " (one seed)")

    labels = [label for label, _ in GRAD_ROWS]
    lines = ["", "## The gradient bases (issue 34: they see the behaviour's data, never the trained pair)", "",
             "gain_w_combined of each rank-r gradient basis (0: a random subspace, 1: the rank-matched combined "
             "oracle), the mean and its 95% t-interval over seeds; the seed's best basis (weights and activations "
             "only) beside them; the causal kept of grad_behaviour where the check tested it; and the family's own "
             "first step against the full-weight gradient (> 0: the family's parametrization predicts more).", "",
             "| model | family | " + " | ".join(labels) + " | predicts more |",
             "|---|---|" + "---|" * (len(labels) + 1)]
    rows = list(gradients.iter_rows(named=True))
    for model, family in _groups(rows):
        by = {r["statistic"]: r for r in rows if (r["model"], r["family"]) == (model, family)}
        diff = by["grad_family_minus_full"]
        more = ("the family variant" if diff["n"] > 1 and diff["lo"] > 0 else
                "the full-weight gradient" if diff["n"] > 1 and diff["hi"] < 0 else
                "undecided" if diff["n"] > 1 else "one seed: no interval" if diff["n"] else "—")
        lines.append(f"| {model} | {family} | " + " | ".join(cell(by[c]) for _, c in GRAD_ROWS) + f" | {more} |")
    return lines


#: The aggregate's own input (the jobs' numbers, rankings and gains): every table, figure and the
#: conclusion can be rebuilt from it alone (``rebuild``), which is how the shipped real study's
#: aggregate is checked without rerunning the study.
INPUTS = "inputs.json"


def write_aggregate(agg: Aggregate, folder: Path, manifest: Mapping[str, object], n_jobs: int,
                    inputs: Mapping[str, object] | None = None) -> None:
    """The aggregate's files into ``folder`` (a staging folder: the caller publishes it);
    ``inputs`` (rows, gains, failed: what ``aggregate`` was given) is stored as inputs.json."""
    def tsv(frame: pl.DataFrame, name: str) -> None:
        frame.write_csv(folder / name, separator="\t", float_precision=6)

    if inputs is not None:
        (folder / INPUTS).write_text(json.dumps({"n_jobs": n_jobs, **dict(inputs)}, indent=1, sort_keys=True) + "\n",
                                     encoding="utf-8")
    tsv(agg.per_job, "per_job.tsv")
    tsv(agg.claims, "claims.tsv")
    tsv(agg.across, "across_families.tsv")
    tsv(agg.winners, "winners.tsv")
    tsv(agg.kendall, "kendall.tsv")
    tsv(agg.gain_w, "gain_w_combined.tsv")
    tsv(agg.gradients, "gradients.tsv")
    tsv(agg.residual, "claims_residual.tsv")
    forest_figure(agg, folder / "forest")
    heatmap_figure(agg, folder / "heatmap")
    merged = sum(bool(r.get("merged_from")) for r in (inputs or {}).get("rows", ()))
    (folder / "conclusion.md").write_text(conclusion_markdown(agg, n_jobs, merged), encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps(dict(manifest), indent=1, sort_keys=True) + "\n", encoding="utf-8")


def rebuild(inputs: Path, folder: Path, manifest: Mapping[str, object]) -> None:
    """The aggregate's tables, figures and conclusion from a stored inputs.json, into ``folder``."""
    data = json.loads(inputs.read_text(encoding="utf-8"))
    agg = aggregate(data["rows"], data.get("gains", ()), data.get("failed", ()))
    write_aggregate(agg, folder, manifest, int(data["n_jobs"]), inputs={k: v for k, v in data.items() if k != "n_jobs"})
