"""ONNX export: every registry model agrees with PyTorch under ONNX Runtime, with a dynamic
batch axis; `attnpipe export` verifies on real test images and says size and latency."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import onnx
import pytest
import torch

from attnpipe.cli import main
from attnpipe.evaluate.export import (
    ExportError,
    compare,
    export_onnx,
    onnx_session,
    read_onnx_metadata,
)
from attnpipe.evaluate.run import split_images
from attnpipe.modelfile import load_model_file
from attnpipe.models import create_model, default_input_size, list_models
from tests.evaluate.conftest import copy_project


def _calibrated(name: str, size: int) -> torch.nn.Module:
    """A fresh model whose BatchNorm statistics match its activations, as after training.

    With initial statistics (mean 0, variance 1) the deepest networks' logits reach 1e4, and
    float32 rounding alone then differs by more than 1e-4 between any two runtimes.
    """
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: one batch sets the statistics
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    return model.eval()


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _check_size(name: str) -> int:
    """The input side each registry model is exported and compared at.

    The ImageNet layouts (224 px) at 96 px: a fifth of the forward passes' work, with the same
    graph and weights. 96 = 3 x 32, so every stage and soft-mask level has the parity it has at
    224 (48 24 12 6 3 vs 112 56 28 14 7) and the deepest maps are still 3 x 3, not a single
    cell (where bilinear upsampling and pooling would agree whatever their settings). The
    CIFAR layouts keep their 32 px.
    """
    return min(default_input_size(name), 96)


@pytest.mark.parametrize("name", list_models())
def test_registry_model_runs_the_same_under_onnx_runtime(name):
    size = _check_size(name)
    model = _calibrated(name, size)
    started = time.perf_counter()
    data = export_onnx(model, size, opset=17)  # traced with batch 1
    session = onnx_session(data, threads=1)
    graph = onnx.load_from_string(data)
    assert graph.opset_import[0].version >= 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.dim_value  # dynamic
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    for batch in (x, x[:1]):  # batch 2 through a graph traced at batch 1, then batch 1
        got = session.run(None, {"input": batch.numpy()})[0]
        want = expected[: len(batch)]
        assert got.shape == want.shape == (len(batch), 10)
        # Probabilities within 1e-4; logits within 1e-4 per unit of their scale (LTPA's reach
        # |30|, where float32 rounding alone is ~1e-4; the others stay below 1e-4 absolute).
        np.testing.assert_allclose(_softmax(got), _softmax(want), rtol=0, atol=1e-4)
        compare(want, got, atol=1e-4)
    print(f"{name}: export and check in {time.perf_counter() - started:.1f}s")


def test_compare_rejects_a_disagreeing_export():
    reference = np.array([[1.0, -2.0, 0.5]])
    assert compare(reference, reference + 5e-5) == pytest.approx(5e-5)
    with pytest.raises(ExportError, match="disagree"):
        compare(reference, reference + np.array([[0, 3e-4, 0]]))
    with pytest.raises(ExportError, match="disagree"):
        compare(reference, reference * np.nan)
    # Large logits: the bound scales with them (float32 rounding does too).
    big = reference * 1000
    assert compare(big, big + 0.05) == pytest.approx(0.05)
    with pytest.raises(ExportError, match="shape"):
        compare(reference, reference[:, :2])


def test_old_opsets_are_refused():
    with pytest.raises(ExportError, match="opset 13"):
        export_onnx(create_model("ltpa_vgg_cifar", num_classes=3), 32, opset=13)


def test_exported_digits_model_matches_pytorch_on_real_test_images(
    exported_project, trained_project
):
    paths, result = exported_project
    recipe, _ = trained_project
    assert result.path == paths.onnx_file and paths.onnx_file.stat().st_size == result.size_bytes
    assert result.samples_checked == 8 and result.max_abs_diff < 1e-4
    assert result.onnx_latency_ms > 0 and result.torch_latency_ms > 0
    model, payload = load_model_file(paths.model_file)
    meta = read_onnx_metadata(paths.onnx_file)
    for key in ("class_names", "input_size", "mean", "std", "git_commit", "data_version"):
        assert meta[key] == payload[key], key
    assert meta["flip_tta"] is False
    # Independently of the export's own check: 20 further test images, as one batch.
    images = split_images(recipe, paths, payload["input_size"], 28)[8:]
    with torch.no_grad():
        expected = model(images).numpy()
    got = onnx_session(paths.onnx_file, threads=1).run(None, {"input": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_export_command_prints_size_and_latency(trained_project, tmp_path, capsys):
    _, paths = trained_project
    copy = copy_project(paths, tmp_path)
    assert main(["--root", str(copy.root), "export", "digits", "--samples", "4"]) == 0
    out = capsys.readouterr().out
    assert copy.onnx_file.is_file()
    size_kb = copy.onnx_file.stat().st_size / 1e3
    assert f"{size_kb:.1f} kB" in out or f"{size_kb / 1e3:.2f} MB" in out
    assert "verified on 4 test images" in out
    assert "single-image CPU latency (1 thread, median of 20): ONNX Runtime" in out
    assert re.search(r"ONNX Runtime \d+\.\d\d ms, PyTorch \d+\.\d\d ms", out)
    assert json.loads(onnx.load(copy.onnx_file).metadata_props[0].value)["model_name"] == (
        "attention56_cifar"
    )
