"""Draw what a pipeline's shared W&B group shows, from its offline run files (no server).

    uv run python docs/wandb_story.py . docs/images/wandb_story.png

Reads `<project>/wandb/offline-run-*`: the training run's history and summary, the evaluate
run's test summary and confusion-matrix table, and the artifacts each run logged or used
(data -> run -> model). It is a picture of the run files' contents, not a W&B screenshot:
W&B's pages draw the same records after `wandb sync`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package
from tests.wandb_offline import artifacts, history_rows, offline_runs, summary


def latest_group(project: Path) -> dict:
    """job type -> run of the newest training run's group."""
    runs = offline_runs(project / "wandb")
    trains = [r for r in runs if r.info.job_type == "train"]
    if not trains:
        raise SystemExit(f"no offline training run under {project / 'wandb'}: run `make demo`")
    group = trains[-1].info.run_group
    return {r.info.job_type: r for r in runs if r.info.run_group == group}


def draw_history(axis, train) -> None:
    rows = history_rows(train.records)
    epochs = [r["epoch"] for r in rows]
    axis.plot(epochs, [r["val/accuracy"] for r in rows], "o-", label="val/accuracy")
    axis.plot(epochs, [r["train/loss"] for r in rows], "s--", label="train/loss")
    best = summary(train.records).get("best/epoch")
    if best:
        axis.axvline(best, color="grey", linestyle=":", label=f"best epoch {best}")
    axis.set_xlabel("epoch")
    axis.set_title(f"training run {train.info.run_id}: history")
    axis.legend(fontsize=8)


def draw_confusion(axis, evaluation) -> None:
    [table] = sorted(evaluation.folder.glob("files/media/table/test/confusion_matrix_table_*"))
    data = json.loads(table.read_text())["data"]
    names = list(dict.fromkeys(row[0] for row in data))
    matrix = np.zeros((len(names), len(names)))
    for actual, predicted, count in data:
        matrix[names.index(actual), names.index(predicted)] = count
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axis.set_yticks(range(len(names)), names, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("actual")
    axis.set_title("evaluate run: test/confusion_matrix")


def summary_text(group: dict) -> str:
    train, evaluation = summary(group["train"].records), summary(group["evaluate"].records)
    lines = [f"group {group['train'].info.run_group}", "", "training summary (best epoch):"]
    lines += [f"  {k} = {v:.4f}" for k, v in train.items() if k.startswith("best/val/")]
    lines += ["", "evaluate summary:"]
    lines += [
        f"  {k} = {v:.4f}" if isinstance(v, float) else f"  {k} = {v}"
        for k, v in evaluation.items()
        if k.startswith("test/") and k.count("/") == 1 and isinstance(v, int | float)
    ]
    return "\n".join(lines[:24])


def lineage_text(group: dict) -> str:
    lines = ["artifacts (used <- / logged ->):", ""]
    for job, run in group.items():
        for artifact in artifacts(run.records):
            if artifact.type == "run_table":
                continue
            arrow = "<-" if artifact.use_after_commit else "->"
            files = ", ".join(c.path for c in artifact.manifest.contents if not c.ref)
            references = [c.ref for c in artifact.manifest.contents if c.ref]
            if references:
                files += f"; {len(references)} references, e.g. {references[0]}"
            aliases = ", ".join(a for a in artifact.aliases if a != "latest")
            lines.append(f"{job:9s} {arrow} {artifact.type} {artifact.name}")
            lines.append(f"            files: {files[:90]}")
            if aliases:
                lines.append(f"            aliases: {aliases[:60]}")
    return "\n".join(lines)


def main(project: Path, output: Path) -> None:
    group = latest_group(project)
    figure, axes = plt.subplots(2, 2, figsize=(13, 10))
    draw_history(axes[0, 0], group["train"])
    draw_confusion(axes[0, 1], group["evaluate"])
    for axis, text in ((axes[1, 0], summary_text(group)), (axes[1, 1], lineage_text(group))):
        axis.axis("off")
        axis.text(0, 1, text, va="top", family="monospace", fontsize=8)
    figure.suptitle("What the shared W&B group holds (drawn from the offline run files)")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    print(f"wrote {output}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python docs/wandb_story.py PROJECT_ROOT OUTPUT.png")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
