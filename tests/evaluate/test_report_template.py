"""The report page is a Jinja2 template with autoescaping: names from data cannot inject HTML."""

from __future__ import annotations

from importlib import resources

import numpy as np

from attnpipe.evaluate.report import render_report
from attnpipe.evaluate.run import SplitResult
from attnpipe.metrics import classification_metrics, per_class_report

HOSTILE = "<script>alert(1)</script>"


def test_names_from_data_and_recipe_are_escaped():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    classes = [f"a{HOSTILE}", "b & c"]
    page = render_report(
        pipeline=f"p{HOSTILE}",
        metrics={"test_samples": 4, **classification_metrics(labels, probs, 0.5)},
        per_class=per_class_report(labels, probs, classes, 0.5),
        predictions=SplitResult.from_probs([f"id{HOSTILE}"] * 4, labels, probs, classes, 0.5),
        payload={
            "model_name": f"m{HOSTILE}",
            "input_size": 32,
            "class_names": classes,
            "run_name": f"r{HOSTILE}",
            "recipe": {"note": HOSTILE},
        },
        figures=[],
        threshold=0.5,
        flip_tta=False,
    )
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6
    assert "b &amp; c" in page
    assert "2 of 4 test images are misclassified" in page


def test_the_template_is_package_data():
    templates = resources.files("attnpipe.evaluate") / "templates"
    assert (templates / "report.html.j2").is_file() and (templates / "report.css").is_file()
