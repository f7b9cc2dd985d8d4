"""Beyond one run: stability of the ranking across runs of the same model with different deltas
(e.g. LoRA seeds). Reads run folders; writes one compare folder atomically.

Per A-side candidate: median, IQR, min and max over runs of the oracle gains (joint, act,
combined weight), R_act, R_w_combined and z_w_combined; how often it is in the joint top-k; a
stability filter (top-k in at least m of the n runs AND z_w_combined > z_min in every run),
ordered rank-fairly by the median joint gain (SPEC §5). Between runs: Kendall τ of the joint
rankings and the principal angles between the runs' weight oracles.

Both ranking views (issue 35): the residual view (``joint_gain``) and the standardized one
(``joint_gain_std``, SPEC §5 concern 14: each coordinate in units of its own scale), each with its
stability table, Kendall τ and headline columns. The standardized view comes first where a run's
outlier-coordinate warning fired (``outlier_warning``: its spectra.tsv or conclusion.md); run
folders written before the standardized columns existed are compared in the residual view, and
the comparison says so.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import scipy.stats

from . import html_report, linalg, publish, report
from .errors import InputError
from .figures import save_png_pdf
from .provenance import package_versions

STATS = ("joint_gain", "gain_act", "gain_w_combined", "R_act", "R_w_combined", "z_w_combined", "joint")
RUN_FILES = ("summary.tsv", "config.json", "manifest.json", "weight_oracles.safetensors")


@dataclass(frozen=True)
class View:
    """The summary.tsv columns one ranking view reads (SPEC §5)."""

    name: str
    joint: str  # the joint oracle gain the view ranks by
    place: str  # the run's place of each candidate in its panel
    z_w: str  # the weight axis' Stouffer z of the stability filter
    stats: tuple[str, ...]  # summarised over runs (median, IQR, min, max)
    suffix: str  # of the compare folder's per-view files


VIEWS = {
    "residual": View("residual", "joint_gain", "rank_in_panel", "z_w_combined", STATS, ""),
    "standardized": View("standardized", "joint_gain_std", "rank_in_panel_std", "z_w_combined_std",
                         ("joint_gain_std", "gain_act_std", "gain_w_combined_std", "z_act_std", "z_w_combined_std"),
                         "_std"),
}
#: The marker of the outlier-coordinate warning in a run's conclusion.md (``outliers.warning_line``).
OUTLIER_WARNING_MARK = "Outlier coordinates (SPEC §6 concern 14)"


@dataclass(frozen=True)
class Run:
    name: str
    path: Path
    summary: pl.DataFrame  # the run's summary.tsv
    config: dict
    manifest: dict
    oracles: dict[int, dict[str, object]]
    outlier_warning: bool | None = None  # did the run's outlier-coordinate warning fire (None: not recorded)

    @property
    def joint_order(self) -> list[str]:
        return self.order("residual")

    def order(self, view: str) -> list[str]:
        """The joint ranking of ``view`` (its panel places), best first."""
        return self.summary.filter(pl.col("panel") == "joint").sort(VIEWS[view].place)["candidate"].to_list()

    def has_view(self, view: str) -> bool:
        return has_view_columns(self.summary.columns, view)


def has_view_columns(columns: Sequence[str], view: str) -> bool:
    """Whether a summary.tsv with these columns holds ``view``'s (runs written before the
    standardized view existed do not)."""
    v = VIEWS[view]
    return {v.joint, v.place, v.z_w, *v.stats} <= set(columns)


def outlier_warning(path: Path) -> bool | None:
    """Whether the run's outlier-coordinate warning (SPEC §6 concern 14) fired: a share above
    ``outliers.OUTLIER_SHARE`` on the top-8 coordinates of the activation or combined weight target
    at any scored layer (spectra.tsv's rows ``act_top8_coordinates``, ``combined_top8_coordinates``),
    or the warning's line in conclusion.md (either suffices: the tsv rounds the share to 6 digits).
    None when neither records it (a run folder written before the diagnostic existed)."""
    from .outliers import OUTLIER_SHARE, TOP_COORDINATES

    found: bool | None = None
    spectra = path / "spectra.tsv"
    if spectra.is_file():
        rows = pl.read_csv(spectra, separator="\t", infer_schema_length=None).filter(
            pl.col("target").is_in([f"act_top{TOP_COORDINATES}_coordinates",
                                    f"combined_top{TOP_COORDINATES}_coordinates"]))
        if rows.height:
            found = bool((rows["energy"].cast(pl.Float64) > OUTLIER_SHARE).any())
    conclusion = path / "conclusion.md"
    if conclusion.is_file() and OUTLIER_WARNING_MARK in conclusion.read_text(encoding="utf-8", errors="replace"):
        found = True
    return found


def load_run(path: str | Path) -> Run:
    path = Path(path)
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise InputError(f"{path} is not a complete run folder: missing {', '.join(missing)}")
    return Run(
        name=path.name,
        path=path,
        summary=pl.read_csv(path / "summary.tsv", separator="\t"),
        config=json.loads((path / "config.json").read_text()),
        manifest=json.loads((path / "manifest.json").read_text()),
        oracles=report.load_oracles(path / "weight_oracles.safetensors"),
        outlier_warning=outlier_warning(path),
    )


def _check_comparable(runs: list[Run]) -> None:
    if len(runs) < 2:
        raise InputError(f"compare needs at least 2 runs, got {len(runs)}")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise InputError(f"run folders must have distinct names, got {names}")
    first = runs[0]
    for run in runs[1:]:
        pairs = [("model_sha256", first.manifest.get("model_sha256"), run.manifest.get("model_sha256"))]
        pairs += [(key, first.config.get(key), run.config.get(key)) for key in ("r", "n_fit", "label")]
        for key, a, b in pairs:
            if a != b:
                raise InputError(f"runs {first.name} and {run.name} differ in {key!r} ({a!r} vs {b!r}): not comparable")


def kendall_tau(order_a: list[str], order_b: list[str]) -> float:
    """Kendall τ-b between two rankings over their common items."""
    common = [c for c in order_a if c in set(order_b)]
    if len(common) < 2:
        return math.nan
    pos_b = {c: i for i, c in enumerate(order_b)}
    return float(scipy.stats.kendalltau(range(len(common)), [pos_b[c] for c in common]).statistic)


@dataclass
class Comparison:
    per_candidate: pl.DataFrame  # the residual view's stability table
    taus: pl.DataFrame  # Kendall τ per pair of runs: kendall_tau (residual), kendall_tau_std (standardized)
    angles: pl.DataFrame
    runs: list[str]
    headline: pl.DataFrame | None = None  # one row per run (e.g. per adapter family), SPEC §10
    per_candidate_std: pl.DataFrame | None = None  # the standardized view's; None when a run lacks its columns
    views: tuple[str, ...] = ("residual",)  # the views compared, the one to read first first
    notes: tuple[str, ...] = ()  # why the order is what it is, or why a view is missing

    def table(self, view: str) -> pl.DataFrame | None:
        return self.per_candidate if view == "residual" else self.per_candidate_std

    def stable(self, view: str) -> list[str]:
        table = self.table(view)
        return [] if table is None else [r["candidate"] for r in table.iter_rows(named=True) if r["stable"]]


HEADLINE_SCHEMA = {
    "run": pl.String, "best_candidate": pl.String, "best_rank": pl.Float64, "best_joint_gain": pl.Float64,
    "best_gain_act": pl.Float64, "best_gain_w_combined": pl.Float64, "overlap_w_cumulative": pl.Float64,
    "overlap_w_local": pl.Float64, "scope_verdict": pl.String, "causal_winner": pl.String, "kept": pl.Float64,
    "z_kept": pl.Float64,
    # the standardized view's best (SPEC §5 concern 14) and whether the run's outlier warning fired
    "outlier_warning": pl.Boolean, "best_candidate_std": pl.String, "best_rank_std": pl.Float64,
    "best_joint_gain_std": pl.Float64, "best_gain_act_std": pl.Float64, "best_gain_w_combined_std": pl.Float64,
}


def headline_table(runs: list[Run]) -> pl.DataFrame:
    """The cross-adapter headline (SPEC §10), one row per run in the order given: the joint
    ranking's best A-side write/mixed candidate and its gains, the mean weight-oracle overlaps with
    the two label oracles and the scope verdict (scope.tsv), the causal winner's kept and z
    (causal.tsv, when the run had --causal); whether the run's outlier warning fired and the
    standardized view's best with its gains (empty for a run without the standardized columns)."""
    from .diagnostics import scope_verdict_code

    rows = []
    for run in runs:
        joint = run.summary.filter((pl.col("panel") == "joint") & pl.col("axis_kind").is_in(["write", "mixed"]))
        best = joint.sort("rank_in_panel").row(0, named=True)
        row = {"run": run.name, "best_candidate": best["candidate"], "best_rank": best["rank"],
               "best_joint_gain": best["joint_gain"], "best_gain_act": best["gain_act"],
               "best_gain_w_combined": best["gain_w_combined"], "outlier_warning": run.outlier_warning}
        if run.has_view("standardized"):
            std = joint.sort("rank_in_panel_std").row(0, named=True)
            row.update(best_candidate_std=std["candidate"], best_rank_std=std["rank"],
                       best_joint_gain_std=std["joint_gain_std"], best_gain_act_std=std["gain_act_std"],
                       best_gain_w_combined_std=std["gain_w_combined_std"])
        scope_path, causal_path = run.path / "scope.tsv", run.path / "causal.tsv"
        if scope_path.is_file():
            scope = pl.read_csv(scope_path, separator="\t")
            row.update(overlap_w_cumulative=float(scope["overlap_w_cumulative"].mean()),
                       overlap_w_local=float(scope["overlap_w_local"].mean()), scope_verdict=scope_verdict_code(scope))
        if causal_path.is_file():
            causal = pl.read_csv(causal_path, separator="\t").filter(pl.col("kind") == "candidate")
            if causal.height:
                win = causal.row(0, named=True)
                row.update(causal_winner=win["name"], kept=win["kept"], z_kept=win["z_kept"])
        rows.append({c: row.get(c) for c in HEADLINE_SCHEMA})
    return pl.DataFrame(rows, schema=HEADLINE_SCHEMA)


def headline_figure(headline: pl.DataFrame, path_png: Path, path_pdf: Path) -> None:
    """Bars per run: the best joint gain, and the causal winner's kept where there is one."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * headline.height + 2), 4.5))
    x = np.arange(headline.height)
    ax.bar(x - 0.2, headline["best_joint_gain"].fill_null(np.nan).to_numpy(), width=0.4, label="best joint gain")
    kept = headline["kept"].fill_null(np.nan).to_numpy()
    if np.isfinite(kept).any():
        ax.bar(x + 0.2, kept, width=0.4, label="causal winner's kept")
    labels = [f"{r['run']}\n{r['best_candidate']}" for r in headline.iter_rows(named=True)]
    ax.set_xticks(x, labels, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("oracle gain / kept")
    ax.set_title("Across adapters: does one subspace explain them all?", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.25, axis="y")
    fig.tight_layout()
    save_png_pdf(fig, path_png, path_pdf, dpi=140)


def compare_runs(runs: list[Run], *, top_k: int = 5, min_runs: int | None = None, z_min: float = 2.0) -> Comparison:
    _check_comparable(runs)
    n = len(runs)
    m = min_runs if min_runs is not None else math.ceil(n / 2)
    if not 1 <= m <= n:
        raise InputError(f"--min-runs must be in 1..{n}, got {m}")
    if top_k < 1:
        raise InputError(f"--top-k must be positive, got {top_k}")
    views, notes = compared_views(runs)
    tables = {view: stability_table(runs, VIEWS[view], top_k=top_k, min_runs=m, z_min=z_min) for view in views}
    taus = pl.DataFrame(
        [{"run_a": a.name, "run_b": b.name, "kendall_tau": kendall_tau(a.order("residual"), b.order("residual")),
          "kendall_tau_std": (kendall_tau(a.order("standardized"), b.order("standardized"))
                              if "standardized" in views else None)}
         for a, b in itertools.combinations(runs, 2)],
        schema={"run_a": pl.String, "run_b": pl.String, "kendall_tau": pl.Float64, "kendall_tau_std": pl.Float64},
    )
    rows = []
    for a, b in itertools.combinations(runs, 2):
        for layer in sorted(set(a.oracles) & set(b.oracles)):
            for target in sorted(set(a.oracles[layer]) & set(b.oracles[layer])):
                cos = linalg.principal_cosines(a.oracles[layer][target], b.oracles[layer][target])
                rows.append({"run_a": a.name, "run_b": b.name, "layer": layer, "target": target,
                             "cos_mean": float(cos.mean()) if cos.numel() else math.nan,
                             "cos_min": float(cos.min()) if cos.numel() else math.nan})
    angles = pl.DataFrame(rows, schema={"run_a": pl.String, "run_b": pl.String, "layer": pl.Int64,
                                        "target": pl.String, "cos_mean": pl.Float64, "cos_min": pl.Float64})
    return Comparison(per_candidate=tables["residual"], taus=taus, angles=angles, runs=[r.name for r in runs],
                      headline=headline_table(runs), per_candidate_std=tables.get("standardized"), views=views,
                      notes=tuple(notes))


def compared_views(runs: list[Run]) -> tuple[tuple[str, ...], list[str]]:
    """The views to compare, the one to read first first, and notes saying why: the standardized
    view first where any run's outlier warning fired; only the residual view when a run has no
    standardized columns (written before them)."""
    notes = []
    without = [r.name for r in runs if not r.has_view("standardized")]
    fired = [r.name for r in runs if r.outlier_warning]
    unknown = [r.name for r in runs if r.outlier_warning is None]
    if without:
        notes.append(f"The standardized view is not compared: run(s) {', '.join(without)} have no standardized "
                     "columns (joint_gain_std, rank_in_panel_std: written before them); only the residual view is.")
        if fired:
            notes.append(f"The outlier-coordinate warning fired in run(s) {', '.join(fired)}: the residual view "
                         "compared here is the one a few coordinates decide; rerun them to compare the standardized one.")
        return ("residual",), notes
    if fired:
        notes.append(f"The standardized view comes first: the outlier-coordinate warning (SPEC §6 concern 14) fired in "
                     f"run(s) {', '.join(fired)}, whose residual view a few coordinates decide.")
        views = ("standardized", "residual")
    else:
        views = ("residual", "standardized")
    if unknown:
        notes.append(f"Run(s) {', '.join(unknown)} record no outlier-coordinate diagnostic (spectra.tsv without "
                     "top-8 rows, no warning in conclusion.md): whether it would fire there is not known.")
    return views, notes


def stability_table(runs: list[Run], view: View, *, top_k: int, min_runs: int, z_min: float) -> pl.DataFrame:
    """Per A-side candidate in ``view``: median, IQR, min and max of its stats over runs, how often
    it is in the view's joint top-k, the stability filter (top-k in ≥ ``min_runs`` runs and the
    view's z_w_combined > ``z_min`` in every run), ordered rank-fairly by the median joint gain."""
    n = len(runs)
    a_side = [r.summary.filter(pl.col("side") == "A").with_columns(run=pl.lit(r.name)) for r in runs]
    long = pl.concat([f.select("run", "candidate", "family", "axis_kind", "panel", "rank", *view.stats) for f in a_side])
    top = {r.name: set(r.order(view.name)[:top_k]) for r in runs}
    aggs = []
    for stat in view.stats:
        col = pl.col(stat).cast(pl.Float64)
        aggs += [col.median().alias(f"{stat}_median"),
                 (col.quantile(0.75, "linear") - col.quantile(0.25, "linear")).alias(f"{stat}_iqr"),
                 col.min().alias(f"{stat}_min"), col.max().alias(f"{stat}_max")]
    z_in_every = (pl.col(view.z_w).cast(pl.Float64) > z_min).all().alias("z_w_above_min_in_every_run")
    per = long.group_by("candidate", maintain_order=True).agg(
        pl.col("family").first(), pl.col("axis_kind").first(), pl.col("panel").first(),
        pl.col("rank").cast(pl.Float64).median(), pl.len().alias("n_runs"), z_in_every, *aggs,
    )
    in_top = [sum(c in top[r.name] for r in runs) for c in per["candidate"]]
    per = per.with_columns(**{f"in_top{top_k}": pl.Series(in_top)}).with_columns(
        stable=(pl.col(f"in_top{top_k}") >= min_runs) & pl.col("z_w_above_min_in_every_run") & (pl.col("n_runs") == n)
    )
    return report.rank_fair_order(per, f"{view.joint}_median", f"{view.z_w}_median")


def ranking_figure(per: pl.DataFrame, path_png: Path, path_pdf: Path, top: int = 25, view: View = VIEWS["residual"]
                   ) -> None:
    """Median joint oracle gain of ``view`` per A-side write/mixed candidate with min-max and IQR bars."""
    rows = per.filter(pl.col("panel") == "joint").head(top)
    y = np.arange(rows.height)[::-1]
    g = view.joint
    med = rows[f"{g}_median"].to_numpy()
    fig, ax = plt.subplots(figsize=(9, 0.3 * rows.height + 1.8))
    lo, hi = rows[f"{g}_min"].to_numpy(), rows[f"{g}_max"].to_numpy()
    ax.hlines(y, lo, hi, color="grey", linewidth=1, label="min-max over runs")
    ax.errorbar(med, y, xerr=rows[f"{g}_iqr"].to_numpy() / 2, fmt="o", color="C0", capsize=3,
                label="median ± IQR/2")
    stable = rows["stable"].to_numpy()
    ax.scatter(med[stable], y[stable], marker="*", s=120, color="C3", zorder=5, label="passes the stability filter")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=0.8)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yticks(y, rows["candidate"].to_list(), fontsize=8)
    std = view.suffix
    ax.set_xlabel(f"joint oracle gain √(max(gain_act{std},0)·max(gain_w_combined{std},0)) (random = 0, oracle = 1)")
    ax.set_title("Ranking stability across runs (A-side write + mixed)"
                 + ("" if view.name == "residual" else ", standardized view"))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.25, axis="x", which="both")
    fig.tight_layout()
    save_png_pdf(fig, path_png, path_pdf, dpi=140)


