"""`reports/<name>/index.html`: one self-contained page with the evaluation's results.

Figures are inlined as base64 PNG data URIs and the CSS is inline: the page makes no request,
opens from disk or an artefact store, and can be mailed as one file. No JavaScript.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:
    from attnpipe.evaluate.run import FigureFile, SplitResult

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

CSS = """
:root {
  --ink: #0f172a; --text: #1f2937; --muted: #64748b; --line: #e2e8f0; --bg: #f1f5f9;
  --card: #ffffff; --accent: #2563eb; --good: #15803d; --bad: #b91c1c; --soft: #f8fafc;
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body {
  margin: 0; background: var(--bg); color: var(--text);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
        "Liberation Sans", "DejaVu Sans", sans-serif;
}
.wrap { max-width: 1180px; margin: 0 auto; padding: 0 28px; }
header.hero {
  background: linear-gradient(120deg, #0f172a 0%, #1e3a8a 55%, #2563eb 100%);
  color: #fff; padding: 34px 0 78px;
}
.eyebrow { font-size: 12px; letter-spacing: .14em; text-transform: uppercase; opacity: .75; }
h1 { margin: 6px 0 6px; font-size: 34px; font-weight: 700; letter-spacing: -.01em; }
.hero .sub { margin: 0; font-size: 15.5px; opacity: .92; }
.hero .sub b { font-weight: 600; }
.chips { margin-top: 14px; display: flex; flex-wrap: wrap; gap: 8px; }
.chip {
  font: 12.5px/1 ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
  background: rgba(255,255,255,.12); border: 1px solid rgba(255,255,255,.22);
  border-radius: 999px; padding: 6px 11px; color: #e0e7ff;
}
.cards {
  display: grid; grid-template-columns: repeat(auto-fit, minmax(142px, 1fr)); gap: 14px;
  margin-top: -52px;
}
.metric {
  background: var(--card); border-radius: 14px; padding: 14px 16px 13px;
  box-shadow: 0 1px 2px rgba(15,23,42,.06), 0 8px 24px rgba(15,23,42,.07);
}
.metric .label {
  display: block; font-size: 12.5px; font-weight: 600; color: var(--muted);
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
}
.metric .value {
  display: block; margin-top: 2px; font-size: 26px; font-weight: 700; color: var(--ink);
  font-variant-numeric: tabular-nums; letter-spacing: -.01em;
}
.metric .hint { display: block; font-size: 12.5px; color: var(--muted); line-height: 1.35; }
.metric.primary { background: linear-gradient(135deg, #1d4ed8, #2563eb); color: #fff; }
.metric.primary .label, .metric.primary .hint { color: #dbeafe; }
.metric.primary .value { color: #fff; font-size: 30px; }
section.panel {
  background: var(--card); border-radius: 16px; padding: 24px 26px; margin-top: 22px;
  box-shadow: 0 1px 2px rgba(15,23,42,.05), 0 6px 20px rgba(15,23,42,.05);
}
h2 { margin: 0 0 4px; font-size: 19px; color: var(--ink); letter-spacing: -.005em; }
h3 { margin: 18px 0 4px; font-size: 15px; color: var(--ink); }
p.caption { margin: 0 0 14px; color: var(--muted); font-size: 13.5px; max-width: 900px; }
.grid2 { display: grid; grid-template-columns: minmax(0, 1.1fr) minmax(0, 1fr); gap: 28px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
figure { margin: 0; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
table { width: 100%; border-collapse: collapse; font-size: 14px; }
th {
  text-align: left; font-size: 11.5px; font-weight: 600; letter-spacing: .07em;
  text-transform: uppercase; color: var(--muted); padding: 9px 10px;
  border-bottom: 2px solid var(--line); white-space: nowrap;
}
td { padding: 8px 10px; border-bottom: 1px solid var(--line); vertical-align: middle; }
tbody tr:nth-child(even) td { background: var(--soft); }
tbody tr:hover td { background: #eef2ff; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mono, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono",
  monospace; font-size: 12px; overflow-wrap: anywhere; }
tfoot td { font-weight: 600; border-top: 2px solid var(--line); border-bottom: 0; }
.score { display: flex; align-items: center; gap: 10px; justify-content: flex-end; }
.bar { width: 72px; height: 7px; border-radius: 4px; background: #e2e8f0; overflow: hidden; }
.bar span { display: block; height: 100%; border-radius: 4px; background: var(--accent); }
.bar span.low { background: #f59e0b; }
.bar span.poor { background: var(--bad); }
.tag {
  display: inline-block; font-size: 12px; font-weight: 600; padding: 2px 8px;
  border-radius: 999px; background: #dcfce7; color: var(--good);
}
.tag.bad { background: #fee2e2; color: var(--bad); }
.prov th { width: 26%; text-transform: none; letter-spacing: 0; font-size: 13px;
  color: var(--muted); border-bottom: 1px solid var(--line); font-weight: 500; }
pre.recipe {
  margin: 0; background: #0f172a; color: #e2e8f0; border-radius: 12px; padding: 16px 18px;
  font: 12.5px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
  overflow: auto; max-height: 560px;
}
.empty { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 13px; padding: 26px 0 40px; }
footer code { font-size: 12.5px; }
"""


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
    by_key = {f.key: f for f in figures}
    class_names = predictions.class_names
    model_line = escape(payload["model_name"])
    epoch = payload.get("epoch")
    sub = (
        f"<b>{model_line}</b> on <b>{len(class_names)}</b> classes · "
        f"<b>{metrics['test_samples']:,}</b> test images, each scored once"
        + (f" · weights of epoch <b>{epoch}</b>" if epoch else "")
    )
    chips = [
        f"commit {_short_commit(payload.get('git_commit', 'unknown'))}",
        f"data {payload.get('data_version', 'unknown')}",
        f"input {payload['input_size']}px",
    ]
    if flip_tta:
        chips.append("flip TTA")
    if len(class_names) == 2:
        chips.append(f"threshold {threshold:g}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(pipeline)} · attnpipe evaluation report</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        '<header class="hero"><div class="wrap">',
        '<div class="eyebrow">attnpipe · evaluation report · test split</div>',
        f"<h1>{escape(pipeline)}</h1>",
        f'<p class="sub">{sub}</p>',
        '<div class="chips">'
        + "".join(f'<span class="chip">{escape(c)}</span>' for c in chips)
        + "</div>",
        "</div></header>",
        '<main class="wrap">',
        _metric_cards(metrics, threshold),
        _confusion_and_classes(by_key.get("confusion"), per_class, metrics),
    ]
    if "training_curves" in by_key:
        parts.append(_figure_panel(by_key["training_curves"]))
    attention = [by_key[k] for k in ("attention_correct", "attention_wrong") if k in by_key]
    if attention:
        parts.append(_attention_panel(attention))
    else:
        parts.append(
            '<section class="panel"><h2>Attention</h2><p class="empty">'
            f"{model_line} exposes no spatial attention maps to overlay.</p></section>"
        )
    if "roc_pr" in by_key:
        parts.append(_figure_panel(by_key["roc_pr"]))
    parts.append(_calibration_and_mistakes(by_key.get("calibration"), predictions, threshold))
    parts.append(_provenance_panel(payload, pipeline, threshold, flip_tta))
    parts.append("</main>")
    parts.append(
        '<footer class="wrap">Written by <code>attnpipe evaluate '
        f"{escape(pipeline)}</code> (DVC stage <code>evaluate@{escape(pipeline)}</code>) from "
        f"<code>models/{escape(pipeline)}/model.pt</code> and the test shards. Metrics: "
        f"<code>reports/{escape(pipeline)}/metrics.json</code>; per class: "
        "<code>per_class.csv</code>; every test prediction: <code>confusion.csv</code>."
        "</footer>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- pieces
def format_metric(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    return f"{value:.4f}" if kind == "num" else str(value)


def _metric_cards(metrics: dict[str, Any], threshold: float) -> str:
    cards = []
    for key, label, kind, hint in METRIC_CARDS:
        if key not in metrics:
            continue
        value = metrics[key]
        if key in ("sensitivity", "specificity"):
            hint = f"{hint}, at threshold {threshold:g}"
        css = "metric primary" if key == "accuracy" else "metric"
        data = "" if value is None else f' data-value="{float(value)!r}"'
        cards.append(
            f'<div class="{css}" id="metric-{key.replace("_", "-")}"{data}>'
            f'<span class="label">{escape(label)}</span>'
            f'<span class="value">{format_metric(value, kind)}</span>'
            f'<span class="hint">{escape(hint)}</span></div>'
        )
    return '<section class="cards">' + "".join(cards) + "</section>"


def _img(path: Path, alt: str) -> str:
    data = path.read_bytes()
    size = ""
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # intrinsic size from the IHDR chunk, for layout
        width, height = struct.unpack(">II", data[16:24])
        size = f' width="{width}" height="{height}"'
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{escape(alt)}"{size}>'


def _figure_panel(figure: FigureFile) -> str:
    return (
        f'<section class="panel" id="{figure.key}"><h2>{escape(figure.title)}</h2>'
        f'<p class="caption">{escape(figure.caption)}</p>'
        f"<figure>{_img(figure.path, figure.title)}</figure></section>"
    )


def _attention_panel(figures: list[FigureFile]) -> str:
    body = []
    for figure in figures:
        body.append(
            f'<h3 id="{figure.key}">{escape(figure.title.split(": ", 1)[-1].capitalize())}</h3>'
            f"<figure>{_img(figure.path, figure.title)}</figure>"
        )
    return (
        '<section class="panel"><h2>Attention overlays</h2>'
        f'<p class="caption">{escape(figures[0].caption)}</p>' + "".join(body) + "</section>"
    )


def _score_cell(value: float, bar: bool = False) -> str:
    if not bar:
        return f'<td class="num">{value:.4f}</td>'
    level = "" if value >= 0.9 else ("low" if value >= 0.7 else "poor")
    return (
        f'<td class="num"><div class="score"><div class="bar"><span class="{level}" '
        f'style="width:{100 * value:.1f}%"></span></div>{value:.4f}</div></td>'
    )


def _confusion_and_classes(
    figure: FigureFile | None, per_class: list[dict], metrics: dict[str, Any]
) -> str:
    rows = []
    for row in per_class:
        rows.append(
            f"<tr><td>{escape(str(row['class']))}</td>"
            + _score_cell(row["precision"])
            + _score_cell(row["recall"])
            + _score_cell(row["f1"], bar=True)
            + f'<td class="num">{row["support"]:,}</td></tr>'
        )
    total = sum(int(r["support"]) for r in per_class)
    foot = (
        "<tfoot><tr><td>macro average</td>"
        f'<td class="num">{metrics["macro_precision"]:.4f}</td>'
        f'<td class="num">{metrics["macro_recall"]:.4f}</td>'
        f'<td class="num">{metrics["macro_f1"]:.4f}</td>'
        f'<td class="num">{total:,}</td></tr></tfoot>'
    )
    table = (
        '<table id="per-class"><thead><tr><th>class</th><th class="num">precision</th>'
        '<th class="num">recall</th><th class="num">F1</th><th class="num">support</th>'
        "</tr></thead><tbody>" + "".join(rows) + "</tbody>" + foot + "</table>"
    )
    left = (
        f"<div><h2>{escape(figure.title)}</h2>"
        f'<p class="caption">{escape(figure.caption)}</p>'
        f"<figure>{_img(figure.path, figure.title)}</figure></div>"
        if figure
        else ""
    )
    right = (
        '<div><h2>Per class</h2><p class="caption">Precision, recall and F1 of each class on '
        "the test split (per_class.csv); support is the number of test images of the class.</p>"
        f"{table}</div>"
    )
    return f'<section class="panel grid2" id="classes">{left}{right}</section>'


def _calibration_and_mistakes(
    figure: FigureFile | None, predictions: SplitResult, threshold: float
) -> str:
    left = (
        f'<div id="calibration"><h2>{escape(figure.title)}</h2>'
        f'<p class="caption">{escape(figure.caption)}</p>'
        f"<figure>{_img(figure.path, figure.title)}</figure></div>"
        if figure
        else ""
    )
    return f'<section class="panel grid2">{left}{_mistakes(predictions, threshold)}</section>'


def _mistakes(predictions: SplitResult, threshold: float) -> str:
    predicted = predictions.predicted
    wrong = np.flatnonzero(predicted != predictions.labels)
    names = predictions.class_names
    title = (
        f'<h2>Most confident mistakes</h2><p class="caption">{len(wrong):,} of '
        f"{len(predictions.ids):,} test images are misclassified"
    )
    if not len(wrong):
        return f'<div id="mistakes">{title}.</p></div>'
    # Most confident first; ties in id order (the results are sorted by id).
    order = wrong[np.argsort(-predictions.confidence[wrong], kind="stable")][:MAX_MISTAKES_LISTED]
    rows = []
    for i in order:
        guess = int(predicted[i])
        rows.append(
            f'<tr><td class="mono">{escape(predictions.ids[i])}</td>'
            f"<td>{escape(names[predictions.labels[i]])}</td>"
            f'<td><span class="tag bad">{escape(names[guess])}</span></td>'
            f'<td class="num">{predictions.confidence[i]:.1%}</td>'
            f'<td class="num">{predictions.true_prob[i]:.1%}</td></tr>'
        )
    shown = f"; the {len(order)} the model was surest about" if len(wrong) > len(order) else ""
    return (
        f'<div id="mistakes">{title}{shown}.</p>'
        "<table><thead><tr><th>image id</th><th>true</th><th>predicted</th>"
        '<th class="num">p(pred.)</th><th class="num">p(true)</th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _short_commit(commit: str) -> str:
    dirty = commit.endswith("-dirty")
    base = commit.removesuffix("-dirty")
    short = base[:10] if len(base) == 40 else base
    return short + ("-dirty" if dirty else "")


def _provenance_panel(
    payload: dict[str, Any], pipeline: str, threshold: float, flip_tta: bool
) -> str:
    val = payload.get("metrics") or {}
    val_text = ", ".join(
        f"{k.removeprefix('val_')} {v:.4f}" for k, v in val.items() if isinstance(v, float)
    )
    kwargs = payload.get("model_kwargs") or {}
    commit = str(payload.get("git_commit", "unknown"))
    commit_cell = escape(commit)
    if commit.endswith("-dirty"):
        commit_cell += ' <span class="tag bad">uncommitted changes</span>'
    facts = [
        ("pipeline", escape(pipeline), False),
        ("git commit", commit_cell, True),
        ("data version", escape(str(payload.get("data_version", "unknown"))), True),
        ("model", escape(payload["model_name"]), True),
        ("model arguments", escape(json.dumps(kwargs, sort_keys=True)) if kwargs else "-", True),
        ("input size", f"{payload['input_size']} × {payload['input_size']}", False),
        ("classes", escape(", ".join(payload["class_names"])), False),
        ("training run", escape(str(payload.get("run_name", "unknown"))), True),
        ("best epoch", escape(str(payload.get("epoch", "unknown"))), False),
        ("validation at best epoch", escape(val_text) or "-", False),
        (
            "evaluation",
            f"flip TTA {'on' if flip_tta else 'off'}"
            + (f"; threshold {threshold:g}" if len(payload["class_names"]) == 2 else ""),
            False,
        ),
    ]
    table = "".join(
        f'<tr><th>{name}</th><td class="{"mono" if mono else ""}">{value}</td></tr>'
        for name, value, mono in facts
    )
    recipe = yaml.safe_dump(payload.get("recipe", {}), sort_keys=False, width=88)
    return (
        '<section class="panel" id="provenance"><h2>Provenance</h2><p class="caption">Where '
        "these numbers come from, as recorded in model.pt when it was trained. The recipe is "
        "the resolved one: every default filled in.</p>"
        f'<div class="grid2"><table class="prov"><tbody>{table}</tbody></table>'
        f'<div><h3 style="margin-top:0">Resolved recipe</h3>'
        f'<pre class="recipe">{escape(recipe)}</pre></div></div></section>'
    )
