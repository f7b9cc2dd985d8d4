"""Checks of report.html (issue 33) shared by the fast tests, the browser tests and the real tier:
what the HTML refers to, its tables as the file's text, and a headless Chromium from the
system's packages driven by selenium (never a browser a Python package downloads)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import polars as pl

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
#: NOTES.md: without the networking flags chromium keeps trying to reach the internet.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1400,1000")


# ----------------------------------------------------------------------------- the HTML itself


class _Refs(HTMLParser):
    """Every URL-valued attribute (src, href, srcset, poster, data, action, formaction) of the page."""

    ATTRS = ("src", "href", "srcset", "poster", "data", "action", "formaction", "xlink:href", "background")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in self.ATTRS and value is not None:
                self.refs.append((tag, name, value))


def references(html: str) -> list[tuple[str, str, str]]:
    """(tag, attribute, value) of every URL attribute, and ("css", "url(", value) of every url(...)
    and @import in the page's text (inline styles included)."""
    parser = _Refs()
    parser.feed(html)
    refs = parser.refs
    refs += [("css", "url(", m.group(1).strip("'\" ")) for m in re.finditer(r"url\(([^)]*)\)", html)]
    refs += [("css", "@import", m.group(0)) for m in re.finditer(r"@import\b[^;]*", html)]
    return refs


def outside_refs(html: str, allowed_links: set[str] = frozenset()) -> list[tuple[str, str, str]]:
    """The references that would make the browser load anything: every one but data: URIs, links
    within the page (#...) and, for <a href> only, the links in ``allowed_links`` (a compare's
    runs' reports: navigation when clicked, never a load)."""
    bad = []
    for tag, attr, value in references(html):
        if value.startswith("data:") or (attr == "href" and value.startswith("#")):
            continue
        if tag == "a" and attr == "href" and value in allowed_links:
            continue
        bad.append((tag, attr, value))
    return bad