def comparison_markdown(cmp: Comparison) -> str:
    """compare.md: the views in the order to read them, each with its stable candidates, the
    median Kendall τ and every run's best candidate; the notes on the order first."""
    lines = ["# Comparison", "", f"Runs: {', '.join(cmp.runs)}.", ""]
    lines += [*(f"- {note}" for note in cmp.notes), *([""] if cmp.notes else [])]
    for view in cmp.views:
        v = VIEWS[view]
        taus = cmp.taus[f"kendall_tau{v.suffix}"].drop_nulls().drop_nans()
        stable = cmp.stable(view)
        lines += [f"## The {view} view (`{v.joint}`, `compare_summary{v.suffix}.tsv`)", "",
                  f"Stable candidates: {', '.join(f'`{c}`' for c in stable) if stable else 'none'}.  ",
                  f"Kendall τ of the joint rankings, median over {cmp.taus.height} pair(s) of runs: "
                  f"{float(taus.median()):.3f}." if taus.len() else "Kendall τ: not defined.", ""]
        if cmp.headline is not None:
            best, gain = (("best_candidate", "best_joint_gain") if view == "residual" else
                          ("best_candidate_std", "best_joint_gain_std"))
            lines += [f"- `{r['run']}`: best `{r[best]}` ({v.joint} = {r[gain]:.3f})"
                      for r in cmp.headline.iter_rows(named=True) if r[best] is not None]
            lines.append("")
    return "\n".join(lines)


