"""Screenshots of a report.html at desktop width for the README (issue 33), taken by the system's
headless Chromium (tests/helpers_report.Browser).

    PYTHONPATH=src:. python docs/report_screenshots.py RUN/report.html docs/report_smollm2 [SECTION_ID ...]

writes PREFIX_top.png (the first screens) and PREFIX_<id>.png for each section id given (e.g. causal).
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

from PIL import Image

from tests.helpers_report import Browser

WIDTH = 1400
HEIGHT = 1800


def shoot(browser: Browser, out: Path, top: float, height: int) -> None:
    png = browser.driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": top, "width": WIDTH, "height": height, "scale": 1}})["data"]
    # 256 colours are plenty for a page of text, tables and plots: a third of the bytes
    Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB").quantize(256).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


def main(report: str, prefix: str, *sections: str) -> None:
    browser = Browser()
    try:
        browser.driver.set_window_size(WIDTH, HEIGHT)
        browser.open(Path(report))
        browser.js("return Promise.all(Array.from(document.images, im => im.decode()))")
        shoot(browser, Path(f"{prefix}_top.png"), 0, HEIGHT)
        for section in sections:
            top, height = browser.js("const r = document.getElementById(arguments[0]).getBoundingClientRect();"
                                     "return [r.top + window.scrollY, r.height]", section)
            shoot(browser, Path(f"{prefix}_{section}.png"), top, min(int(height) + 8, HEIGHT))
    finally:
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
