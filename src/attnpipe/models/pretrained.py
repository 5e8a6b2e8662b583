"""Pretrained backbones: torchvision's ImageNet weights through its weights API, or local files.

ImageNet weights live in torch's hub cache, ``torch.hub.get_dir()/checkpoints/<file name of the
weights URL>`` (``$TORCH_HOME/hub/checkpoints`` when TORCH_HOME is set), where torchvision
itself keeps them. A cached file is loaded without touching the network. A missing one is
downloaded by torch.hub, unless ``ATTNPIPE_OFFLINE=1``: then, and when the download fails, a
one-line ``PretrainedWeightsError`` names the file, its URL and where to put it.

Only backbone tensors are loaded: attention branches and classifiers keep their fresh init.
"""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from .errors import PretrainedWeightsError

__all__ = [
    "OFFLINE_ENV",
    "PretrainedWeightsError",
    "ensure_imagenet_file",
    "imagenet_cache_path",
    "load_backbone",
    "load_file",
    "load_imagenet_state_dict",
    "preview",
    "read_state_dict",
    "unwrap_state_dict",
]

OFFLINE_ENV = "ATTNPIPE_OFFLINE"

# What torch.hub raises for an unreachable host, an HTTP error, a hash mismatch or an
# unreadable file (pickle's error under weights_only=True, EOFError for a truncated file).
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def imagenet_cache_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps (or will download) the file of ``weights``."""
    name = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def ensure_imagenet_file(weights: WeightsEnum, model: str) -> Path:
    """Path of the cached weights file, downloading it first unless ``ATTNPIPE_OFFLINE=1``.

    ``model`` is the registry name, used in error messages only.
    """
    path = imagenet_cache_path(weights)
    if path.is_file():
        return path
    if _offline():
        raise PretrainedWeightsError(
            f"ImageNet weights for {model!r} ({path.name}) are not in torch's hub cache and "
            f"{OFFLINE_ENV}=1 forbids downloading: fetch {weights.url} and save it as {path} "
            "(the folder follows TORCH_HOME)"
        )
    # torch.hub's download (what torchvision's weights API calls): into a temporary file,
    # checked against the hash prefix in the file name, then moved into place.
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            weights.url, str(path), match.group(1) if match else None, progress=sys.stderr.isatty()
        )
    except _LOAD_ERRORS as error:
        raise PretrainedWeightsError(
            f"could not download ImageNet weights for {model!r} from {weights.url} "
            f"({_one_line(error)}): fetch that file and save it as {path}, or set "
            f"{OFFLINE_ENV}=1 to fail fast"
        ) from error
    return path


def load_imagenet_state_dict(weights: WeightsEnum, model: str) -> dict[str, Tensor]:
    """The ImageNet state_dict of ``weights`` from torch's hub cache (see module docstring)."""
    path = ensure_imagenet_file(weights, model)
    try:
        # Goes through torchvision's weights API; the file is cached, so nothing is downloaded.
        state = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as error:
        raise PretrainedWeightsError(
            f"cached ImageNet weights {path} are unreadable ({_one_line(error)}): delete the "
            f"file to download it again, or replace it with {weights.url}"
        ) from error
    return _tensors_only(state, path)


def load_file(path: str | Path) -> object:
    """What a local weights file holds (tensors on the CPU), or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained file not found: {path}; give a model.pt of this project, a state_dict "
            "file, 'imagenet' or None"
        )
    try:
        # Memory-mapped when torch's zip format allows: a file only checked (a recipe being
        # validated) is then not read into memory, and a loaded one is read once, by copying.
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except _LOAD_ERRORS as error:
        raise PretrainedWeightsError(
            f"{path} is not a readable state_dict file ({_one_line(error)})"
        ) from error


def unwrap_state_dict(obj: object, origin: str | Path) -> dict[str, Tensor]:
    """The state_dict in ``obj``: training checkpoints wrapping it and DDP prefixes accepted."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return {k.removeprefix("module."): v for k, v in _tensors_only(obj, origin).items()}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A local state_dict file; training checkpoints wrapping it and DDP prefixes are accepted."""
    return unwrap_state_dict(load_file(path), path)


def _tensors_only(obj: object, origin: str | Path) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{origin} does not hold a state_dict of tensors")
    return obj


def preview(keys: Iterable[str], limit: int = 5) -> str:
    """Up to ``limit`` of ``keys``, sorted, and how many more there are."""
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_backbone(
    model: nn.Module,
    source: str | Path | Mapping[str, Tensor],
    *,
    backbone: Callable[[str], bool],
    ignore: Callable[[str], bool] = lambda k: False,
    origin: str | None = None,
) -> None:
    """Copy the backbone tensors of ``source`` (a state_dict or a local file) into ``model``.

    ``backbone(key)`` says which of the model's keys must come from the source (the rest, e.g.
    attention branches and the classifier, keep their fresh init); source keys for which
    ``ignore(key)`` holds (e.g. the source network's classifier) are skipped. Any other
    disagreement raises PretrainedWeightsError naming the keys, so a wrong file never loads
    half-way. ``origin`` names the source in messages (default: the path).
    """
    if isinstance(source, Mapping):
        state, origin = dict(source), origin or "state_dict"
    else:
        state, origin = read_state_dict(source), origin or str(source)
    source_keys = {k: v for k, v in state.items() if not ignore(k)}
    target = {k: v for k, v in model.state_dict().items() if backbone(k)}
    missing = target.keys() - source_keys.keys()
    unexpected = source_keys.keys() - target.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {preview(unexpected)}")
        raise PretrainedWeightsError(
            f"pretrained backbone {origin} does not match: " + "; ".join(parts)
        )
    bad_shapes = [
        f"{k} {tuple(source_keys[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if source_keys[k].shape != v.shape
    ]
    if bad_shapes:
        raise PretrainedWeightsError(
            f"pretrained backbone {origin} has shape mismatches (file vs model): "
            + preview(bad_shapes)
        )
    model.load_state_dict(source_keys, strict=False)
