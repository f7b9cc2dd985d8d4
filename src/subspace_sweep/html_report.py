"""report.html (issue 33): one self-contained page per run or compare folder, read from the folder.

The page is a function of the folder's files alone (and of the manifest, passed in while the run
is still being written): the same folder gives the same bytes. Everything is inline (CSS, a
little JavaScript that only sorts tables, the PNG figures as data URIs) and a Content-Security-
Policy forbids every load that is not inline, so the file opens offline, copied anywhere. A file
the folder lacks (an old run, a run without ``--causal``) makes its section say so.

Each kind of folder is a ``Page``: a template under ``templates/`` and a context function over the
same helpers (``tsv_table``, ``figure``, ``markdown``, ``definitions``, ``provenance``) and the
same partials (``_macros.html.j2``). A study folder is one more ``Page`` (``PAGES["study"]``).

Tables are rendered generically: every column a TSV has is shown as it is (known columns first
where a reader expects them), every row of it, so a new column or a new kind of row appears
without a template change; cells keep the file's exact text in ``data-v`` (what sorting reads).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import polars as pl
from markdown_it import MarkdownIt
from markupsafe import Markup

from . import publish
from .errors import InputError

REPORT = "report.html"

# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Cell:
    raw: str  # the file's text ("" for an empty field): what sorting reads
    text: str  # what is shown
    link: str | None = None  # the anchor of a candidate's definition
    title: str = ""  # the definition itself, shown on hover


@dataclass(frozen=True)
class Column:
    name: str
    numeric: bool


@dataclass
class Table:
    id: str
    columns: list[Column]
    rows: list[list[Cell]]
    source: str = ""  # the file it came from
    note: str = ""
    label: str = ""  # which rows of the file (split_by)

    @property
    def n_rows(self) -> int:
        return len(self.rows)


#: Columns whose values are candidate names (linked to their definitions when they are one).
NAME_COLUMNS = ("candidate", "name", "best_candidate", "causal_winner")


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def fmt_number(x: float) -> str:
    """Short and exact enough to read: integers as integers, else 4 significant digits (an
    exponent only below 1e-4 or from 1e6)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    if abs(x) >= 1e6:
        return f"{x:.3e}"
    if abs(x) >= 1000:
        return f"{x:.1f}"
    return f"{x:.4g}"


def slug(name: str) -> str:
    """An id fragment for any name: letters, digits, ``_`` and ``-`` as they are, every other
    character as ``.`` and its code point (so distinct names give distinct ids)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else f".{ord(c):x}" for c in name)


def def_id(name: str) -> str:
    return f"def-{slug(name)}"


def read_tsv(path: Path, separator: str = "\t") -> pl.DataFrame | None:
    """Every field as the file's text (None when the file is missing)."""
    if not path.is_file():
        return None
    return pl.read_csv(path, separator=separator, infer_schema=False)


def tsv_table(frame: pl.DataFrame, id: str, *, first: Sequence[str] = (), drop_empty: bool = False,
              defs: Mapping[str, object] = {}, source: str = "", note: str = "") -> Table:
    """``frame`` (string columns) as a Table: the columns named in ``first`` that it has, then the
    rest in the file's order; ``drop_empty``: leave out columns empty in every row (for a group
    of rows of one kind)."""
    names = [c for c in first if c in frame.columns] + [c for c in frame.columns if c not in first]
    if drop_empty:
        names = [c for c in names if any(v not in ("", None) for v in frame[c].to_list())]
    values = {c: ["" if v is None else str(v) for v in frame[c].to_list()] for c in names}
    numeric = {c: bool(any(values[c])) and all(v == "" or _float(v) is not None for v in values[c]) for c in names}
    rows = []
    for i in range(frame.height):
        row = []
        for c in names:
            v = values[c][i]
            text = fmt_number(float(v)) if numeric[c] and v != "" else v
            linked = c in NAME_COLUMNS and v in defs
            row.append(Cell(v, text, def_id(v) if linked else None, getattr(defs[v], "text", "") if linked else ""))
        rows.append(row)
    return Table(id, [Column(c, numeric[c]) for c in names], rows, source, note)


