"""Pretrained backbones: torchvision's ImageNet weights from torch's hub cache, local files.

Nothing is downloaded: the "ImageNet" files are state_dicts of torchvision's own networks
(its keys and shapes) with values no fresh init produces, saved under the file names
torchvision's weights API expects, in a temporary TORCH_HOME. torch.hub's download function
is replaced by one that fails the test (or, where the download path itself is under test, by
one that copies a local file).
"""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from attnpipe.models import (
    OFFLINE_ENV,
    PretrainedWeightsError,
    check_pretrained,
    create_model,
    fetch_imagenet_weights,
    imagenet_models,
    list_models,
    supports_imagenet,
)

# The files of torchvision's IMAGENET1K_V1 weights (test vectors: these exact names).
FILES = {
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet18": "resnet18-f37072fd.pth",
}
URL = "https://download.pytorch.org/models/"
BACKBONE = {
    "attnvgg16": "vgg16_bn",
    "resnet50": "resnet50",
    "se_resnet50": "resnet50",
    "streamlined_resnet50": "resnet50",
    "se_resnet18": "resnet18",
    "streamlined_resnet18": "resnet18",
}


def _perturbed_state(arch: str) -> dict[str, torch.Tensor]:
    """A state_dict with exactly the keys and shapes of torchvision's ``arch`` and values no
    fresh init produces (uniform in [0.25, 1.25])."""
    with torch.device("meta"):  # torchvision's own definition; no memory, no init work
        names = getattr(torchvision.models, arch)().state_dict()
    g = torch.Generator().manual_seed(2)
    state = {}
    for key, meta in names.items():
        if not meta.is_floating_point():  # BatchNorm's num_batches_tracked
            state[key] = torch.zeros(meta.shape, dtype=meta.dtype)
        elif meta.numel() > 10_000_000:
            # VGG's two big FC weights (the loader skips classifiers by name): an expanded
            # constant keeps their shape but not 400 MB in the temporary file.
            state[key] = torch.full((1,), 0.5).expand(meta.shape)
        else:
            state[key] = torch.rand(meta.shape, generator=g) + 0.25
    return state


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME whose hub cache holds the three weights files."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for arch, name in FILES.items():
        torch.save(_perturbed_state(arch), checkpoints / name)
    return home


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail(f"torch.hub tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)


def _file_state(home: Path, arch: str) -> dict[str, torch.Tensor]:
    return torch.load(home / "hub" / "checkpoints" / FILES[arch], weights_only=True)


def test_which_models_have_imagenet_weights() -> None:
    assert imagenet_models() == sorted(BACKBONE)
    assert [n for n in list_models() if supports_imagenet(n)] == sorted(BACKBONE)
    assert not supports_imagenet("attention56")


@pytest.mark.parametrize("name", sorted(BACKBONE))
def test_imagenet_backbone_loads_from_hub_cache(
    name: str, hub_home: Path, monkeypatch: pytest.MonkeyPatch, no_download: None
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(hub_home))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)  # online allowed: a cached file still wins
    torch.manual_seed(0)
    fresh = create_model(name, 1000).state_dict()
    torch.manual_seed(0)
    model = create_model(name, 1000, pretrained="imagenet")
    own = model.state_dict()
    source = _file_state(hub_home, BACKBONE[name])
    from_file = [k for k in own if k in source and not k.startswith(("fc.", "classifier."))]
    assert len(from_file) == len([k for k in source if not k.startswith(("fc.", "classifier."))])
    for key in from_file:
        torch.testing.assert_close(own[key], source[key], rtol=0, atol=0)
    # Attention branches and the classifier keep the fresh init (same seed, same values) ...
    kept = [k for k in own if k not in from_file]
    assert any("attn" in k for k in kept) or name == "resnet50"
    assert any(k.startswith(("fc.", "classifier.")) for k in kept)
    for key in kept:
        torch.testing.assert_close(own[key], fresh[key], rtol=0, atol=0)
    # ... and differ from the file's classifier of the same shape.
    head = "fc.weight" if "fc.weight" in source else "classifier.6.weight"
    if head in own:
        assert not torch.equal(own[head], source[head])


def test_offline_missing_file_fails_before_any_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: None
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(PretrainedWeightsError) as info:
        create_model("resnet50", 10, pretrained="imagenet")
    message = str(info.value)
    assert "\n" not in message
    expected_path = tmp_path / "hub" / "checkpoints" / FILES["resnet50"]
    assert URL + FILES["resnet50"] in message and str(expected_path) in message
    assert OFFLINE_ENV in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(PretrainedWeightsError, match=r"vgg16_bn-6c64b313\.pth"):
        fetch_imagenet_weights("attnvgg16")


