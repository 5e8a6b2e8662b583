"""Every kind of data source in one table: its recipe section, how it is fetched, how it is read.

Like the model registry, adding a source kind is one row here (plus its typed config section
in `attnpipe.config`, which validation needs first). The fetch and layout functions are named
as "module:function" rather than imported: `fetch` and `prepare` are separate pipeline stages,
and `dvc.yaml` makes each depend on the modules it runs (`attnpipe.codeversion`); importing
every downloader here would make an edit to the Kaggle client code re-run `prepare`.

    fetch(source, raw_dir, progress=..., root=...)   writes data/<name>/raw/
    layout(source, raw_dir) -> RawIndex               reads it back as labelled records
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnpipe.config import (
    SOURCE_CONFIGS,
    FolderSource,
    KaggleCompetitionSource,
    KaggleDatasetSource,
    SklearnDigitsSource,
    Strict,
    TorchvisionSource,
)


@dataclass(frozen=True)
class SourceKind:
    config: type[Strict]  # the recipe's `source:` section for this kind
    fetch: str  # "module:function"
    layout: str  # "module:function"
    marker: bool = True  # downloads/copies end with a completion marker (re-fetch is a no-op)


SOURCE_KINDS: dict[str, SourceKind] = {
    "sklearn-digits": SourceKind(
        SklearnDigitsSource,
        "attnpipe.data.sources:fetch_digits",
        "attnpipe.data.layouts:read_digits",
        marker=False,  # written from scikit-learn's wheel in a second: no marker needed
    ),
    "kaggle-competition": SourceKind(
        KaggleCompetitionSource,
        "attnpipe.data.kaggle_source:fetch_kaggle",
        "attnpipe.data.layouts:read_named_layout",
    ),
    "kaggle-dataset": SourceKind(
        KaggleDatasetSource,
        "attnpipe.data.kaggle_source:fetch_kaggle",
        "attnpipe.data.layouts:read_named_layout",
    ),
    "torchvision": SourceKind(
        TorchvisionSource,
        "attnpipe.data.torchvision_source:fetch_torchvision",
        "attnpipe.data.layouts:read_torchvision",
    ),
    "folder": SourceKind(
        FolderSource, "attnpipe.data.sources:copy_folder", "attnpipe.data.layouts:read_folder"
    ),
}
assert set(SOURCE_KINDS) == set(SOURCE_CONFIGS), "a source kind without its table row"


def source_kind(kind: str) -> SourceKind:
    return SOURCE_KINDS[kind]


def resolve(reference: str) -> Callable[..., Any]:
    """The function a "module:function" reference names (imported on first use)."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)
