"""Where each stage of pipeline `<name>` reads and writes: the contract in dvc.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PipelinePaths:
    root: Path
    name: str

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
        return self.models / "checkpoints"

    @property
    def tune_storage(self) -> Path:
        return self.models / "tune"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.name

    @property
    def data_report(self) -> Path:
        return self.reports / "data.json"

    @property
    def train_history(self) -> Path:
        return self.reports / "train_history.csv"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def confusion(self) -> Path:
        return self.reports / "confusion.csv"

    @property
    def wandb_parent(self) -> Path:
        """W&B writes its runs to `wandb/` inside this folder."""
        return self.root

    @property
    def per_class(self) -> Path:
        return self.reports / "per_class.csv"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def report_html(self) -> Path:
        return self.reports / "index.html"

