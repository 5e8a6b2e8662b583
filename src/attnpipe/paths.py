"""Where each stage of pipeline `<name>` reads and writes: the contract in dvc.yaml."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Set by DVC for every stage command; in an experiment run in a temporary copy (`dvc exp run
# --queue` / `--temp`), it names the workspace the experiment came from, not the copy.
DVC_ROOT_ENV = "DVC_ROOT"


@dataclass(frozen=True)
class PipelinePaths:
    root: Path
    name: str

    @property
    def workspace(self) -> Path:
        """The project folder that outlives a run: `root`, except inside DVC's temporary copy
        of an experiment (`<workspace>/.dvc/tmp/exps/...`, deleted when the experiment ends),
        where it is the workspace the copy came from. Checkpoints and W&B runs go there."""
        dvc_root = os.environ.get(DVC_ROOT_ENV)
        if not dvc_root:
            return self.root
        workspace = Path(dvc_root).resolve()
        inside_copy = self.root.resolve().is_relative_to(workspace / ".dvc" / "tmp")
        return workspace if inside_copy else self.root

    @property
    def data(self) -> Path:
        return self.root / "data" / self.name

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.parquet"

    @property
    def classes(self) -> Path:
        return self.data / "classes.json"

    @property
    def rejected(self) -> Path:
        return self.data / "rejected.csv"

    @property
    def shards(self) -> Path:
        return self.data / "shards"

    @property
    def models(self) -> Path:
        return self.root / "models" / self.name

    @property
    def model_file(self) -> Path:
        return self.models / "model.pt"

    @property
    def onnx_file(self) -> Path:
        return self.models / "model.onnx"

    @property
    def checkpoints(self) -> Path:
        """Ray Train's run folders: in the workspace (not a DVC output), so that a queued
        experiment's copy, and the next `dvc repro`, resume from them."""
        return self.workspace / "models" / self.name / "checkpoints"

    @property
    def tune_storage(self) -> Path:
        return self.models / "tune"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.name

    @property
    def data_report(self) -> Path:
        """The prepare stage's DVC metrics: samples per split, rejected, duplicates."""
        return self.reports / "data.json"

    @property
    def class_counts(self) -> Path:
        """Samples per class and split, written by prepare beside `data.json` (not metrics)."""
        return self.reports / "class_counts.csv"

    @property
    def train_history(self) -> Path:
        return self.reports / "train_history.csv"

    @property
    def train_metrics(self) -> Path:
        """The train stage's record: best epoch and its validation metrics, the run, its W&B
        run (a plain output; its headline is `train_summary`)."""
        return self.reports / "train.json"

    @property
    def train_summary(self) -> Path:
        """The train stage's DVC metrics: a few columns of `dvc metrics show`."""
        return self.reports / "train_summary.json"

    @property
    def metrics(self) -> Path:
        """Every test metric (a plain output; its headline is `test_summary`)."""
        return self.reports / "metrics.json"

    @property
    def test_summary(self) -> Path:
        """The evaluate stage's DVC metrics: a few columns of `dvc metrics show`."""
        return self.reports / "test_summary.json"

    @property
    def confusion(self) -> Path:
        return self.reports / "confusion.csv"

    @property
    def wandb_parent(self) -> Path:
        """W&B writes its runs to `wandb/` inside this folder: the workspace, so that an
        experiment run in DVC's temporary copy keeps its run."""
        return self.workspace

    @property
    def per_class(self) -> Path:
        return self.reports / "per_class.csv"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def report_html(self) -> Path:
        return self.reports / "index.html"
