"""Model registry and networks: spec test vectors, structure, shapes, attention maps, loading.

Kept light for a 2-core CPU: batch 1-2, small inputs, ``no_grad`` wherever no gradient is needed.
"""

from __future__ import annotations

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
)
from attnpipe.models.attn_vgg import GridAttention
from attnpipe.models.ltpa import LTPAttention
from attnpipe.models.residual_attention import AttentionModule, PreActBottleneck

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
    assert count_parameters(create_model(name, num_classes)) == expected


def test_se_reduction_changes_only_attention() -> None:
    base = create_model("se_resnet50", 1000)
    r8 = create_model("se_resnet50", 1000, reduction=8)
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
    model = create_model("attention56", 1000)
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
def test_imagenet_layout_shapes(name: str, size: int) -> None:
    model = create_model(name, 7).eval()
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
def test_residual_attention_other_input_sizes(size: int) -> None:
    model = create_model("attention56", 3).eval()
    with torch.no_grad():
        logits, maps = model.forward_with_attention(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 3)
    assert maps["stage1.0"].shape[-1] == -(-size // 4)


@pytest.mark.parametrize("size", [32, 40])
@pytest.mark.parametrize("name", CIFAR)
def test_cifar_layout_shapes(name: str, size: int) -> None:
    model = create_model(name, 10, **FAST_KWARGS.get(name, {})).eval()
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
    full = create_model("attention56_cifar", 10)
    small = create_model("attention56_cifar", 10, width_multiplier=0.25)
    assert count_parameters(small) < count_parameters(full) / 8
    stage_widths = [stage.transition.conv3.out_channels for stage in small.stages]
    assert stage_widths == [16, 32, 64]
    tiny = create_model("attention92_cifar", 10, width_multiplier=0.1)
    widths = [tiny.stem[0].out_channels] + [s.transition.conv3.out_channels for s in tiny.stages]
    assert all(w >= 4 and w % 4 == 0 for w in widths), widths


# --- 4. channels_last and bfloat16 autocast ----------------------------------------------


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_channels_last_matches_contiguous(name: str) -> None:
    torch.manual_seed(0)
    x = small_input(name, batch=2)
    model = calibrated(create_model(name, 10, **FAST_KWARGS.get(name, {})), x)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    # Relative to the whole output: a deep random net amplifies the fp32 rounding differences
    # of the two kernel layouts to ~1e-4 (attention92), so allow 1e-3.
    assert (out - ref).norm() / ref.norm() < 1e-3


# Blocks whose bf16 output is compared with fp32 given the same fp32 input.
BLOCKS = (PreActBottleneck, AttentionModule, Bottleneck, BasicBlock, GridAttention, LTPAttention)
# Shallow enough that end-to-end bf16 logits stay close to fp32 at random init.
SHALLOW = {"attnvgg16", "ltpa_vgg_cifar", "streamlined_resnet18"}


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_bf16_autocast_matches_fp32(name: str) -> None:
    """bf16 autocast agrees with fp32 block by block (and end to end for shallow nets).

    A random-init deep ResNet amplifies any perturbation by a few percent per block (even
    torchvision's resnet50 ends ~50% off in bf16), so deep nets are checked per block: each
    block gets the fp32 model's input and must reproduce its output within 3%.
    """
    torch.manual_seed(0)
    x = small_input(name, batch=2)
    model = calibrated(create_model(name, 10, **FAST_KWARGS.get(name, {})), x)
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
    rows = describe_models(["attention56_cifar", "resnet50"])
    assert [r.name for r in rows] == ["attention56_cifar", "resnet50"]
    cifar, r50 = rows
    assert (r50.params, r50.input_size, r50.attention_maps) == (25_557_032, 224, ("cam",))
    assert cifar.input_size == 32 and cifar.attention_maps == ("stage1.0", "stage2.0", "stage3.0")
    assert r50.macs / 1e9 == pytest.approx(4.09, rel=0.01)
    table = format_model_table(rows)
    assert "attention56_cifar" in table and "25,557,032" in table
    assert len(table.splitlines()) == 4