def file_table(folder: Path, name: str, id: str, **kw) -> Table | None:
    frame = read_tsv(folder / name, "," if name.endswith(".csv") else "\t")
    return None if frame is None else tsv_table(frame, id, source=name, **kw)


def split_by(frame: pl.DataFrame, column: str, order: Sequence[str], id_prefix: str, *,
             first: Sequence[str] = (), defs: Mapping[str, object] = {}, source: str = "") -> list[Table]:
    """One table per value of ``column`` (known values in ``order`` first, then the others in the
    file's order), each without the columns its rows leave empty: new kinds of rows get their own
    table without a template change."""
    kinds = list(dict.fromkeys(frame[column].to_list()))
    kinds = [k for k in order if k in kinds] + [k for k in kinds if k not in order]
    tables = []
    for k in kinds:
        t = tsv_table(frame.filter(pl.col(column) == k), f"{id_prefix}-{slug(k)}", first=first, drop_empty=True,
                      defs=defs, source=source, note=f"the rows with {column} = {k}")
        t.label = k
        tables.append(t)
    return tables


# --------------------------------------------------------------------------- figures, text


@dataclass(frozen=True)
class Figure:
    name: str  # the file's name in the folder
    caption: str
    src: str | None  # a data URI, None when the file is missing


def figure(folder: Path, name: str, caption: str) -> Figure:
    path = folder / name
    if not path.is_file():
        return Figure(name, caption, None)
    return Figure(name, caption, "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"))


#: A paragraph or bullet of a conclusion that starts with one of these is a warning (highlighted).
WARNING_STARTS = ("Warning", "Outlier coordinates", "Caveat:", "It does NOT", "Verdict: the winner does NOT")


def _markdown() -> MarkdownIt:
    # html=False: a name or a path with <...> in a markdown file is text, never markup
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown(text: str, *, shift: int = 1, defs: Mapping[str, Definition] = {}) -> Markup:
    """Render a conclusion's markdown: headings ``shift`` levels down (the page has its own h1/h2),
    paragraphs and bullets that start with a ``WARNING_STARTS`` phrase get class ``warn``, and a
    `name` in code that is a candidate of ``defs`` links to its definition."""
    from markdown_it.token import Token

    md = _markdown()
    tokens = md.parse(text)
    for i, tok in enumerate(tokens):
        if tok.type in ("heading_open", "heading_close"):
            tok.tag = f"h{min(6, int(tok.tag[1]) + shift)}"
        if tok.type in ("paragraph_open", "list_item_open"):
            inline = next((t for t in tokens[i + 1:i + 3] if t.type == "inline"), None)
            if inline is not None and inline.content.startswith(WARNING_STARTS):
                tok.attrSet("class", "warn")
        if tok.type == "inline" and tok.children:
            children = []
            for child in tok.children:
                d = defs.get(child.content) if child.type == "code_inline" else None
                if d is None:
                    children.append(child)
                    continue
                children += [Token("link_open", "a", 1, attrs={"class": "cand", "href": f"#{d.id}", "title": d.text}),
                             child, Token("link_close", "a", -1)]
            tok.children = children
    return Markup(md.renderer.render(tokens, md.options, {}))


def sections(text: str) -> dict[str, str]:
    """A markdown text's ``## `` sections by title (the text before the first: key "")."""
    out: dict[str, list[str]] = {"": []}
    key = ""
    for line in text.splitlines():
        if line.startswith("## "):
            key = line[3:].strip()
            out[key] = []
        elif not line.startswith("# "):
            out[key].append(line)
    return {k: "\n".join(v).strip() for k, v in out.items()}


