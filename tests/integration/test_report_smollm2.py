"""Issue 33 on the real run: the SmolLM2-135M-Instruct run folder's report.html (the session's
`smol_run`, --causal 1 --causal-null 5): its size and writing time against the targets, and the
page in headless Chromium (figures decode, the ranking is summary.tsv's and sorts, names open their
definitions, the causal check's tables are there, nothing is loaded)."""

from __future__ import annotations

import json

import pytest

from tests.helpers_report import Browser, browser_unavailable, check_definition_link, check_ranking, \
    check_self_contained, check_sorting, html_table, image_widths, tsv_rows

pytestmark = pytest.mark.integration

MAX_BYTES = 3 * 2**20  # issue 33: at most 3 MB
MAX_SHARE = 0.05  # and at most 5% of the run's time


def test_the_real_runs_report_is_small_and_quick(smol_run):
    _, out = smol_run
    size = (out / "report.html").stat().st_size
    timings = json.loads((out / "manifest.json").read_text())["timings_s"]
    # the run's parts (candidates_b_side is a part of candidates; report_html is what is measured)
    run_s = sum(v for k, v in timings.items() if k not in ("report_html", "candidates_b_side"))
    print(f"report.html: {size / 2**20:.2f} MiB, written in {timings['report_html']:.2f} s of a {run_s:.0f} s run "
          f"({100 * timings['report_html'] / run_s:.1f}%)")
    assert size <= MAX_BYTES
    assert timings["report_html"] <= MAX_SHARE * run_s


@pytest.fixture(scope="module")
def browser():
    why = browser_unavailable()
    if why:
        pytest.skip(f"browser tests: {why}")
    b = Browser()
    yield b
    b.close()


def test_the_real_runs_report_in_a_browser(smol_run, browser):
    from subspace_sweep.candidates import get_spec

    _, out = smol_run
    browser.open(out / "report.html")
    widths = image_widths(browser)
    assert len(widths) == len(list(out.glob("*.png"))) == 5 and min(widths) > 0  # causal_kept.png included
    check_self_contained(browser, out)
    check_ranking(browser, out, "summary.tsv")
    check_sorting(browser, "joint_gain", numeric=True)
    check_sorting(browser, "family", numeric=False)
    html = (out / "report.html").read_text()
    for kind in ("strength", "candidate", "oracle", "random", "curve"):  # every kind of causal.tsv row, as it is
        header, rows = html_table(html, f"causal-{kind}")
        assert rows and all(r[header.index("kind")] == kind for r in rows)
    best = html_table(html, "ranking")[1][0][html_table(html, "ranking")[0].index("candidate")]
    browser.open(out / "report.html")
    check_definition_link(browser, best, get_spec(best).definition)
    check_self_contained(browser, out)
    header, rows = html_table(html, "scope")
    assert rows == tsv_rows(out / "scope.tsv", header)