def write_comparison(cmp: Comparison, out: str | Path, *, overwrite: bool, settings: dict,
                     snapshot: publish.Snapshot | None = None, run_paths: list[str] | None = None) -> Path:
    """Write the compare folder (report.html included) and publish it as ``out``
    (``publish.write_folder``); its manifest.json (written last) makes it a folder ``--overwrite``
    may replace. Per view: its stability table (``compare_summary.tsv``, ``compare_summary_std.tsv``)
    and figure; both views' Kendall τ in rank_stability.tsv and best candidates in headline.tsv;
    compare.md in the order to read them."""
    if snapshot is None:
        snapshot = publish.check_destination(out, overwrite=overwrite)

    def fill(tmp: Path) -> None:
        (tmp / "compare_config.json").write_text(json.dumps({"runs": cmp.runs, **settings, "views": list(cmp.views),
                                                             "notes": list(cmp.notes)}, indent=2) + "\n")
        for view in cmp.views:
            v = VIEWS[view]
            cmp.table(view).write_csv(tmp / f"compare_summary{v.suffix}.tsv", separator="\t", float_precision=6)
            ranking_figure(cmp.table(view), tmp / f"compare_ranking{v.suffix}.png",
                           tmp / f"compare_ranking{v.suffix}.pdf", view=v)
        cmp.taus.write_csv(tmp / "rank_stability.tsv", separator="\t", float_precision=6)
        cmp.angles.write_csv(tmp / "oracle_angles.tsv", separator="\t", float_precision=6)
        if cmp.headline is not None:
            cmp.headline.write_csv(tmp / "headline.tsv", separator="\t", float_precision=6)
            headline_figure(cmp.headline, tmp / "headline.png", tmp / "headline.pdf")
        (tmp / "compare.md").write_text(comparison_markdown(cmp), encoding="utf-8")
        manifest = {"package_versions": package_versions(), "kind": "compare", "out": str(snapshot.path),
                    "runs": [str(Path(p).expanduser().resolve()) for p in (run_paths or cmp.runs)]}
        html_report.write_into(tmp, kind="compare", manifest=manifest)  # links the runs' reports
        (tmp / publish.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    return publish.write_folder(out, fill, overwrite=overwrite, snapshot=snapshot)
