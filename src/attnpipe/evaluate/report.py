"""`reports/<name>/index.html`: one self-contained page with the evaluation's results.

Figures are inlined as base64 PNG data URIs and the CSS is inline: the page makes no request,
opens from disk or an artefact store, and can be mailed as one file. No JavaScript.

The page is the Jinja2 template `templates/report.html.j2` (style: `templates/report.css`),
autoescaped; this module prepares its values (formatted numbers, data URIs, provenance).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import yaml

if TYPE_CHECKING:
    from attnpipe.evaluate.results import FigureFile
    from attnpipe.evaluate.scoring import SplitResult

# (metrics.json key, label, kind, hint); kind "pct" shows a share as a percentage.
METRIC_CARDS = [
    ("accuracy", "Accuracy", "pct", "test images classified right"),
    ("balanced_accuracy", "Balanced acc.", "pct", "mean recall over classes"),
    ("macro_f1", "Macro F1", "num", "mean F1 over classes"),
    ("macro_precision", "Macro precision", "num", "mean over classes"),
    ("macro_recall", "Macro recall", "num", "mean over classes"),
    ("top5_accuracy", "Top-5 accuracy", "pct", "true class in the top 5"),
    ("roc_auc", "ROC-AUC", "num", "positives ranked above negatives"),
    ("pr_auc", "PR-AUC", "num", "average precision"),
    ("sensitivity", "Sensitivity", "pct", "recall of the positive class"),
    ("specificity", "Specificity", "pct", "recall of the negative class"),
    ("ece", "ECE", "num", "calibration error, lower is better"),
]
MAX_MISTAKES_LISTED = 15


def write_report(
    path: Path,
    *,
    pipeline: str,
    metrics: dict[str, Any],
    per_class: list[dict],
    predictions: SplitResult,
    payload: dict[str, Any],
    figures: Sequence[FigureFile],
    threshold: float,
    flip_tta: bool,
) -> Path:
    """Render the page and write it to `path`."""
    page = render_report(
        pipeline=pipeline,
        metrics=metrics,
        per_class=per_class,
        predictions=predictions,
        payload=payload,
        figures=figures,
        threshold=threshold,
        flip_tta=flip_tta,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def render_report(
    *,
    pipeline: str,
    metrics: dict[str, Any],
    per_class: list[dict],
    predictions: SplitResult,
    payload: dict[str, Any],
    figures: Sequence[FigureFile],
    threshold: float,
    flip_tta: bool,
) -> str:
    by_key = {f.key: _figure(f) for f in figures}
    binary = len(predictions.class_names) == 2
    page = _template().render(
        pipeline=pipeline,
        model_name=payload["model_name"],
        class_count=len(predictions.class_names),
        test_samples=f"{metrics['test_samples']:,}",
        epoch=payload.get("epoch"),
        chips=_chips(payload, threshold, flip_tta, binary),
        cards=_metric_cards(metrics, threshold),
        confusion=by_key.get("confusion"),
        per_class=[_class_row(row) for row in per_class],
        macro=_macro_row(per_class, metrics),
        training_curves=by_key.get("training_curves"),
        attention=[by_key[k] for k in ("attention_correct", "attention_wrong") if k in by_key],
        roc_pr=by_key.get("roc_pr"),
        calibration=by_key.get("calibration"),
        mistakes=_mistakes(predictions),
        provenance=_provenance(payload, pipeline, threshold, flip_tta),
        recipe_yaml=yaml.safe_dump(payload.get("recipe", {}), sort_keys=False, width=88),
    )
    return page.rstrip("\n") + "\n"


@cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("attnpipe.evaluate", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a value the code forgot is an error, not a blank
        keep_trailing_newline=True,
    )
    return environment.get_template("report.html.j2")


# --------------------------------------------------------------------------- pieces
def format_metric(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    return f"{value:.4f}" if kind == "num" else str(value)


def _chips(payload: dict[str, Any], threshold: float, flip_tta: bool, binary: bool) -> list[str]:
    chips = [
        f"commit {_short_commit(payload.get('git_commit', 'unknown'))}",
        f"data {payload.get('data_version', 'unknown')}",
        f"input {payload['input_size']}px",
    ]
    if flip_tta:
        chips.append("flip TTA")
    if binary:
        chips.append(f"threshold {threshold:g}")
    return chips


def _metric_cards(metrics: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    cards = []
    for key, label, kind, hint in METRIC_CARDS:
        if key not in metrics:
            continue
        value = metrics[key]
        if key in ("sensitivity", "specificity"):
            hint = f"{hint}, at threshold {threshold:g}"
        cards.append(
            {
                "id": key.replace("_", "-"),
                "css": "metric primary" if key == "accuracy" else "metric",
                "data_value": None if value is None else repr(float(value)),
                "label": label,
                "value": format_metric(value, kind),
                "hint": hint,
            }
        )
    return cards


def _figure(figure: FigureFile) -> dict[str, Any]:
    """A figure as the template shows it: its PNG as a data URI, with its intrinsic size."""
    data = figure.path.read_bytes()
    width = height = None
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # intrinsic size from the IHDR chunk, for layout
        width, height = struct.unpack(">II", data[16:24])
    return {
        "key": figure.key,
        "title": figure.title,
        "caption": figure.caption,
        # An attention panel's sub-heading: "Attention: right answers" -> "Right answers".
        "heading": figure.title.split(": ", 1)[-1].capitalize(),
        "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
        "width": width,
        "height": height,
    }


def _class_row(row: dict[str, Any]) -> dict[str, str]:
    f1 = row["f1"]
    return {
        "name": str(row["class"]),
        "precision": f"{row['precision']:.4f}",
        "recall": f"{row['recall']:.4f}",
        "f1": f"{f1:.4f}",
        "level": "" if f1 >= 0.9 else ("low" if f1 >= 0.7 else "poor"),
        "bar_width": f"{100 * f1:.1f}%",
        "support": f"{row['support']:,}",
    }


def _macro_row(per_class: list[dict], metrics: dict[str, Any]) -> dict[str, str]:
    return {
        "precision": f"{metrics['macro_precision']:.4f}",
        "recall": f"{metrics['macro_recall']:.4f}",
        "f1": f"{metrics['macro_f1']:.4f}",
        "support": f"{sum(int(r['support']) for r in per_class):,}",
    }


def _mistakes(predictions: SplitResult) -> dict[str, Any]:
    predicted = predictions.predicted
    wrong = np.flatnonzero(predicted != predictions.labels)
    names = predictions.class_names
    # Most confident first; ties in id order (the results are sorted by id).
    order = wrong[np.argsort(-predictions.confidence[wrong], kind="stable")][:MAX_MISTAKES_LISTED]
    rows = [
        {
            "id": predictions.ids[i],
            "true": names[predictions.labels[i]],
            "predicted": names[int(predicted[i])],
            "p_predicted": f"{predictions.confidence[i]:.1%}",
            "p_true": f"{predictions.true_prob[i]:.1%}",
        }
        for i in order
    ]
    return {
        "wrong": f"{len(wrong):,}",
        "total": f"{len(predictions.ids):,}",
        "rows": rows,
        "listed_fewer": len(wrong) > len(order),
    }


def _short_commit(commit: str) -> str:
    dirty = commit.endswith("-dirty")
    base = commit.removesuffix("-dirty")
    short = base[:10] if len(base) == 40 else base
    return short + ("-dirty" if dirty else "")


def _provenance(
    payload: dict[str, Any], pipeline: str, threshold: float, flip_tta: bool
) -> list[dict[str, Any]]:
    """The provenance table's rows: (name, value, monospace, uncommitted-changes tag)."""
    val = payload.get("metrics") or {}
    val_text = ", ".join(
        f"{k.removeprefix('val_')} {v:.4f}" for k, v in val.items() if isinstance(v, float)
    )
    kwargs = payload.get("model_kwargs") or {}
    commit = str(payload.get("git_commit", "unknown"))
    binary = len(payload["class_names"]) == 2
    facts = [
        ("pipeline", pipeline, False),
        ("git commit", commit, True),
        ("data version", str(payload.get("data_version", "unknown")), True),
        ("model", payload["model_name"], True),
        ("model arguments", json.dumps(kwargs, sort_keys=True) if kwargs else "-", True),
        ("input size", f"{payload['input_size']} × {payload['input_size']}", False),
        ("classes", ", ".join(payload["class_names"]), False),
        ("training run", str(payload.get("run_name", "unknown")), True),
        ("best epoch", str(payload.get("epoch", "unknown")), False),
        ("validation at best epoch", val_text or "-", False),
        (
            "evaluation",
            f"flip TTA {'on' if flip_tta else 'off'}"
            + (f"; threshold {threshold:g}" if binary else ""),
            False,
        ),
    ]
    return [
        {
            "name": name,
            "value": value,
            "mono": mono,
            "dirty": name == "git commit" and commit.endswith("-dirty"),
        }
        for name, value, mono in facts
    ]
