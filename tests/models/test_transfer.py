"""Starting from a model trained here: `model.pretrained: models/<name>/model.pt`.

The model.pt files are written by `attnpipe.modelfile.write_model_file`, the function the train
stage writes them with, from weights no fresh init produces (every float tensor shifted by
random values), so a tensor equal to the file's was loaded from it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from attnpipe.config import ConfigError, Recipe, load_recipe, parse_recipe, resolve_pretrained
from attnpipe.modelfile import Provenance, write_model_file
from attnpipe.models import (
    PretrainedWeightsError,
    check_pretrained,
    check_pretrained_file,
    classifier_name,
    create_model,
    list_models,
)

# The digits pipeline's architecture (pipelines/digits.yaml), at the tests' 16 pixels.
DIGITS_MODEL = {"name": "attention56_cifar", "input_size": 16, "kwargs": {"width_multiplier": 0.25}}
DIGITS = [str(d) for d in range(10)]
NEW_HEAD = ("fc.weight", "fc.bias")


def _recipe(name: str, model: dict[str, Any], root: Path | None = None) -> Recipe:
    data = {"source": {"kind": "sklearn-digits", "image_size": 16}, "model": model}
    return parse_recipe(data, name=name, root=root)


def _perturbed(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    return {
        k: v + torch.rand(v.shape, generator=g) + 0.25 if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def _write(path: Path, model: dict[str, Any], classes: list[str]) -> dict[str, torch.Tensor]:
    """A model.pt of `model` (a recipe's model section) for `classes`; returns its weights."""
    recipe = _recipe("source", model)
    torch.manual_seed(0)
    built = create_model(recipe.model.name, len(classes), **recipe.model.kwargs)
    state = _perturbed(built, seed=1)
    write_model_file(path, recipe, state, classes, Provenance(3, {}, "commit", "data", "run"))
    return state


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("name", list_models())
def test_declared_classifier_is_what_the_class_count_changes(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init work
        three = create_model(name, 3)
        five = create_model(name, 5).state_dict()
    head = classifier_name(name)
    assert isinstance(three.get_submodule(head), torch.nn.Module)
    changed = [k for k, v in three.state_dict().items() if v.shape != five[k].shape]
    assert changed == [f"{head}.weight", f"{head}.bias"]


@pytest.mark.parametrize(
    ("model", "new"),
    [
        (DIGITS_MODEL, NEW_HEAD),
        # The MLP head's hidden layers do not depend on the class count: they load.
        ({"name": "streamlined_resnet18", "kwargs": {"head": "mlp"}}, ("fc.4.weight", "fc.4.bias")),
    ],
    ids=["attention56_cifar", "streamlined_resnet18-mlp"],
)
def test_model_file_starts_another_class_count(
    tmp_path: Path, model: dict[str, Any], new: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.pt"
    saved = _write(path, model, DIGITS)
    torch.manual_seed(5)
    fresh = create_model(model["name"], 3, **model["kwargs"]).state_dict()
    torch.manual_seed(5)
    with caplog.at_level(logging.INFO, logger="attnpipe.models"):
        started = create_model(model["name"], 3, pretrained=str(path), **model["kwargs"])
    own = started.state_dict()
    assert [k for k in own if not _equal(own[k], saved[k])] == list(new)
    for key in new:  # the classifier of 3 classes keeps the init it was built with
        assert own[key].shape[0] == 3 and _equal(own[key], fresh[key])
    summary = (
        f"pretrained from {path}: loaded {len(own) - len(new)} of {len(own)} tensors; "
        f"new: {', '.join(new)} (10 -> 3 classes)"
    )
    assert started.pretrained_summary == summary
    assert summary in caplog.messages
    assert started(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_same_class_count_loads_every_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    saved = _write(path, DIGITS_MODEL, DIGITS)
    started = create_model("attention56_cifar", 10, pretrained=path, width_multiplier=0.25)
    own = started.state_dict()
    assert own.keys() == saved.keys() and all(_equal(own[k], saved[k]) for k in own)
    assert started.pretrained_summary == (
        f"pretrained from {path}: loaded {len(own)} of {len(own)} tensors "
        "(10 classes, as in the file)"
    )


def test_plain_state_dict_of_the_model_still_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = _perturbed(create_model("ltpa_vgg_cifar", 10), seed=3)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, path)  # DDP keys
    own = create_model("ltpa_vgg_cifar", 4, pretrained=path).state_dict()
    head = ("classifier.weight", "classifier.bias")
    assert [k for k in own if not _equal(own[k], saved[k])] == list(head)
    assert own["classifier.weight"].shape == (4, 1280)


_WIDER = {"width_multiplier": 0.5}
_TAIL = {"width_multiplier": 0.25, "mask_bottom": "tail"}


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        ({"name": "attention92_cifar", "kwargs": {"width_multiplier": 0.25}}, "attention92_cifar("),
        ({"name": "attention56_cifar", "kwargs": _WIDER}, "width_multiplier=0.5"),
        ({"name": "attention56_cifar", "kwargs": _TAIL}, "mask_bottom='tail'"),
    ],
    ids=["other-name", "other-width", "other-mask"],
)
def test_other_architecture_is_an_error_naming_both(
    tmp_path: Path, other: dict[str, Any], fragment: str
) -> None:
    path = tmp_path / "model.pt"
    _write(path, DIGITS_MODEL, DIGITS)
    file_arch = "attention56_cifar(width_multiplier=0.25, mask_bottom='stage')"
    for call in (
        lambda: check_pretrained_file(other["name"], path, other["kwargs"]),
        lambda: create_model(other["name"], 3, pretrained=path, **other["kwargs"]),
    ):
        with pytest.raises(PretrainedWeightsError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and isinstance(info.value, ValueError)
        assert f"{path} holds {file_arch}" in message and fragment in message
        assert "same architecture" in message


def test_state_dict_of_another_network_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(create_model("attention56_cifar", 10, width_multiplier=0.25).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"does not match model 'attention92_cifar'"):
        create_model("attention92_cifar", 10, pretrained=path, width_multiplier=0.25)
    with pytest.raises(PretrainedWeightsError, match=r"shape mismatches outside the classifier"):
        create_model("attention56_cifar", 10, pretrained=path, width_multiplier=0.5)


def test_any_model_accepts_a_file_but_imagenet_only_some(tmp_path: Path) -> None:
    for name in list_models():
        check_pretrained(name, "models/digits/model.pt")  # no file read: checked on loading
    with pytest.raises(PretrainedWeightsError, match=r"model\.pt trained here"):
        check_pretrained("ltpa_vgg_cifar", "imagenet")
    with pytest.raises(PretrainedWeightsError, match="pretrained file not found") as info:
        check_pretrained_file("ltpa_vgg_cifar", tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in str(info.value)


# --- recipes ------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root with models/digits/model.pt (the digits architecture, 10 classes) and
    pipelines/three.yaml starting a three-class pipeline from it."""
    _write(tmp_path / "models" / "digits" / "model.pt", DIGITS_MODEL, DIGITS)
    recipe = {
        "source": {"kind": "sklearn-digits", "image_size": 16},
        "model": {**DIGITS_MODEL, "pretrained": "models/digits/model.pt"},
    }
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "three.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def test_recipe_starts_from_a_model_file(
    project: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from attnpipe.train.build import build_model

    recipe = load_recipe("three", project)
    assert recipe.model.pretrained == "models/digits/model.pt"  # as written: run names
    model = {**DIGITS_MODEL, "pretrained": "models/digits/model.pt"}
    assert _recipe("three", model, root=project) == recipe
    # The workers get an absolute path: they run in other folders (Ray's trial directories).
    resolved = resolve_pretrained(recipe, project)
    absolute = project.resolve() / "models" / "digits" / "model.pt"
    assert resolved.model.pretrained == str(absolute)
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    session = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    built = build_model(resolved, 3, session, torch.contiguous_format).state_dict()
    saved = torch.load(absolute, weights_only=True)["state_dict"]
    assert [k for k in built if not _equal(built[k], saved[k])] == list(NEW_HEAD)
    assert built["fc.weight"].shape == (3, saved["fc.weight"].shape[1])
    line = f"pretrained from {absolute}: loaded {len(built) - 2} of {len(built)} tensors"
    assert f"{line}; new: fc.weight, fc.bias (10 -> 3 classes)" in capfd.readouterr().out


def test_recipe_with_a_missing_file_names_the_key(project: Path) -> None:
    model = {**DIGITS_MODEL, "pretrained": "models/cifar10/model.pt"}
    with pytest.raises(ConfigError) as info:
        _recipe("three", model, root=project)
    message = str(info.value)
    assert "'model.pretrained'" in message and "\n" not in message
    assert str(project / "models" / "cifar10" / "model.pt") in message
    # Without the project root a relative path waits for resolve_pretrained, which fails alike.
    recipe = _recipe("three", model)
    with pytest.raises(ConfigError, match=r"'model\.pretrained'.*models/cifar10/model\.pt"):
        resolve_pretrained(recipe, project)
    with pytest.raises(ConfigError, match=r"'model\.pretrained'.*does not exist"):
        _recipe("three", {**DIGITS_MODEL, "pretrained": os.fspath(project / "nope.pt")})


def test_recipe_of_another_architecture_fails_at_load(project: Path) -> None:
    model = {
        "name": "attention56_cifar",
        "kwargs": {"width_multiplier": 0.5},
        "pretrained": "models/digits/model.pt",
    }
    with pytest.raises(ConfigError) as info:
        _recipe("three", model, root=project)
    message = str(info.value)
    assert message.startswith("<recipe>: 'model.pretrained': ")
    assert "attention56_cifar(width_multiplier=0.25" in message
    assert "attention56_cifar(width_multiplier=0.5" in message
