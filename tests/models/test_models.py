"""Model registry and networks: spec test vectors, structure, shapes, attention maps, loading.

Kept light for a 2-core CPU: batch 1-2, small inputs, ``no_grad`` wherever no gradient is needed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from attnpipe.models import (
    UnknownModelArgumentError,
    count_macs,
    count_parameters,
    create_model,
    default_input_size,
    describe_models,
    format_model_table,
    list_models,
    model_kwargs,
    spatial_maps,
)
from attnpipe.models.attn_vgg import GridAttention
from attnpipe.models.ltpa import LTPAttention
from attnpipe.models.residual_attention import AttentionModule, PreActBottleneck
from attnpipe.models.resnet import AttendedBasicBlock, AttendedBottleneck

RESNETS = ["resnet50", "se_resnet18", "se_resnet50", "streamlined_resnet18",
           "streamlined_resnet50"]  # fmt: skip
IMAGENET = ["attention56", "attention92", "attnvgg16", *RESNETS]
CIFAR = ["attention56_cifar", "attention92_cifar", "ltpa_vgg_cifar"]
# Small variants where the model allows it, so structural tests stay fast.
FAST_KWARGS = {
    "attention56_cifar": {"width_multiplier": 0.25},
    "attention92_cifar": {"width_multiplier": 0.25},
}


def small_input(name: str, batch: int = 1) -> torch.Tensor:
    size = 64 if default_input_size(name) >= 64 else 32
    return torch.randn(batch, 3, size, size)


def architecture(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """The model built on torch's meta device: the same modules and parameter shapes, without
    allocating or initialising any weights (a fifth of the time, or less). For tests that
    count or inspect the architecture and never run it or read a weight's value."""
    with torch.device("meta"):
        return create_model(name, num_classes, **kwargs)


class LastEvalModel:
    """The model last asked for, built once for consecutive tests that only run it in eval mode
    under ``no_grad`` (no training, hooks or conversions): the layout tests check one model at
    several input sizes, and building it (mostly initialising its weights) costs as much as
    their forward passes. The shapes they check do not depend on the random init."""

    def __init__(self) -> None:
        self.key: tuple[str, int, list] | None = None
        self.model: nn.Module | None = None

    def __call__(self, name: str, num_classes: int, **kwargs: object) -> nn.Module:
        key = (name, num_classes, sorted(kwargs.items()))
        if key != self.key:
            self.model = None  # one model held at a time
            self.model = create_model(name, num_classes, **kwargs).eval()
            self.key = key
        assert self.model is not None
        return self.model


@pytest.fixture(scope="module")
def eval_model() -> LastEvalModel:
    return LastEvalModel()


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Eval-mode model whose BatchNorm statistics come from ``x``.

    Fresh running statistics (mean 0, var 1) make eval-mode BN an identity, so a deep random net
    blows activations up to ~1e4 and every float comparison turns into noise; real statistics
    give the activation scales of a trained network.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def test_registry_lists_every_model() -> None:
    assert list_models() == sorted(IMAGENET + CIFAR)
    assert {n: default_input_size(n) for n in CIFAR} == dict.fromkeys(CIFAR, 32)
    assert {n: default_input_size(n) for n in IMAGENET} == dict.fromkeys(IMAGENET, 224)


# --- 1. test vectors from models.md -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        ("attention56", 1000, 31_810_728),
        ("se_resnet50", 1000, 28_088_024),
        ("streamlined_resnet50", 1000, 45_676_584),
        ("resnet50", 1000, 25_557_032),
        ("attnvgg16", 2, 15_182_402 + 1_281 * 2),
        ("attnvgg16", 10, 15_182_402 + 1_281 * 10),
        ("attention92_cifar", 10, 2_396_410),  # "roughly 2.4-2.5M" for a faithful transfer
        ("attention56_cifar", 10, 1_147_386),
    ],
)
def test_parameter_counts(name: str, num_classes: int, expected: int) -> None:
    assert count_parameters(architecture(name, num_classes)) == expected


