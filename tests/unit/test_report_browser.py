"""Issue 33 in a real browser: the tiny demo run's report.html and a compare's, opened by headless
Chromium (the system's packages, driven by selenium; one browser for the module). Skips with the
reason where Chromium, chromedriver or selenium is missing (tests/QUARANTINES.md); CI installs them."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers_report import Browser, browser_unavailable, check_definition_link, check_ranking, \
    check_self_contained, check_sorting, image_widths, page_faults, tsv_rows

pytestmark = pytest.mark.skipif(browser_unavailable() is not None, reason=f"browser tests: {browser_unavailable()}")


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def test_the_checks_reject_a_page_that_loads_another_file(browser, demo_run, tmp_path):
    """The browser's checks see a load: a report that loads a file beside it shows in the console
    (the page's CSP blocks the load) and, without the CSP, in the network log."""
    _, run = demo_run
    html = (run / "report.html").read_text()
    (tmp_path / "fig.png").write_bytes((run / "spectra.png").read_bytes())
    with_csp = html.replace("</main>", '<img src="fig.png"></main>')
    (tmp_path / "report.html").write_text(with_csp)
    browser.open(tmp_path / "report.html")
    assert 0 in image_widths(browser)
    console, requests = page_faults(browser, tmp_path)
    assert any("Content Security Policy" in m and "fig.png" in m for m in console), console
    (tmp_path / "report.html").write_text(with_csp.replace('http-equiv="Content-Security-Policy"', 'name="x"'))
    browser.open(tmp_path / "report.html")
    assert min(image_widths(browser)) > 0
    assert page_faults(browser, tmp_path)[1] == [(tmp_path / "fig.png").resolve().as_uri()]


@pytest.fixture(scope="module")
def compare_folder(demo_run, tmp_path_factory):
    """A compare of two copies of the demo run (the runs keep their report.html)."""
    from subspace_sweep import cli

    _, run = demo_run
    root = tmp_path_factory.mktemp("report-compare")
    runs = [root / "runs" / name for name in ("seed_a", "seed_b")]
    for path in runs:
        shutil.copytree(run, path)
    assert cli.main(["compare", *map(str, runs), "--out", str(root / "cmp")]) == 0
    return root / "cmp", runs


def test_demo_report_opens_with_every_figure_decoded(browser, demo_run):
    _, run = demo_run
    browser.open(run / "report.html")
    widths = image_widths(browser)
    pngs = [p for p in run.iterdir() if p.suffix == ".png"]
    assert len(widths) == len(pngs) >= 4 and min(widths) > 0
    check_self_contained(browser, run)


def test_demo_ranking_equals_summary_and_sorts(browser, demo_run):
    _, run = demo_run
    browser.open(run / "report.html")
    check_ranking(browser, run, "summary.tsv")
    check_sorting(browser, "joint_gain_std", numeric=True)
    check_sorting(browser, "candidate", numeric=False)
    check_self_contained(browser, run)


def test_demo_candidate_link_opens_its_definition(browser, demo_run):
    from subspace_sweep.candidates import get_spec

    _, run = demo_run
    browser.open(run / "report.html")
    for name in ("mlp_write", "oracle_combined", "attn_qkv_read"):
        check_definition_link(browser, name, get_spec(name).definition)
    check_self_contained(browser, run)


def test_compare_report_shows_its_tables_and_links_its_runs(browser, compare_folder):
    from selenium.webdriver.common.by import By

    from subspace_sweep.candidates import get_spec

    folder, runs = compare_folder
    browser.open(folder / "report.html")
    assert min(image_widths(browser)) > 0 and len(image_widths(browser)) == len(list(folder.glob("*.png"))) == 3
    check_ranking(browser, folder, "compare_summary.tsv")
    header, rows = browser.table("ranking_std")  # the standardized view's stability table beside it
    assert rows == tsv_rows(folder / "compare_summary_std.tsv", header)
    check_sorting(browser, "joint_gain_median", numeric=True)
    header, rows = browser.table("headline")
    assert rows == tsv_rows(folder / "headline.tsv", header)
    hrefs = [a.get_attribute("href") for a in browser.driver.find_elements(By.CSS_SELECTOR, "ul.runs a")]
    assert hrefs == [(run / "report.html").resolve().as_uri() for run in runs]
    relative = {os.path.relpath(run / "report.html", folder) for run in runs}
    assert relative == {"../runs/seed_a/report.html", "../runs/seed_b/report.html"}
    check_self_contained(browser, folder, allowed_links=relative)
    check_definition_link(browser, "mlp_write", get_spec("mlp_write").definition)
    browser.driver.find_element(By.CSS_SELECTOR, "ul.runs a").click()  # a run's own report opens from there
    assert browser.driver.current_url == (runs[0] / "report.html").resolve().as_uri()
    assert browser.table("ranking")[1]