def _without_title(text: str) -> str:
    """A markdown text without its ``# `` title lines (the page's section has its own)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("# "))


def warnings_of(text: str) -> list[str]:
    """The warning paragraphs and bullets of a conclusion (``WARNING_STARTS``), as markdown."""
    out = []
    for block in re.split(r"\n\s*\n|\n(?=- )", text):
        line = block.strip().removeprefix("- ").strip()
        if line.startswith(WARNING_STARTS):
            out.append(line)
    return out


# --------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class Definition:
    name: str
    side: str
    family: str
    axis_kind: str
    expected_rank: str
    text: str

    @property
    def id(self) -> str:
        return def_id(self.name)


def parse_definitions(text: str) -> tuple[list[Definition], str]:
    """definitions.md's candidate table (``| `name` | side | family | axis_kind | expected rank |
    definition |``) as Definitions, and the rest of the file (its prose)."""
    defs, rest = [], []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|", 5)]
            if len(cells) == 6:
                defs.append(Definition(cells[0].strip("`"), *cells[1:5], cells[5]))
                continue
        if line.startswith(("| name | side", "|---|---|---|---|---|---|")):
            continue
        rest.append(line)
    return defs, "\n".join(rest)


def definitions(folders: Iterable[Path], names: Iterable[str], others: Iterable[str] = ()) -> tuple[dict[str, Definition], str]:
    """The definitions of the candidates ``names``: the run's own definitions.md first (what that
    run built), then the installed package's table for a name it lacks; of ``others`` (values of
    name columns that may or may not be candidates) those found there; and definitions.md's prose."""
    out: dict[str, Definition] = {}
    prose = ""
    for folder in folders:
        path = folder / "definitions.md"
        if path.is_file():
            defs, text = parse_definitions(path.read_text())
            prose = prose or text
            for d in defs:
                out.setdefault(d.name, d)
    wanted = [n for n in dict.fromkeys(names) if n]
    if any(n not in out for n in wanted):
        from .candidates import DEFINITIONS  # only when a folder lacks a name: it imports torch

        for spec in DEFINITIONS:
            if spec.name not in out:
                out[spec.name] = Definition(spec.name, spec.side, spec.family, spec.axis_kind, "",
                                            spec.definition + " (from the installed package's table)")
    shown = {*wanted, *others}
    return {n: d for n, d in out.items() if n in shown}, prose  # definitions.md's order (SPEC §4's)


# --------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Fact:
    key: str
    value: str


def _text(value: object) -> str:
    if isinstance(value, float):
        return fmt_number(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) if value else "—"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return "—" if value is None else str(value)


def facts(mapping: Mapping[str, object], skip: Iterable[str] = ()) -> list[Fact]:
    skip = set(skip)
    return [Fact(k, _text(v)) for k, v in sorted(mapping.items()) if k not in skip]


def provenance(manifest: Mapping[str, object], config: Mapping[str, object] | None, config_file: str) -> dict:
    """The manifest's facts, its package versions and timings apart; the settings (``config_file``)."""
    versions = manifest.get("package_versions") or {}
    timings = manifest.get("timings_s") or {}
    return {
        "facts": facts(manifest, skip=("package_versions", "timings_s")),
        "versions": facts(versions if isinstance(versions, dict) else {}),
        "timings": facts(timings if isinstance(timings, dict) else {}),
        "config": facts(config) if config else [],
        "config_file": config_file,
    }


def files_of(folder: Path) -> list[Fact]:
    """The folder's files and their sizes (named, not linked), but the report and the manifest
    (shown above; while a run is written it is not there yet)."""
    return [Fact(p.name, f"{p.stat().st_size:,} bytes") for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in (REPORT, publish.MANIFEST)]


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- the run page

#: The ranking's columns a reader asks for first; every other column of summary.tsv follows.
RANKING_FIRST = ("panel", "rank_in_panel", "rank_in_panel_std", "candidate", "family", "axis_kind", "sees", "side", "rank",
                 "joint_gain", "joint_gain_std", "gain_act", "gain_w_combined", "gain_act_std", "gain_w_combined_std",
                 "R_act", "R_act_lo", "R_act_hi", "z_act", "z_act_std", "R_w_combined", "z_w_combined",
                 "z_w_combined_std", "joint", "joint_lo", "joint_hi")
VIEW_COLUMNS = {
    "residual": ("rank_in_panel", "candidate", "sees", "rank", "joint_gain", "gain_act", "gain_w_combined", "z_act",
                 "z_w_combined"),
    "standardized": ("rank_in_panel_std", "candidate", "sees", "rank", "joint_gain_std", "gain_act_std", "gain_w_combined_std",
                     "z_act_std", "z_w_combined_std"),
}
CAUSAL_KINDS = ("strength", "calibration", "reference", "candidate", "oracle", "act_oracle", "random", "norm_only",
                "curve", "kl_trace")
