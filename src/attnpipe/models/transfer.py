"""Starting from a model trained here: a ``model.pt`` of this project, or a plain state_dict of
the same network, loaded whole except a classifier sized for another number of classes.

A ``model.pt`` (written by the train stage, see ``attnpipe.modelfile``) records the registry
name and kwargs that built it: the model to start must have the same ones (the registry checks
that, see ``registry.check_pretrained_file``). Its classifier, the module each registry entry
declares (timm's ``default_cfg["classifier"]``), keeps its fresh init where its tensors' shapes
differ from the file's, i.e. when the number of classes does; every other tensor must match
the file exactly, so a wrong file never loads half-way.
"""

from __future__ import annotations

import logging
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .pretrained import PretrainedWeightsError, load_file, preview, unwrap_state_dict

__all__ = [
    "MODEL_FILE_KEYS",
    "PretrainedFile",
    "TransferReport",
    "load_whole_model",
    "read_pretrained_file",
]

_log = logging.getLogger("attnpipe.models")

# What marks a file as a model.pt of this project (attnpipe.modelfile writes these keys).
MODEL_FILE_KEYS = ("model_name", "model_kwargs", "state_dict")


@dataclass(frozen=True)
class PretrainedFile:
    """The weights of a file and, for a model.pt, the architecture that made them."""

    origin: str  # the path, as messages name it
    state: dict[str, Tensor]
    model_name: str | None = None  # None: a plain state_dict, which records no architecture
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None

    @property
    def is_model_file(self) -> bool:
        return self.model_name is not None


def read_pretrained_file(path: str | Path) -> PretrainedFile:
    """Read a model.pt of this project or a plain state_dict file (one-line errors)."""
    obj = load_file(path)
    if not (isinstance(obj, dict) and all(key in obj for key in MODEL_FILE_KEYS)):
        return PretrainedFile(str(path), unwrap_state_dict(obj, path))
    name, kwargs, classes = obj["model_name"], obj["model_kwargs"], obj.get("num_classes")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise PretrainedWeightsError(
            f"{path} looks like a model.pt but its model_name / model_kwargs are not a name and "
            f"a mapping ({name!r}, {kwargs!r}): give a model.pt written by `attnpipe train`"
        )
    return PretrainedFile(
        origin=str(path),
        state=unwrap_state_dict(obj["state_dict"], path),
        model_name=name,
        model_kwargs=dict(kwargs),
        num_classes=classes if isinstance(classes, int) else None,
    )


@dataclass(frozen=True)
class TransferReport:
    """What a whole-model load did; ``str()`` is the one line the trainer prints."""

    origin: str
    loaded: int
    total: int
    new: tuple[str, ...]  # the classifier tensors that kept their fresh init
    file_classes: int | None  # None: a plain state_dict does not record it
    num_classes: int

    def __str__(self) -> str:
        text = f"pretrained from {self.origin}: loaded {self.loaded} of {self.total} tensors"
        if not self.new:
            return f"{text} ({self.num_classes} classes, as in the file)"
        before = f"{self.file_classes} -> " if self.file_classes is not None else ""
        return f"{text}; new: {', '.join(self.new)} ({before}{self.num_classes} classes)"


def load_whole_model(
    model: nn.Module, source: PretrainedFile, *, head: str, name: str, num_classes: int
) -> TransferReport:
    """Copy every tensor of ``source`` into ``model`` except those of module ``head`` whose
    shape differs (the classifier of another class count); logs and returns what it did.

    ``name`` (the registry name) is for messages. Any other disagreement raises a one-line
    PretrainedWeightsError before anything is copied.
    """
    own = model.state_dict()
    state = source.state
    _check_same_keys(own.keys(), state.keys(), source, name)
    differ = [key for key in own if state[key].shape != own[key].shape]
    outside = [key for key in differ if not key.startswith(f"{head}.")]
    if outside:
        shapes = (f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in outside)
        raise PretrainedWeightsError(
            f"pretrained weights {source.origin} do not fit model {name!r}: shape mismatches "
            f"outside the classifier {head!r} (file vs model): {preview(shapes)}; give a file "
            "of the same architecture"
        )
    # The classifier of the new class count keeps the init the model was built with.
    model.load_state_dict({k: v for k, v in state.items() if k not in differ}, strict=False)
    report = TransferReport(
        origin=source.origin,
        loaded=len(own) - len(differ),
        total=len(own),
        new=tuple(differ),
        file_classes=source.num_classes,
        num_classes=num_classes,
    )
    _log.info("%s", report)
    return report


def _check_same_keys(own: Set[str], state: Set[str], source: PretrainedFile, name: str) -> None:
    missing, unexpected = own - state, state - own
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {preview(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {preview(unexpected)}")
    what = "model.pt" if source.is_model_file else "state_dict"
    raise PretrainedWeightsError(
        f"pretrained {what} {source.origin} does not match model {name!r}: "
        + "; ".join(parts)
        + f"; give a model.pt or state_dict of {name!r} with the same kwargs"
    )