def test_failed_download_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    calls = []

    def unreachable(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(PretrainedWeightsError) as info:
        create_model("se_resnet18", 10, pretrained="imagenet")
    message = str(info.value)
    assert calls == [URL + FILES["resnet18"]]
    assert "\n" not in message and "Temporary failure in name resolution" in message
    assert URL + FILES["resnet18"] in message
    assert str(tmp_path / "hub" / "checkpoints" / FILES["resnet18"]) in message


def test_download_goes_into_the_hub_cache(
    hub_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    calls = []

    def serve(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, dst, hash_prefix))
        shutil.copy(hub_home / "hub" / "checkpoints" / Path(url).name, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", serve)
    path = fetch_imagenet_weights("resnet50")
    expected = tmp_path / "hub" / "checkpoints" / FILES["resnet50"]
    assert path == expected and path.is_file()
    assert calls == [(URL + FILES["resnet50"], str(expected), "0676ba61")]  # hash-checked
    model = create_model("resnet50", 2, pretrained="imagenet")  # now cached: no second call
    assert len(calls) == 1
    torch.testing.assert_close(
        model.state_dict()["conv1.weight"], _file_state(hub_home, "resnet50")["conv1.weight"]
    )


def test_unreadable_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / FILES["resnet18"]).write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(PretrainedWeightsError, match=r"unreadable.*delete the file") as info:
        create_model("streamlined_resnet18", 2, pretrained="imagenet")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["attention56", "attention92_cifar", "ltpa_vgg_cifar"])
def test_models_without_imagenet_weights_say_which_have_them(name: str) -> None:
    with pytest.raises(PretrainedWeightsError) as info:
        create_model(name, 10, pretrained="imagenet")
    message = str(info.value)
    assert "\n" not in message and name in message
    assert all(n in message for n in imagenet_models())
    check_pretrained(name, "weights.pt")  # a model.pt trained here: see test_transfer.py
    check_pretrained(name, None)  # fresh init is always fine


@pytest.mark.parametrize("value", [3, "", b"imagenet"])
def test_bad_pretrained_values(value: object) -> None:
    with pytest.raises(PretrainedWeightsError, match="pretrained must be None, 'imagenet'"):
        create_model("resnet50", 10, pretrained=value)


# --- local files -------------------------------------------------------------------------------


def test_attnvgg_loads_local_vgg16_bn(hub_home: Path) -> None:
    path = hub_home / "hub" / "checkpoints" / FILES["vgg16_bn"]
    model = create_model("attnvgg16", 2, pretrained=str(path))
    for key, value in _file_state(hub_home, "vgg16_bn").items():
        if key.startswith("features."):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


@pytest.fixture(scope="module")
def wrapped_resnet50(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A local ResNet-50 file (100 MB) and its state_dict, written once for the three ResNets
    that load it (they only read it)."""
    source = _perturbed_state("resnet50")
    path = tmp_path_factory.mktemp("local") / "resnet50.pt"
    torch.save({"state_dict": source}, path)  # wrapped checkpoints are accepted
    return path, source


@pytest.mark.parametrize("name", ["resnet50", "se_resnet50", "streamlined_resnet50"])
def test_resnets_load_local_resnet50(
    wrapped_resnet50: tuple[Path, dict[str, torch.Tensor]], name: str
) -> None:
    path, source = wrapped_resnet50
    model = create_model(name, 3, pretrained=path)  # a Path works as well as a str
    own = model.state_dict()
    for key, value in source.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0)
    assert own["fc.weight"].shape == (3, 2048)


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="pretrained file not found") as info:
        create_model("resnet50", 3, pretrained=str(tmp_path / "nope.pt"))
    assert "\n" not in str(info.value) and "'imagenet'" in str(info.value)


def test_mismatched_backbone_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"missing \d+ key\(s\): layer1\.0\.bn3"):
        create_model("streamlined_resnet50", 3, pretrained=str(path))

    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError, match=r"shape mismatches.*layer1\.0\.conv1\.weight"):
        create_model("se_resnet18", 3, pretrained=str(path))


def test_load_backbone_leaves_model_untouched_on_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "partial.pt"
    state = torchvision.models.resnet18().state_dict()
    del state["layer4.1.bn2.running_var"]
    torch.save(state, path)
    model = create_model("resnet50", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedWeightsError):
        model.load_backbone(path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model, nn.Module)