def test_se_reduction_changes_only_attention() -> None:
    base = architecture("se_resnet50", 1000)
    r8 = architecture("se_resnet50", 1000, reduction=8)
    assert count_parameters(r8) > count_parameters(base)  # wider attention FCs
    attn = {k: v.shape for k, v in r8.state_dict().items() if ".attn." in k}
    assert attn["layer1.0.attn.fc1.weight"] == (256 // 8, 256)
    backbone = {k: v.shape for k, v in base.state_dict().items() if ".attn." not in k}
    assert backbone == {k: v.shape for k, v in r8.state_dict().items() if ".attn." not in k}


@pytest.mark.parametrize(
    ("name", "expected_gmacs", "rel"),
    [("attention56", 6.27, 0.02), ("attention92", 10.5, 0.03), ("resnet50", 4.11, 0.02)],
)
def test_multiply_adds_at_224(name: str, expected_gmacs: float, rel: float) -> None:
    macs = count_macs(create_model(name, 1000), 224)
    assert macs / 1e9 == pytest.approx(expected_gmacs, rel=rel)


# --- 2. structure: own weights everywhere, every parameter trained --------------------------


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_no_shared_modules_and_each_weight_used_once(name: str) -> None:
    model = create_model(name, 10, **FAST_KWARGS.get(name, {})).eval()
    modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    assert len(modules) == len({id(m) for m in modules})
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(params) == len({id(p) for p in params})
    # A module with weights applied twice in one pass would be a hidden weight share.
    calls: dict[str, int] = {}
    handles = [
        m.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
        for key, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    with torch.no_grad():
        model(small_input(name))
    for h in handles:
        h.remove()
    assert calls and set(calls.values()) == {1}, {k: v for k, v in calls.items() if v != 1}


def test_attention56_mask_units_are_distinct() -> None:
    model = architecture("attention56", 1000)
    units = [m for m in model.modules() if isinstance(m, PreActBottleneck)]
    # stage 1: 1 + (first, 2 trunk, 8 mask, last); stage 2: 1 + 9; stage 3: 1 + 6; tail: 3
    assert len(units) == 13 + 10 + 7 + 3
    mask = model.stages[0].blocks[0].mask
    assert len(mask.down) == len(mask.skips) == len(mask.up) == 2
    # Projections exist only where channels or stride change.
    projections = [u for u in units if u.shortcut is not None]
    assert len(projections) == 4


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10, **FAST_KWARGS.get(name, {})).train()
    x = small_input(name, batch=2)  # batch 2: BatchNorm1d heads need > 1 sample in training
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- 3. shapes and attention maps ----------------------------------------------------------


# attention92 differs from attention56 only in module counts: one size is enough for it. The
# ResNets run at the small sizes their recipes use (64 for CIFAR-style runs, 112) and at 224.
@pytest.mark.parametrize(
    ("name", "size"),
    [(n, s) for n in ("attention56", "attnvgg16") for s in (224, 256, 320)]
    + [("attention92", 224)]
    + [(n, s) for n in RESNETS for s in (64, 112, 224)],
)
def test_imagenet_layout_shapes(name: str, size: int, eval_model: LastEvalModel) -> None:
    model = eval_model(name, 7)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 7)
    check_maps(name, maps, size)


@pytest.mark.parametrize("num_classes", [1, 3, 1000])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("se_resnet18", {}), ("streamlined_resnet18", {}), ("streamlined_resnet18", {"head": "mlp"})],
)
def test_resnets_any_class_count(name: str, kwargs: dict, num_classes: int) -> None:
    model = create_model(name, num_classes, **kwargs).eval()
    with torch.no_grad():
        logits, maps = model.forward_with_attention(torch.randn(2, 3, 96, 96))
    assert logits.shape == (2, num_classes)
    assert maps["cam"].shape == (2, 1, 3, 3)


