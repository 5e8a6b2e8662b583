"""The report page in a real (headless) Chromium, driven by Playwright: no console errors, no
request leaves the file, every figure renders, and the accuracy it shows is the one in
metrics.json.

Playwright launches Debian's Chromium (`executable_path`, installed by `make browser`); its
own browser download is never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

READ_PAGE = {
    "accuracy": "document.querySelector('#metric-accuracy .value').textContent",
    "title": "document.title",
    "images": "document.images.length",
    "broken_images": "[...document.images].filter(i => !i.complete || !i.naturalWidth).length",
    "per_class_rows": "document.querySelectorAll('#per-class tbody tr').length",
    "page_width": "document.documentElement.scrollWidth",
    "viewport_width": "window.innerWidth",
}
# The flags that work in this project's containers (no sandbox as root, no GPU, no network).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class PageReport:
    """What a person would see in DevTools' console and network panels, and values read from
    the page with JavaScript."""

    console_errors: list[str] = field(default_factory=list)  # console.error, exceptions
    console_warnings: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    failed_requests: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return self.console_errors + self.failed_requests


@pytest.fixture(scope="module")
def browser(chromium: str):
    """One headless Chromium for this file's pages: starting Playwright's driver and the
    browser is most of a page check's time, and each page gets a fresh browser context anyway
    (`open_page`), so nothing of one page (cache, storage, listeners) reaches the next."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Any, url: str, expressions: dict[str, str]) -> PageReport:
    """Load `url` in a new browser context (a fresh profile) at a laptop's width (1280 px)."""
    report = PageReport()
    # `new_page` makes the page its own context; closing the page closes that context.
    page = browser.new_page(viewport={"width": 1280, "height": 2000})
    try:
        page.on("console", lambda message: _console(report, message))
        page.on("pageerror", lambda error: report.console_errors.append(str(error)))
        page.on("request", lambda request: report.requests.append(request.url))
        page.on(
            "requestfailed",
            lambda request: report.failed_requests.append(f"{request.url}: {request.failure}"),
        )
        page.goto(url, wait_until="load")
        for name, expression in expressions.items():
            report.values[name] = page.evaluate(expression)
    finally:
        page.close()
    return report


def _console(report: PageReport, message: Any) -> None:
    if message.type in ("error", "assert"):
        report.console_errors.append(message.text)
    elif message.type == "warning":
        report.console_warnings.append(message.text)


def test_report_opens_in_chromium_without_errors(evaluated_project, browser):
    paths, _ = evaluated_project
    page = open_page(browser, paths.report_html.as_uri(), READ_PAGE)
    assert page.errors == [], page.errors
    assert page.console_warnings == []
    # The page itself is the only request that is not an inlined data: URI.
    assert [url for url in page.requests if not url.startswith("data:")] == [
        paths.report_html.as_uri()
    ]
    metrics = json.loads(paths.metrics.read_text())["test"]
    shown = page.values["accuracy"].strip()
    assert shown.endswith("%")
    assert float(shown.rstrip("%")) == pytest.approx(100 * metrics["accuracy"], abs=0.005)
    assert page.values["title"].startswith("digits")
    assert page.values["images"] == len(list(paths.figures.glob("*.png")))
    assert page.values["broken_images"] == 0
    assert page.values["per_class_rows"] == 10
    # At a laptop's width (1280 px) nothing overflows sideways.
    assert page.values["viewport_width"] == 1280
    assert page.values["page_width"] <= page.values["viewport_width"]


def test_the_check_sees_console_errors_and_outside_requests(evaluated_project, browser, tmp_path):
    """The same check on a spoiled copy fails: it would catch a broken page."""
    paths, _ = evaluated_project
    spoiled = tmp_path / "index.html"
    spoiled.write_text(
        paths.report_html.read_text().replace(
            "</body>",
            '<img src="http://127.0.0.1:9/tracker.png">'
            '<script>console.error("spoiled on purpose")</script></body>',
        )
    )
    page = open_page(browser, spoiled.as_uri(), READ_PAGE)
    assert "spoiled on purpose" in page.console_errors
    assert "http://127.0.0.1:9/tracker.png" in page.requests
    assert page.failed_requests and page.values["broken_images"] == 1