CAUSAL_FIRST = ("kind", "name", "rank", "alpha", "alpha_minus", "kept", "z_kept", "null_kept_mean", "null_kept_sd", "ablated")
#: The files a run section shows; any other TSV of the folder gets a generic section.
RUN_TSVS = ("summary.tsv", "summary_pct.tsv", "specific_summary.tsv", "scope.tsv", "spectra.tsv", "readout.tsv",
            "causal.tsv")
TOP_VIEW = 10
SPECTRA_KS = (1, 2, 4, 8, 16, 32)


def _view(summary: pl.DataFrame, view: str, defs) -> Table:
    place = VIEW_COLUMNS[view][0]
    rows = summary.filter(pl.col("panel") == "joint") if "panel" in summary.columns else summary
    if place in rows.columns:
        rows = rows.with_columns(_p=pl.col(place).cast(pl.Float64, strict=False)).sort("_p", nulls_last=True,
                                                                                       maintain_order=True).drop("_p")
    cols = [c for c in VIEW_COLUMNS[view] if c in rows.columns]
    return tsv_table(rows.head(TOP_VIEW).select(cols), f"view-{view}", defs=defs, source="summary.tsv")


def spectra_summary(spectra: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """spectra.tsv in two tables: per layer and target, the participation rank and the top-k
    energy at k in ``SPECTRA_KS`` (one row, not 32); and the concentration rows
    (``*_top8_coordinates``) as they are."""
    conc = spectra.filter(pl.col("target").str.ends_with("_top8_coordinates"))
    conc = conc.select([c for c in ("layer", "target", "energy", "coordinates") if c in conc.columns])
    curves = spectra.filter(~pl.col("target").str.ends_with("_top8_coordinates"))
    keys = ["layer", "target"]
    base = curves.select(*keys, "participation_rank").unique(keys, keep="first", maintain_order=True)
    for k in SPECTRA_KS:
        at = curves.filter(pl.col("k") == str(k)).select(*keys, pl.col("energy").alias(f"energy_k{k}"))
        base = base.join(at, on=keys, how="left", maintain_order="left")
    return base, conc


@dataclass(frozen=True)
class Check:
    """One line of the page's head: a warning the run can raise, and whether it did."""

    topic: str
    status: str  # "ok", "warn" or "none" (not checked in this run)
    text: str


def _row(frame: pl.DataFrame | None, **match: str) -> dict | None:
    if frame is None or not set(match) <= set(frame.columns):
        return None
    rows = frame.filter(pl.all_horizontal([pl.col(k) == v for k, v in match.items()]))
    return rows.row(0, named=True) if rows.height else None


def checks(warnings: Sequence[str], parts: Mapping[str, str], causal: pl.DataFrame | None,
           concentration: pl.DataFrame | None) -> list[Check]:
    """The three warnings a reader looks for first (issue 33): the answer mass of the causal check,
    outlier coordinates, scope; from the conclusion's own warnings and the folder's tables."""
    out = []
    mass = next((w for w in warnings if w.startswith("Warning: the behaviour metric")), None)
    if causal is None:
        out.append(Check("Answer mass", "none", "no causal check in this run"))
    else:
        unsteered, steered = _row(causal, kind="reference", name="alpha_0"), _row(causal, kind="reference", name="w")
        numbers = (f"probability on the two answers {float(unsteered['mass_plus']):.2f} unsteered, "
                   f"{float(steered['mass_plus']):.2f} / {float(steered['mass_minus']):.2f} at α = "
                   f"±{fmt_number(float(steered['alpha']))}"
                   if unsteered and steered and {"mass_plus", "mass_minus", "alpha"} <= set(steered) else "")
        out.append(Check("Answer mass", "warn" if mass else "ok",
                         ("the steered model does not answer: see the warning" if mass else
                          "the behaviour metric reads an answer") + (f" ({numbers})" if numbers else "")))
    outlier = next((w for w in warnings if w.startswith("Outlier coordinates")), None)
    if outlier:
        out.append(Check("Outlier coordinates", "warn", "a few coordinates decide the residual view's shares: "
                                                        "see the warning and the standardized view"))
    elif concentration is not None and concentration.height and "energy" in concentration.columns:
        top = max(float(v) for v in concentration["energy"].to_list())
        out.append(Check("Outlier coordinates", "ok", f"no target holds more than 0.5 of its energy on 8 "
                                                      f"coordinates (largest share {fmt_number(top)})"))
    else:
        out.append(Check("Outlier coordinates", "none", "spectra.tsv has no concentration rows (an older run)"))
    scope = parts.get("Scope")
    if not scope:
        out.append(Check("Scope", "none", "no scope diagnostic in this run"))
    else:
        verdict = scope.rstrip(".").rsplit(". ", 1)[-1]
        out.append(Check("Scope", "ok" if "no scope artifact" in scope else "warn", verdict))
    return out


def run_context(folder: Path, manifest: Mapping[str, object] | None = None) -> dict:
    """What run.html.j2 shows of the run folder ``folder``."""
    manifest = manifest if manifest is not None else (_json(folder / publish.MANIFEST) or {})
    config = _json(folder / "config.json")
    summary = read_tsv(folder / "summary.tsv")
    causal = read_tsv(folder / "causal.tsv")
    readout = read_tsv(folder / "readout.tsv")
    names = summary["candidate"].to_list() if summary is not None and "candidate" in summary.columns else []
    others = [v for frame in (causal, readout) if frame is not None and "name" in frame.columns
              for v in frame["name"].to_list()]
    defs, prose = definitions([folder], names, others)
    conclusion_text = (folder / "conclusion.md").read_text() if (folder / "conclusion.md").is_file() else None
    parts = sections(conclusion_text) if conclusion_text is not None else {}

    ranking = tsv_table(summary, "ranking", first=RANKING_FIRST, defs=defs, source="summary.tsv") \
        if summary is not None else None
    best = {}
    if summary is not None:
        for view in VIEW_COLUMNS:
            best[view] = _view(summary, view, defs)
    pct = file_table(folder, "summary_pct.tsv", "summary-pct", defs=defs)

    causal_tables = split_by(causal, "kind", CAUSAL_KINDS, "causal", first=CAUSAL_FIRST, defs=defs,
                             source="causal.tsv") if causal is not None and "kind" in causal.columns else []
    spectra = read_tsv(folder / "spectra.tsv")
    spectra_tables, conc = [], None
    if spectra is not None and {"layer", "target", "k", "energy", "participation_rank"} <= set(spectra.columns):
        curves, conc = spectra_summary(spectra)
        spectra_tables = [tsv_table(conc, "concentration", source="spectra.tsv, targets *_top8_coordinates",
                                    note="energy = the share of each target's energy on its 8 largest residual "
                                         "coordinates (above 0.5: outlier coordinates decide the residual view's "
                                         "shares)"),
                          tsv_table(curves, "spectra", source="spectra.tsv",
                                    note=f"top-k energy at k = {', '.join(map(str, SPECTRA_KS))}; every k is "
                                         "in spectra.tsv")]
    elif spectra is not None:
        spectra_tables = [tsv_table(spectra, "spectra", source="spectra.tsv")]
    readout_tables = split_by(readout, "kind", ("layer", "candidate"), "readout", defs=defs, source="readout.tsv") \
        if readout is not None and "kind" in readout.columns else []
    others = [tsv_table(read_tsv(p), f"file-{slug(p.stem)}", defs=defs, source=p.name)
              for p in sorted(folder.glob("*.tsv")) if p.name not in RUN_TSVS]

    warnings = warnings_of(conclusion_text or "")
    model = str(manifest.get("model") or "?")
    delta = str(manifest.get("delta") or "?")
    return {
        "kind": "run",
        "title": f"{Path(model).name} × {Path(delta).name}",
        "folder": str(manifest.get("out") or folder),
        "manifest_missing": not manifest,
        "conclusion": markdown(_without_title(conclusion_text), defs=defs) if conclusion_text is not None else None,
        "warnings": [markdown(w, shift=0, defs=defs) for w in warnings],
        "checks": checks(warnings, parts, causal, conc),
        "verdict": markdown(parts["Causal check"], defs=defs) if parts.get("Causal check") else None,
        "scope_text": markdown(parts["Scope"]) if parts.get("Scope") else None,
        "ranking": ranking,
        "views": best,
        "pct": pct,
        "figures": {
            "heatmap": figure(folder, "per_layer_heatmap.png", "log2 R_act and log2 R_w_combined per candidate and "
                                                               "scored layer (0 = a random subspace); lines separate "
                                                               "the panels"),
            "scatter": figure(folder, "joint_act_weight_scatter.png", "R_act against R_w_combined, mean over the "
                                                                      "scored layers (log-log; null = 1)"),
            "causal": figure(folder, "causal_kept.png", "kept against R_w_combined with the random band, the "
                                                        "oracle starred; retention curves over k"),
            "spectra": figure(folder, "spectra.png", "top-k energy of each target, mean over the scored layers"),
            "readout": figure(folder, "readout.png", "token energy, logit lens and the candidates' share of the "
                                                     "Yes/No readout direction"),
        },
        "causal": causal_tables,
        "has_causal": causal is not None,
        "scope": file_table(folder, "scope.tsv", "scope"),
        "spectra": spectra_tables,
        "readout": readout_tables,
        "specific": file_table(folder, "specific_summary.tsv", "specific", defs=defs),
        "others": others,
        "definitions": list(defs.values()),
        "definitions_prose": markdown(prose) if prose.strip() else None,
        "provenance": provenance(manifest, config, "config.json"),
        "files": files_of(folder),
    }


# --------------------------------------------------------------------------- the compare page


@dataclass(frozen=True)
class RunLink:
    name: str
    path: str  # as the manifest records it
    href: str | None  # the run's report.html relative to the compare folder, None when it has none
    note: str = ""


def run_links(folder: Path, runs: Sequence[str]) -> list[RunLink]:
    """Each run folder's report.html by its path relative to ``folder`` (links survive copying the
    compare folder together with its runs)."""
    out = []
    for run in runs:
        path = Path(run)
        path = path if path.is_absolute() else (folder / path)
        report = path / REPORT
        rel = os.path.relpath(report, folder).replace(os.sep, "/")
        if report.is_file():
            out.append(RunLink(path.name, run, rel))
        else:
            out.append(RunLink(path.name, run, None, "no report.html there (an old run, or moved): "
                                                     f"subspace-sweep report {run} writes one"))
    return out


def compare_context(folder: Path, manifest: Mapping[str, object] | None = None) -> dict:
    """What compare.html.j2 shows of the compare folder ``folder``."""
    manifest = manifest if manifest is not None else (_json(folder / publish.MANIFEST) or {})
    settings = _json(folder / "compare_config.json")
    runs = [str(r) for r in manifest.get("runs") or (settings or {}).get("runs") or []]
    headline = read_tsv(folder / "headline.tsv")
    # One stability table and figure per ranking view (issue 35), in the order compare_config.json gives
    # (the view a reader should read first first: the standardized one where a run's outlier warning fired).
    views = [str(v) for v in (settings or {}).get("views") or ("residual",)]
    suffix = {"residual": "", "standardized": "_std"}
    stability, names = [], []
    for view in views:
        sfx = suffix.get(view, f"_{slug(view)}")
        summary = read_tsv(folder / f"compare_summary{sfx}.tsv")
        if summary is not None and "candidate" in summary.columns:
            names += summary["candidate"].to_list()
        stability.append({"view": view, "source": f"compare_summary{sfx}.tsv", "summary": summary,
                          "figure": figure(folder, f"compare_ranking{sfx}.png",
                                           f"{view} view: median joint gain per candidate over the runs, with IQR and "
                                           "min-max; stars pass the stability filter")})
    others = [v for c in ("best_candidate", "best_candidate_std", "causal_winner")
              if headline is not None and c in headline.columns for v in headline[c].to_list()]
    run_dirs = [Path(r) if Path(r).is_absolute() else folder / r for r in runs]
    defs, _ = definitions(run_dirs, names, others)
    for entry in stability:
        summary = entry.pop("summary")
        entry["table"] = (tsv_table(summary, f"ranking{suffix.get(entry['view'], '')}", first=("candidate", "stable"),
                                    defs=defs, source=entry["source"]) if summary is not None else None)
    known = {"headline.tsv", "rank_stability.tsv", "oracle_angles.tsv", *(e["source"] for e in stability)}
    summary_md = (folder / "compare.md").read_text(encoding="utf-8") if (folder / "compare.md").is_file() else None
    return {
        "kind": "compare",
        "title": f"{len(runs)} runs compared",
        "folder": str(manifest.get("out") or folder),
        "manifest_missing": not manifest,
        "runs": run_links(folder, runs),
        "summary": markdown(_without_title(summary_md), defs=defs) if summary_md is not None else None,
        "headline": tsv_table(headline, "headline", defs=defs, source="headline.tsv") if headline is not None else None,
        "stability": stability,
        "taus": file_table(folder, "rank_stability.tsv", "rank-stability"),
        "angles": file_table(folder, "oracle_angles.tsv", "oracle-angles"),
        "others": [tsv_table(read_tsv(p), f"file-{slug(p.stem)}", defs=defs, source=p.name)
                   for p in sorted(folder.glob("*.tsv")) if p.name not in known],
        "figures": {
            "headline": figure(folder, "headline.png", "per run: the best joint gain and the causal winner's kept"),
        },
        "definitions": list(defs.values()),
        "definitions_prose": None,
        "provenance": provenance(manifest, settings, "compare_config.json"),
        "files": files_of(folder),
    }


# --------------------------------------------------------------------------- the study page


def study_context(folder: Path, manifest: Mapping[str, object] | None = None) -> dict:
    """What study.html.j2 shows of a study's aggregate folder ``folder`` (``DIR/study``): its forest
    plot and heatmap first, the conclusion claim by claim, the tables, and each job's run report by
    its path relative to this folder (``../jobs/<model>/<family>/seed<N>/run/report.html``). Nothing
    here names the study's absolute path: the aggregate of a resumed study is byte for byte an
    uninterrupted one's, its report included."""
    manifest = manifest if manifest is not None else (_json(folder / publish.MANIFEST) or {})
    jobs = [str(j) for j in manifest.get("jobs") or []]
    finished = set(str(j) for j in manifest.get("finished") or [])
    links = []
    for job in jobs:
        report = folder.parent / "jobs" / job / "run" / REPORT
        href = f"../jobs/{job}/run/{REPORT}"
        if job in finished and report.is_file():
            links.append(RunLink(job, f"jobs/{job}/run", href))
        else:
            links.append(RunLink(job, f"jobs/{job}/run", None, "not finished (see the conclusion's list)"
                                 if job not in finished else "no report.html there"))
    per_job = read_tsv(folder / "per_job.tsv")
    winners = read_tsv(folder / "winners.tsv")
    names = [str(v) for frame, col in ((winners, "candidate"), (per_job, "winner"), (per_job, "best_share_candidate"))
             if frame is not None and col in frame.columns for v in frame[col].to_list() if v]
    run_dirs = [folder.parent / "jobs" / j / "run" for j in jobs if j in finished][:1]
    defs, _ = definitions(run_dirs, names)
    conclusion = (folder / "conclusion.md").read_text(encoding="utf-8") if (folder / "conclusion.md").is_file() else None
    known = {"claims.tsv", "across_families.tsv", "winners.tsv", "kendall.tsv", "per_job.tsv", "gain_w_combined.tsv",
             "gradients.tsv"}
    spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else None
    return {
        "kind": "study",
        "title": f"Study: {len(finished)} of {len(jobs)} jobs finished",
        "folder": "study/ (the aggregate of a study folder)",
        "manifest_missing": not manifest,
        "figures": {
            "forest": figure(folder, "forest.png", "what the base model predicts of the delta per model and family: "
                                                   "each seed, the mean and its 95% t-interval"),
            "heatmap": figure(folder, "heatmap.png", "families × candidates: gain_w_combined, the mean over seeds"),
        },
        "conclusion": markdown(_without_title(conclusion), defs=defs) if conclusion is not None else None,
        "claims": file_table(folder, "claims.tsv", "claims"),
        "across": file_table(folder, "across_families.tsv", "across-families"),
        "winners": tsv_table(winners, "winners", defs=defs, source="winners.tsv") if winners is not None else None,
        "kendall": file_table(folder, "kendall.tsv", "kendall"),
        "per_job": tsv_table(per_job, "per-job", first=("job",), defs=defs, source="per_job.tsv")
        if per_job is not None else None,
        "gains": file_table(folder, "gain_w_combined.tsv", "gains"),
        "gradients": file_table(folder, "gradients.tsv", "gradients"),
        "others": [tsv_table(read_tsv(p), f"file-{slug(p.stem)}", defs=defs, source=p.name)
                   for p in sorted(folder.glob("*.tsv")) if p.name not in known],
        "runs": links,
        "definitions": list(defs.values()),
        "definitions_prose": None,
        "provenance": provenance({k: v for k, v in manifest.items() if k != "spec"}, _flat(spec), "the spec"),
        "files": files_of(folder),
    }


def _flat(spec: Mapping[str, object] | None) -> dict[str, object] | None:
    """The study's spec as key → value facts (models one row each)."""
    if not spec:
        return None
    out: dict[str, object] = {}
    for key, value in spec.items():
        if key == "models" and isinstance(value, list):
            for m in value:
                out[f"model {m.get('slug', m.get('name'))}"] = json.dumps({k: v for k, v in m.items() if k != "slug"},
                                                                          sort_keys=True)
        else:
            out[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
    return out


# --------------------------------------------------------------------------- pages


@dataclass(frozen=True)
class Page:
    template: str
    context: Callable[[Path, Mapping[str, object] | None], dict]


#: One entry per kind of folder (its manifest's ``kind``): the same partials, its own sections.
PAGES: dict[str, Page] = {
    "run": Page("run.html.j2", run_context),
    "compare": Page("compare.html.j2", compare_context),
    "study": Page("study.html.j2", study_context),
}


def folder_kind(folder: Path) -> str:
    """"run", "compare" (or another ``PAGES`` key: the manifest's ``kind``), else an InputError."""
    manifest = folder / publish.MANIFEST
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder (give a run or compare folder written by subspace-sweep)")
    if not publish.has_tool_manifest(folder):
        raise InputError(f"{folder} is not a run or compare folder: no {publish.MANIFEST} of subspace-sweep "
                         f"({'it is not' if manifest.is_file() else 'there is none'}); a folder of runs holds one "
                         "per run: give each run folder")
    kind = (_json(manifest) or {}).get("kind") or ("run" if (folder / "summary.tsv").is_file() else None)
    if kind is None:
        raise InputError(f"{folder} is neither a run folder (it has no summary.tsv) nor a compare folder (its "
                         f"{publish.MANIFEST} names no kind)")
    if kind not in PAGES:
        raise InputError(f"{folder}: its {publish.MANIFEST} names a kind of folder this version has no report for "
                         f"({kind!r}; known: {', '.join(PAGES)})")
    return kind


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("subspace_sweep", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(folder: str | Path, *, kind: str | None = None, manifest: Mapping[str, object] | None = None) -> str:
    """The report of ``folder`` as one HTML string (``kind``/``manifest`` given while the folder
    is still being written, before its manifest.json exists)."""
    folder = Path(folder)
    kind = kind or folder_kind(folder)
    page = PAGES[kind]
    return _environment().get_template(page.template).render(**page.context(folder, manifest))


def write_into(folder: str | Path, *, kind: str, manifest: Mapping[str, object]) -> Path:
    """Write report.html into a folder being staged (publish.write_folder publishes it whole)."""
    path = Path(folder) / REPORT
    path.write_text(render(folder, kind=kind, manifest=manifest), encoding="utf-8")
    return path


def rebuild(folder: str | Path) -> Path:
    """(Re)write ``folder``'s report.html in place, atomically (a staged file renamed over it):
    ``subspace-sweep report FOLDER``."""
    folder = Path(folder).expanduser()
    html = render(folder, kind=folder_kind(folder))
    publish.recover(folder, REPORT)  # what a killed rebuild left (its staged file)
    return publish.write_file(folder / REPORT, lambda p: p.write_text(html, encoding="utf-8"), overwrite=True,
                              what="report")