class _Tables(HTMLParser):
    """The <table> with a given id: its header texts and each row's cells' data-v."""

    def __init__(self, table_id: str):
        super().__init__(convert_charrefs=True)
        self.id, self.inside, self.in_th = table_id, False, False
        self.header: list[str] = []
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == self.id:
            self.inside = True
        elif self.inside and tag == "th":
            self.in_th = True
            self.header.append("")
        elif self.inside and tag == "tr" and self.header:
            self.rows.append([])
        elif self.inside and tag == "td":
            self.rows[-1].append(a.get("data-v", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        if tag == "th":
            self.in_th = False

    def handle_data(self, data):
        if self.in_th:
            self.header[-1] += data


def html_table(html: str, table_id: str) -> tuple[list[str], list[list[str]]]:
    p = _Tables(table_id)
    p.feed(html)
    return [h.strip() for h in p.header], [r for r in p.rows if r]


def tsv_rows(path: Path, header: list[str]) -> list[list[str]]:
    """The file's rows as its text, in the order of ``header`` (a report's column order)."""
    frame = pl.read_csv(path, separator="\t", infer_schema=False)
    assert sorted(frame.columns) == sorted(header), (frame.columns, header)
    return [["" if v is None else v for v in row] for row in frame.select(header).iter_rows()]


# ----------------------------------------------------------------------------- the browser


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; make test installs the test extra)"
    if not any(os.access(p, os.X_OK) for p in CHROMIUM):
        return f"no Chromium at {', '.join(CHROMIUM)} (apt-get install chromium chromium-driver; .ci/run installs it)"
    if not any(os.access(p, os.X_OK) for p in CHROMEDRIVER):
        return f"no chromedriver at {', '.join(CHROMEDRIVER)} (apt-get install chromium-driver; .ci/run installs it)"
    return None


class Browser:
    """A headless Chromium of the system's packages, a fresh profile, its console and network logs on."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="subspace-sweep-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = next(p for p in CHROMIUM if os.access(p, os.X_OK))
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        driver = next(p for p in CHROMEDRIVER if os.access(p, os.X_OK))
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.get("about:blank")  # the new-tab page's own requests end before a report opens
        self.logs()

    def open(self, path: Path) -> None:
        self.driver.get("about:blank")
        self.logs()  # drop what earlier pages logged
        self.driver.get(path.resolve().as_uri())

    def logs(self) -> tuple[list[dict], list[str]]:
        """(console entries, URLs the page requested) since the last call."""
        console = self.driver.get_log("browser")
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return console, urls

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def table(self, table_id: str) -> tuple[list[str], list[list[str]]]:
        """A table's header and its rows' data-v, as the page shows them now."""
        return self.js("""
            const t = document.getElementById(arguments[0]);
            return [Array.from(t.tHead.rows[0].cells, c => c.textContent.trim()),
                    Array.from(t.tBodies[0].rows, r => Array.from(r.cells, c => c.getAttribute('data-v')))];
        """, table_id)

    def sort(self, table_id: str, column: str) -> None:
        self.js("""
            const t = document.getElementById(arguments[0]);
            const th = Array.from(t.tHead.rows[0].cells).find(c => c.textContent.trim() === arguments[1]);
            th.querySelector('button').click();
        """, table_id, column)

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


def image_widths(browser: Browser) -> list[int]:
    """naturalWidth of every image once the page has decoded them (0: did not decode)."""
    return browser.js("""
        return Promise.all(Array.from(document.images, im => im.decode().then(() => im.naturalWidth, () => 0)));
    """)


def sorted_rows(rows: list[list[str]], col: int, numeric: bool, descending: bool) -> list[list[str]]:
    """What sorting a column must give (sort.js's rule): empty and NaN last, equal keys in order."""
    def key(v: str):
        if v == "":
            return None
        if not numeric:
            return v
        x = float(v)
        return None if x != x else x

    present = [r for r in rows if key(r[col]) is not None]
    absent = [r for r in rows if key(r[col]) is None]
    return sorted(present, key=lambda r: key(r[col]), reverse=descending) + absent


# ----------------------------------------------------------------------------- checks of an open report


def page_faults(browser: Browser, folder: Path) -> tuple[list[str], list[str]]:
    """Since the last look at the logs: the console's errors and warnings, and every URL the page
    requested but itself and data: URIs."""
    console, urls = browser.logs()
    me = (folder / "report.html").resolve().as_uri()
    return ([e["message"] for e in console if e["level"] in ("SEVERE", "WARNING")],
            [u for u in urls if u != me and not u.startswith("data:")])


def check_self_contained(browser: Browser, folder: Path, allowed_links: set[str] = frozenset()) -> None:
    """The page's console has no error and it requested nothing but itself and data: URIs; its
    HTML names no other source (every src/href/url( scanned)."""
    assert page_faults(browser, folder) == ([], [])
    assert outside_refs((folder / "report.html").read_text(), allowed_links) == []


def check_ranking(browser: Browser, folder: Path, tsv: str) -> None:
    header, rows = browser.table("ranking")
    assert rows == tsv_rows(folder / tsv, header)
    assert len(rows) > 10


def check_sorting(browser: Browser, column: str, numeric: bool) -> None:
    header, before = browser.table("ranking")
    col = header.index(column)
    browser.sort("ranking", column)  # first press: numbers high to low, text A to Z
    _, once = browser.table("ranking")
    assert once == sorted_rows(before, col, numeric, descending=numeric)
    assert once != before
    browser.sort("ranking", column)  # second press reverses
    _, twice = browser.table("ranking")
    assert twice == sorted_rows(before, col, numeric, descending=not numeric)


def check_definition_link(browser: Browser, name: str, definition: str) -> None:
    """Pressing a candidate's name in the ranking shows its definition: the page's target, visible
    in the window, with the definition's text."""
    from selenium.webdriver.common.by import By

    link = browser.driver.find_element(By.CSS_SELECTOR, f"#ranking a.cand[href='#def-{name}']")
    assert definition in link.get_attribute("title")  # definitions.md may add a rank note
    browser.js("window.scrollTo(0, 0)")
    link.click()
    target = browser.driver.find_element(By.ID, f"def-{name}")
    assert browser.js("return location.hash") == f"#def-{name}"
    assert browser.js("return arguments[0].matches(':target')", target)
    assert target.is_displayed() and definition in target.text
    top, bottom = browser.js("const r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom]", target)
    assert 0 <= top < bottom <= browser.js("return window.innerHeight")