@pytest.mark.parametrize("size", [64, 96, 200])
def test_residual_attention_other_input_sizes(size: int, eval_model: LastEvalModel) -> None:
    model = eval_model("attention56", 3)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 3)
    assert maps["stage1.0"].shape[-1] == -(-size // 4)


@pytest.mark.parametrize("size", [32, 40])
@pytest.mark.parametrize("name", CIFAR)
def test_cifar_layout_shapes(name: str, size: int, eval_model: LastEvalModel) -> None:
    model = eval_model(name, 10, **FAST_KWARGS.get(name, {}))
    with torch.no_grad():
        logits, maps = model.forward_with_attention(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    check_maps(name, maps, size, batch=2)


def check_maps(name: str, maps: dict[str, torch.Tensor], size: int, batch: int = 1) -> None:
    def spatial(a: torch.Tensor, side: int) -> None:
        assert a.shape == (batch, 1, side, side), a.shape

    if name.startswith("attention"):
        n_modules = (1, 1, 1) if "56" in name else (1, 2, 3)
        expected = [f"stage{s}.{i}" for s, n in enumerate(n_modules, 1) for i in range(n)]
        assert list(maps) == expected
        first = size // 4 if "cifar" not in name else size
        for key, a in maps.items():
            spatial(a, first // 2 ** (int(key[5]) - 1))
            assert a.min() >= 0 and a.max() <= 1
    elif name == "attnvgg16":
        assert list(maps) == ["attn1", "attn2"]
        spatial(maps["attn1"], size // 8)
        spatial(maps["attn2"], size // 16)
        assert all(a.min() >= 0 and a.max() <= 1 for a in maps.values())
    elif name == "ltpa_vgg_cifar":
        assert list(maps) == ["attn1", "attn2", "attn3"]
        for i, a in enumerate(maps.values()):
            spatial(a, size // 2**i)
            torch.testing.assert_close(a.sum(dim=(2, 3)), torch.ones(batch, 1))
    else:  # the ResNets: per-block channel weights, then the class activation map
        side = -(-size // 32)
        assert list(maps)[-1] == "cam"
        spatial(maps["cam"], side)
        assert torch.isfinite(maps["cam"]).all()
        if name == "resnet50":
            assert list(maps) == ["cam"]
            return
        blocks = [3, 4, 6, 3] if name.endswith("50") else [2, 2, 2, 2]
        keys = [f"layer{k}.{i}" for k, n in enumerate(blocks, 1) for i in range(n)]
        assert list(maps) == [*keys, "cam"]
        expansion = 4 if name.endswith("50") else 1
        for key in keys:
            w = maps[key]
            assert w.shape == (batch, 64 * 2 ** (int(key[5]) - 1) * expansion)
            if name.startswith("se_"):
                assert w.min() >= 0 and w.max() <= 1  # sigmoid-gated
            else:
                assert torch.isfinite(w).all() and w.min() < 0  # ungated: signed, unbounded


def test_attnvgg_softmax_maps_sum_to_one() -> None:
    model = create_model("attnvgg16", 2, normalize="softmax").eval()
    with torch.no_grad():
        maps = model.attention_maps(torch.randn(2, 3, 96, 96))
    for a in maps.values():
        torch.testing.assert_close(a.sum(dim=(2, 3)), torch.ones(2, 1))


def test_ltpa_dot_product_compatibility() -> None:
    model = create_model("ltpa_vgg_cifar", 10, compatibility="dp").eval()
    with torch.no_grad():
        maps = model.attention_maps(torch.randn(1, 3, 32, 32))
    assert [a.shape[-1] for a in maps.values()] == [32, 16, 8]


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_features_then_head_equals_forward(name: str) -> None:
    model = create_model(name, 5, **FAST_KWARGS.get(name, {})).eval()
    x = small_input(name)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
        torch.testing.assert_close(model.forward_with_attention(x)[0], logits)


def test_width_multiplier_scales_widths_in_multiples_of_four() -> None:
    full = architecture("attention56_cifar", 10)
    small = architecture("attention56_cifar", 10, width_multiplier=0.25)
    assert count_parameters(small) < count_parameters(full) / 8
    stage_widths = [stage.transition.conv3.out_channels for stage in small.stages]
    assert stage_widths == [16, 32, 64]
    tiny = architecture("attention92_cifar", 10, width_multiplier=0.1)
    widths = [tiny.stem[0].out_channels] + [s.transition.conv3.out_channels for s in tiny.stages]
    assert all(w >= 4 and w % 4 == 0 for w in widths), widths


# --- 4. channels_last and bfloat16 autocast ----------------------------------------------


# `name` is module-scoped in the two tests below: pytest runs each model's two tests one after
# the other, and they share one build and calibration, made once and freed before the next.
@pytest.fixture(scope="module")
def seeded_calibrated(name: str) -> tuple[torch.Tensor, nn.Module]:
    """A seeded batch of 2 and the model (10 classes) calibrated on it: the same seed and calls
    give the same tensors in both tests, so they are computed once. The tests leave the model
    as they found it (the channels_last test converts a copy)."""
    torch.manual_seed(0)
    x = small_input(name, batch=2)
    return x, calibrated(create_model(name, 10, **FAST_KWARGS.get(name, {})), x)


@pytest.mark.parametrize("name", IMAGENET + CIFAR, scope="module")
def test_channels_last_matches_contiguous(
    name: str, seeded_calibrated: tuple[torch.Tensor, nn.Module]
) -> None:
    x, model = seeded_calibrated
    with torch.no_grad():
        ref = model(x)
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    # Relative to the whole output: a deep random net amplifies the fp32 rounding differences
    # of the two kernel layouts to ~1e-4 (attention92), so allow 1e-3.
    assert (out - ref).norm() / ref.norm() < 1e-3


# Blocks whose bf16 output is compared with fp32 given the same fp32 input.
BLOCKS = (PreActBottleneck, AttentionModule, Bottleneck, BasicBlock, GridAttention, LTPAttention)
# Shallow enough that end-to-end bf16 logits stay close to fp32 at random init.
SHALLOW = {"attnvgg16", "ltpa_vgg_cifar", "streamlined_resnet18"}


@pytest.mark.parametrize("name", IMAGENET + CIFAR, scope="module")
def test_bf16_autocast_matches_fp32(
    name: str, seeded_calibrated: tuple[torch.Tensor, nn.Module]
) -> None:
    """bf16 autocast agrees with fp32 block by block (and end to end for shallow nets).

    A random-init deep ResNet amplifies any perturbation by a few percent per block (even
    torchvision's resnet50 ends ~50% off in bf16), so deep nets are checked per block: each
    block gets the fp32 model's input and must reproduce its output within 3%.
    """
    batch, model = seeded_calibrated
    # Compared on one image of the two: CPU bf16 convolutions take a slow path without
    # AVX-512 (10 s an image for LTPA-VGG's 512 channels at full resolution).
    x = batch[:1]
    records = []
    handles = [
        m.register_forward_hook(lambda m, args, out: records.append((m, args, out)))
        for m in model.modules()
        if isinstance(m, BLOCKS)
    ]
    with torch.no_grad():
        ref = model(x)
    for h in handles:
        h.remove()
    assert records
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        for block, args, expected in records:
            got = block(*args)
            got, expected = (t if isinstance(t, tuple) else (t,) for t in (got, expected))
            for g, e in zip(got, expected, strict=True):
                assert (g.float() - e).norm() / e.norm() < 0.03, type(block).__name__
    assert logits.shape == ref.shape and torch.isfinite(logits).all()
    if name in SHALLOW:
        assert (logits.float() - ref).norm() / ref.norm() < 0.05


# --- 5. registry errors ----------------------------------------------------------------------


def test_unknown_model_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'atention56'") as info:
        create_model("atention56", 10)
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in list_models())


def test_unknown_kwarg_names_model_and_valid_kwargs() -> None:
    with pytest.raises(UnknownModelArgumentError) as info:
        create_model("attention56_cifar", 10, width=0.5)
    message = str(info.value)
    assert "\n" not in message
    assert "attention56_cifar" in message and "width_multiplier" in message
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert model_kwargs("attnvgg16") == {"normalize": "sigmoid", "dropout": 0.0}
    assert model_kwargs("streamlined_resnet50") == {"head": "linear"}
    assert model_kwargs("se_resnet50") == {"reduction": 16}


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("attnvgg16", {"normalize": "tanh"}),
        ("ltpa_vgg_cifar", {"compatibility": "cosine"}),
        ("attention56_cifar", {"width_multiplier": 0}),
        ("se_resnet18", {"reduction": 0}),
        ("streamlined_resnet18", {"head": "conv"}),
        ("attention92_cifar", {"mask_bottom": "deep"}),
    ],
)
def test_invalid_values_raise_value_error(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be"):
        create_model(name, 10, **kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        create_model(name, 0)


# --- summary table ---------------------------------------------------------------------------


def test_describe_and_format_table() -> None:
    rows = describe_models(["attention56_cifar", "resnet50", "se_resnet18"])
    assert [r.name for r in rows] == ["attention56_cifar", "resnet50", "se_resnet18"]
    cifar, r50, se18 = rows
    assert (r50.params, r50.input_size, r50.attention_maps) == (25_557_032, 224, ("cam",))
    assert cifar.input_size == 32 and cifar.attention_maps == ("stage1.0", "stage2.0", "stage3.0")
    assert se18.attention_maps[0] == "layer1.0" and se18.attention_maps[-1] == "cam"
    assert r50.macs / 1e9 == pytest.approx(4.09, rel=0.01)
    table = format_model_table(rows)
    assert "attention56_cifar" in table and "25,557,032" in table
    assert "layer1.0, layer1.1, layer2.0, ..., cam (9 maps)" in table  # the CAM stays visible
    assert len(table.splitlines()) == 5


# --- the streamlined module, the SE ResNets and the MLP head ----------------------------------


def test_streamlined_attention_parameters() -> None:
    model = architecture("streamlined_resnet50", 1000)
    attn = {k: v for k, v in model.state_dict().items() if ".attn." in k}
    # One C x C weight per block and nothing else: no bias, no reduction, no second layer.
    assert all(k.endswith(".attn.fc.weight") for k in attn)
    assert all(v.shape[0] == v.shape[1] for v in attn.values())
    assert sum(v.numel() for v in attn.values()) == 20_119_552
    assert count_parameters(model) - 20_119_552 == 25_557_032  # the rest is torchvision's


@pytest.mark.parametrize("name", ["streamlined_resnet50", "streamlined_resnet18"])
def test_streamlined_block_scales_branch_ungated(name: str) -> None:
    """Block output = relu(f * (W . GAP(f)) + identity), f the branch's BN output."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = calibrated(create_model(name, 10), x)
    block = model.layer2[0]  # has a downsample: exercises the projected skip as well
    captured: dict[str, torch.Tensor] = {}
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    last_bn.register_forward_hook(lambda m, a, out: captured.__setitem__("f", out.clone()))
    block.register_forward_hook(lambda m, a, out: captured.update(x=a[0], out=out))
    with torch.no_grad():
        maps = model.attention_maps(x)
        f = captured["f"]
        w = f.mean(dim=(2, 3)) @ block.attn.fc.weight.T  # N x C, no bias, no sigmoid
        expected = torch.relu(f * w[:, :, None, None] + block.downsample(captured["x"]))
    torch.testing.assert_close(maps["layer2.0"], w)
    torch.testing.assert_close(captured["out"], expected)


@pytest.mark.parametrize("name", ["streamlined_resnet50", "streamlined_resnet18"])
def test_streamlined_init_is_torch_default_and_damps_branches(name: str) -> None:
    """The author's code keeps nn.Linear's default init, U(-1/sqrt(C), 1/sqrt(C)). Applied to
    BatchNorm outputs it starts every residual branch scaled well below 1 (not blown up)."""
    torch.manual_seed(0)
    model = create_model(name, 10).train()
    for m in model.modules():
        if isinstance(m, AttendedBasicBlock | AttendedBottleneck):
            weight = m.attn.fc.weight
            bound = 1 / weight.shape[1] ** 0.5
            assert weight.abs().max() <= bound
            assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    with torch.no_grad():
        maps = model.attention_maps(torch.randn(8, 3, 64, 64))
    scales = [w.abs().mean().item() for k, w in maps.items() if k != "cam"]
    assert max(scales) < 0.5 and min(scales) > 0  # damped, but not dead


def test_streamlined_trains_with_the_source_recipe() -> None:
    """Adam lr 1e-4, as the author trains it: the loss of a fixed batch falls and stays finite.

    (The ungated product is less forgiving of large steps than a gated one: see docs/models.md.)
    """
    torch.manual_seed(0)
    model = create_model("streamlined_resnet18", 4).train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_streamlined_mlp_head_is_the_authors() -> None:
    model = architecture("streamlined_resnet50", 7, head="mlp")
    layers = list(model.fc)
    assert [type(m) for m in layers] == [nn.Linear, nn.Dropout, nn.Linear, nn.Dropout, nn.Linear]
    assert [(m.in_features, m.out_features) for m in layers[::2]] == [
        (2048, 1024),
        (1024, 512),
        (512, 7),
    ]
    assert [m.p for m in layers[1::2]] == [0.5, 0.5]
    assert count_parameters(architecture("streamlined_resnet50", 1000, head="mlp")) == 46_763_560


# --- class activation maps --------------------------------------------------------------------


def test_resnet50_cam_is_classifier_row_times_features() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    model = calibrated(create_model("resnet50", 5), x)
    calls = {"conv1": 0, "layer4": 0, "fc": 0}
    for key in calls:
        getattr(model, key).register_forward_hook(
            lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)
        )
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x)
        assert calls == {"conv1": 1, "layer4": 1, "fc": 1}  # one pass, CAM included
        feats = model.forward_features(x)  # N x 2048 x 3 x 3
    pred = logits.argmax(dim=1)
    expected = torch.stack(
        [
            torch.einsum("c,chw->hw", model.fc.weight[k], f) + model.fc.bias[k]
            for f, k in zip(feats, pred.tolist(), strict=True)
        ]
    )[:, None]
    torch.testing.assert_close(maps["cam"], expected)
    # Average-pooling the map gives back the predicted class's logit.
    torch.testing.assert_close(maps["cam"].mean(dim=(1, 2, 3)), logits.max(dim=1).values)


def test_cam_of_mlp_head_applies_head_per_position() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = calibrated(create_model("streamlined_resnet18", 6, head="mlp"), x)
    with torch.no_grad():
        logits, maps = model.forward_with_attention(x)
        feats = model.forward_features(x)  # N x 512 x 2 x 2
        pred = logits.argmax(dim=1)
        for n in range(2):
            for i in range(2):
                for j in range(2):
                    score = model.fc(feats[n, :, i, j])[pred[n]]
                    torch.testing.assert_close(maps["cam"][n, 0, i, j], score)
    # In eval mode the author's MLP is affine, so the pooled map is the logit again.
    torch.testing.assert_close(maps["cam"].mean(dim=(1, 2, 3)), logits.max(dim=1).values)


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_every_model_returns_a_spatial_map(name: str) -> None:
    model = create_model(name, 3, **FAST_KWARGS.get(name, {})).eval()
    x = small_input(name, batch=2)
    with torch.no_grad():
        maps = spatial_maps(model.attention_maps(x))
    assert maps, name
    for value in maps.values():
        assert value.ndim == 3 and value.shape[0] == 2 and min(value.shape[1:]) > 1


# --- AttnVGG initialisation ---------------------------------------------------------------------


def test_attnvgg_init_as_attnmel() -> None:
    torch.manual_seed(0)
    model = create_model("attnvgg16", 1000)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert model.classifier.weight.mean().abs().item() < 1e-3
    assert torch.count_nonzero(model.classifier.bias) == 0
    for attn in (model.attn1, model.attn2):
        for conv in (attn.w_l, attn.w_g, attn.phi):
            fan_in = conv.weight[0].numel()
            expected = (2 / fan_in) ** 0.5  # He-normal, fan-in, ReLU gain
            rel = 0.05 if conv.weight.numel() > 10_000 else 0.15  # phi has only 256 weights
            assert conv.weight.std().item() == pytest.approx(expected, rel=rel)
        assert torch.count_nonzero(attn.phi.bias) == 0


# --- CIFAR Residual Attention mask depth ---------------------------------------------------------


def test_cifar_masks_pool_to_the_last_stage_by_default_and_to_the_tail_on_request() -> None:
    default = architecture("attention92_cifar", 10)
    assert [s.blocks[0].mask.num_pools for s in default.stages] == [2, 1, 0]
    tail = create_model("attention92_cifar", 10, mask_bottom="tail")
    assert [s.blocks[0].mask.num_pools for s in tail.stages] == [3, 2, 1]
    assert count_parameters(tail) == 2_516_794
    x = torch.randn(1, 3, 32, 32)
    bottoms: list[int] = []
    for stage in tail.stages:
        stage.blocks[0].mask.bottom.register_forward_hook(
            lambda m, a, out: bottoms.append(out.shape[-1])
        )
    with torch.no_grad():
        maps = tail.attention_maps(x)
    assert bottoms == [4, 4, 4]  # every mask reaches the tail's 4 x 4
    assert [m.shape[-1] for m in maps.values()] == [32, 16, 16, 8, 8, 8]


def test_demo_model_is_unchanged() -> None:
    """attention56_cifar at width 0.25 (the demo's model) keeps its size: 74,934 parameters."""
    assert count_parameters(architecture("attention56_cifar", 10, width_multiplier=0.25)) == 74_934
