"""Issue 33 without a browser: report.html is a deterministic, escaped, self-contained function of
its folder; missing files make their sections say so; `subspace-sweep report FOLDER` rebuilds it
atomically and refuses (exit 2, one line, nothing written) what is not a run or compare folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from subspace_sweep import cli, html_report
from tests.helpers_report import html_table, outside_refs, references, tsv_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(demo_run, tmp_path):
    """A private copy of the demo run folder (tests change it)."""
    _, out = demo_run
    return Path(shutil.copytree(out, tmp_path / "run"))


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- what the page is


def test_every_run_folder_has_a_self_contained_report(demo_run):
    _, out = demo_run
    html = (out / "report.html").read_text()
    refs = references(html)
    assert sum(v.startswith("data:image/png;base64,") for _, _, v in refs) == len(list(out.glob("*.png")))
    assert outside_refs(html) == []
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    header, rows = html_table(html, "ranking")
    assert rows == tsv_rows(out / "summary.tsv", header)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings_s"]["report_html"] > 0


def test_the_self_containment_scan_finds_every_kind_of_outside_reference():
    page = ('<img src="data:image/png;base64,AA"><a href="#def-x">x</a><img src="fig.png">'
            '<link rel="stylesheet" href="https://cdn.example/x.css"><script src="x.js"></script>'
            '<div style="background: url(\'bg.png\')"></div><style>@import "y.css";</style><a href="../r/report.html">r</a>')
    bad = outside_refs(page, allowed_links={"../r/report.html"})
    assert {v for _, _, v in bad} == {"fig.png", "https://cdn.example/x.css", "x.js", "bg.png", '@import "y.css"'}
    assert ("a", "href", "../r/report.html") in outside_refs(page)  # a link is allowed only where named


def test_what_the_run_writes_is_what_report_rebuilds(run):
    """The run renders its report from the folder as written and the manifest in memory; the
    rebuild reads the same from the files (the manifest then also holds report.html's own time)."""
    written = (run / "report.html").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["timings_s"].pop("report_html")
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert html_report.render(run) == written


def test_the_report_is_a_function_of_the_folder(run, tmp_path):
    """Same folder, same bytes; a copy elsewhere gives the same bytes (nothing of the place it is
    read from, nor of the time, enters the page)."""
    first = html_report.render(run)
    assert html_report.render(run) == first
    copy = shutil.copytree(run, tmp_path / "elsewhere" / "copied")
    assert html_report.render(copy) == first


def test_the_report_command_rewrites_the_report_from_the_files(run, capsys):
    (run / "report.html").write_text("stale")
    assert cli.main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.html'}"
    assert (run / "report.html").read_text() == html_report.render(run)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging left
    assert oct((run / "report.html").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_names_and_markdown_are_escaped(run):
    evil = '<img src=x onerror="alert(1)">'
    summary = pl.read_csv(run / "summary.tsv", separator="\t", infer_schema=False)
    summary = summary.with_columns(candidate=pl.when(pl.col("candidate") == "mlp_write").then(pl.lit(evil))
                                   .otherwise(pl.col("candidate")))
    summary.write_csv(run / "summary.tsv", separator="\t")
    (run / "conclusion.md").write_text(f"# Conclusion\n\nBest: **`{evil}`** and <script>alert(2)</script>\n")
    (run / "definitions.md").write_text((run / "definitions.md").read_text().replace("`mlp_write`", f"`{evil}`"))
    html = html_report.render(run)
    assert "<script>alert" not in html and "<img src=x" not in html and 'onerror="' not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html  # in the table and the glossary
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in html  # markdown's raw HTML is text
    assert outside_refs(html) == []
    header, rows = html_table(html, "ranking")
    assert rows == tsv_rows(run / "summary.tsv", header)
    anchor = html_report.def_id(evil)
    assert f'href="#{anchor}"' in html and f'id="{anchor}"' in html and all(c not in anchor for c in '<>" =')


OPTIONAL = ["causal.tsv", "scope.tsv", "spectra.tsv", "readout.tsv", "specific_summary.tsv", "summary_pct.tsv",
            "conclusion.md", "per_layer_heatmap.png", "joint_act_weight_scatter.png", "spectra.png", "readout.png",
            "manifest.json", "config.json"]


def test_an_old_run_without_its_newer_files_reports_what_it_has(run, capsys):
    """The demo has no causal check (its section says so); an old run lacks the diagnostics,
    figures, conclusion, definitions, even its config: every section says what is missing."""
    html = html_report.render(run)
    assert "causal.tsv is not in this folder: this run had no causal check" in html
    for name in [*OPTIONAL, "definitions.md"]:
        if name != "manifest.json":
            (run / name).unlink(missing_ok=True)
    assert cli.main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    for name in OPTIONAL:
        if name not in ("manifest.json", "causal.tsv"):
            assert f"{name} is not in this folder" in html, name
    header, rows = html_table(html, "ranking")
    assert rows == tsv_rows(run / "summary.tsv", header)
    assert "from the installed package" in html  # the definitions fall back to the package's table


def test_new_columns_rows_and_files_appear_without_a_template_change(run):
    """Other engineers add files (pair.tsv), causal rows (kind calibration) and columns: each is
    shown as it is."""
    summary = pl.read_csv(run / "summary.tsv", separator="\t", infer_schema=False)
    summary.with_columns(new_score=pl.lit("0.5")).write_csv(run / "summary.tsv", separator="\t")
    pl.DataFrame({"kind": ["strength", "calibration", "calibration"], "name": ["w", "mlp_write", "x"],
                  "alpha": ["1", "0.5", "0.25"], "kept": ["", "0.9", "0.1"], "new_col": ["", "a", "b"]}) \
        .write_csv(run / "causal.tsv", separator="\t")
    pl.DataFrame({"layer": ["8", "9"], "cos_pos_neg": ["0.1", "0.2"]}).write_csv(run / "pair.tsv", separator="\t")
    html = html_report.render(run)
    header, rows = html_table(html, "ranking")
    assert "new_score" in header and rows == tsv_rows(run / "summary.tsv", header)
    header, rows = html_table(html, "causal-calibration")
    assert header == ["kind", "name", "alpha", "kept", "new_col"] and rows[0] == ["calibration", "mlp_write", "0.5",
                                                                                    "0.9", "a"]
    assert html_table(html, "causal-strength")[0] == ["kind", "name", "alpha"]  # its empty columns left out
    assert html_table(html, "file-pair") == (["layer", "cos_pos_neg"], [["8", "0.1"], ["9", "0.2"]])
    assert 'href="#def-mlp_write"' in html.split('id="causal-calibration"')[1].split("</table>")[0]


def test_numbers_are_shown_short_and_sorted_by_the_files_text(run):
    assert [html_report.fmt_number(x) for x in (8.0, 0.765373, 42.174458, 1234.5, 2.12e-4, 1e-5, 2.5e7 + 0.5, float("nan"),
                                                -3.0)] == \
        ["8", "0.7654", "42.17", "1234.5", "0.000212", "1e-05", "2.500e+07", "nan", "-3"]
    html = html_report.render(run)
    first = pl.read_csv(run / "summary.tsv", separator="\t", infer_schema=False).row(0, named=True)
    assert f'data-v="{first["joint_gain"]}" class="num">{html_report.fmt_number(float(first["joint_gain"]))}<' in html


# ----------------------------------------------------------------------------- the command


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("subspace-sweep report: error: "), err
    return err


@pytest.mark.parametrize("case", ["absent", "file", "empty", "foreign_manifest", "no_summary", "folder_of_runs",
                                  "unknown_kind"])
def test_report_refuses_what_is_not_a_run_or_compare_folder(case, run, tmp_path, capsys):
    target = tmp_path / "target"
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        target.mkdir()
    elif case == "foreign_manifest":
        target.mkdir()
        (target / "manifest.json").write_text(json.dumps({"package_versions": {"other-tool": "1"}}))
        (target / "summary.tsv").write_text("a\n1\n")
    elif case == "no_summary":
        shutil.copytree(run, target)
        (target / "summary.tsv").unlink()
    elif case == "folder_of_runs":
        target.mkdir()
        shutil.copytree(run, target / "a")
        shutil.copytree(run, target / "b")
    elif case == "unknown_kind":
        shutil.copytree(run, target)
        manifest = json.loads((target / "manifest.json").read_text())
        (target / "manifest.json").write_text(json.dumps({**manifest, "kind": "future"}))
    before = _listing(target) if target.is_dir() else None
    assert cli.main(["report", str(target)]) == cli.EXIT_BAD_INPUT
    assert str(target) in _one_error(capsys)
    assert (_listing(target) if target.is_dir() else None) == before


def test_a_killed_rebuild_leaves_the_old_report_and_the_next_one_cleans_up(run, tmp_path):
    """The rebuild is staged beside report.html and renamed over it: killed when its file is
    staged, the old report is intact; the next `report` removes the staging and writes."""
    old = (run / "report.html").read_bytes()
    (run / "conclusion.md").write_text("# Conclusion\n\nChanged.\n")
    signal_file = tmp_path / "staged"
    env = {**os.environ, "SUBSPACE_SWEEP_TEST_PAUSE": f"file_staged={signal_file}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "subspace_sweep.cli", "report", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        staged = [p for p in run.iterdir() if p.name.startswith(".report.html.stage-")]
        assert len(staged) == 1 and b"Changed." in staged[0].read_bytes()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (run / "report.html").read_bytes() == old
    assert cli.main(["report", str(run)]) == 0
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert "Changed." in (run / "report.html").read_text()


def test_a_compare_folder_reports_its_tables_and_links_its_runs(run, tmp_path, capsys):
    runs = [shutil.copytree(run, tmp_path / "runs" / n) for n in ("seed_a", "seed_b")]
    shutil.rmtree(run)
    (runs[1] / "report.html").unlink()  # an old run: named, with the command that writes its report
    out = tmp_path / "cmp"
    assert cli.main(["compare", *map(str, runs), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert outside_refs(html, allowed_links={"../runs/seed_a/report.html"}) == []
    assert 'href="../runs/seed_a/report.html"' in html
    assert f"no report.html there (an old run, or moved): subspace-sweep report {runs[1].resolve()} writes one" in html
    for name, id in (("compare_summary.tsv", "ranking"), ("compare_summary_std.tsv", "ranking_std"),
                     ("headline.tsv", "headline"), ("rank_stability.tsv", "rank-stability"),
                     ("oracle_angles.tsv", "oracle-angles")):
        header, rows = html_table(html, id)
        assert rows == tsv_rows(out / name, header), name
    # both views' stability figures and the headline's, each inline
    assert html.count("data:image/png;base64,") == len(list(out.glob("*.png"))) == 3
    assert "residual view" in html and "standardized view" in html
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0 and (out / "report.html").read_text() == html


def test_the_templates_ship_as_package_data():
    """Every file of templates/ is matched by pyproject's package-data (an installed wheel has them)."""
    import tomllib
    from fnmatch import fnmatch

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["subspace_sweep"]
    package = Path(html_report.__file__).parent
    files = [p.relative_to(package).as_posix() for p in (package / "templates").iterdir() if p.is_file()]
    assert len(files) >= 6 and [f for f in files if not any(fnmatch(f, g) for g in globs)] == []
