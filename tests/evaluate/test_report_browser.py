"""The report page in a real (headless) Chromium: no console errors, no request leaves the file,
every figure renders, and the accuracy it shows is the one in metrics.json."""

from __future__ import annotations

import json

import pytest

from tests.evaluate.browser import open_page

READ_PAGE = {
    "accuracy": "document.querySelector('#metric-accuracy .value').textContent",
    "title": "document.title",
    "images": "document.images.length",
    "broken_images": "[...document.images].filter(i => !i.complete || !i.naturalWidth).length",
    "per_class_rows": "document.querySelectorAll('#per-class tbody tr').length",
    "page_width": "document.documentElement.scrollWidth",
    "viewport_width": "window.innerWidth",
}


def test_report_opens_in_chromium_without_errors(evaluated_project, chromium):
    paths, _ = evaluated_project
    page = open_page(chromium, paths.report_html.as_uri(), READ_PAGE)
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


def test_the_check_sees_console_errors_and_outside_requests(evaluated_project, chromium, tmp_path):
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
    page = open_page(chromium, spoiled.as_uri(), READ_PAGE)
    assert "spoiled on purpose" in page.console_errors
    assert "http://127.0.0.1:9/tracker.png" in page.requests
    assert page.failed_requests and page.values["broken_images"] == 1
