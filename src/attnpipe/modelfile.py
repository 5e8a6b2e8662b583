"""`model.pt`: the trained network as a deployable file, written by `train`, read by the rest.

One module owns the format so that evaluate, export and predict depend on it and on
`attnpipe.models`, never on the trainer. The file holds plain tensors and values (it loads with
`torch.load(weights_only=True)`): the best weights, what rebuilds the network (registry name,
kwargs, class count), what reads images for it (input size, mean/std), the decision rule
(`threshold` for binary tasks), the whole recipe and the provenance (commit, code version,
data version, Ray run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnpipe.config import Recipe
from attnpipe.errors import AttnpipeError

MODEL_FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_name", "model_kwargs", "num_classes", "state_dict", "class_names")


class ModelFileError(AttnpipeError, FileNotFoundError):
    """`model.pt` is missing or unreadable; the message says which stage to run."""


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from: shown in the report, W&B and the ONNX metadata."""

    epoch: int
    metrics: dict[str, float]
    git_commit: str
    data_version: str
    run_name: str
    code_version: str = "unknown"
    # The W&B training run and its group: evaluate and export join that group.
    wandb_run_id: str = ""
    wandb_group: str = ""


def write_model_file(
    path: Path,
    recipe: Recipe,
    state_dict: dict[str, torch.Tensor],
    class_names: list[str],
    provenance: Provenance,
) -> None:
    """Write `model.pt` atomically: a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": MODEL_FORMAT_VERSION,
        "model_name": recipe.model.name,
        "model_kwargs": dict(recipe.model.kwargs),
        "num_classes": len(class_names),
        "input_size": recipe.model.input_size,
        "class_names": list(class_names),
        "mean": list(recipe.augment.mean),
        "std": list(recipe.augment.std),
        "threshold": recipe.evaluate.threshold,
        "state_dict": state_dict,
        "recipe": recipe.model_dump(mode="json"),
        "epoch": provenance.epoch,
        "metrics": provenance.metrics,
        "git_commit": provenance.git_commit,
        "code_version": provenance.code_version,
        "data_version": provenance.data_version,
        "run_name": provenance.run_name,
        "wandb_run_id": provenance.wandb_run_id,
        "wandb_group": provenance.wandb_group,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_payload(path: Path) -> dict[str, Any]:
    """The stored values of a `model.pt` (tensors on the CPU), without building the network."""
    if not path.is_file():
        raise ModelFileError(f"{path} is missing: run `attnpipe train` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated copy, another program's pickle
        reason = " ".join(str(error).split())[:200]
        raise ModelFileError(f"{path} is not a readable model file ({reason})") from None


def load_model_file(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network of a `model.pt`; returns (model in eval mode, payload)."""
    from attnpipe.models import create_model

    payload = read_payload(path)
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ModelFileError(
            f"{path} is not a model file written by attnpipe (no {', '.join(missing)}): give "
            "models/<name>/model.pt, or the .onnx file `attnpipe export` writes"
        )
    model = create_model(
        payload["model_name"], num_classes=payload["num_classes"], **payload["model_kwargs"]
    )
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def decision_threshold(payload: dict[str, Any]) -> float:
    """The binary decision threshold the model was evaluated with (0.5 for older files)."""
    if "threshold" in payload:
        return float(payload["threshold"])
    return float((payload.get("recipe") or {}).get("evaluate", {}).get("threshold", 0.5))
