"""`export`: `models/<name>/model.pt` -> `models/<name>/model.onnx`, checked before it is kept.

The graph takes `input` (N, 3, S, S) float32, normalised like evaluation, with a dynamic batch
axis, and returns `logits` (N, C). Everything `predict` needs to use the file on its own is in
the ONNX metadata (`attnpipe` key, JSON): class names, input size, mean/std, flip TTA, and the
provenance of model.pt. The export is verified against PyTorch with ONNX Runtime on real
images from the test shards (batch of several, and a single image) before it replaces the
previous file.
"""

from __future__ import annotations

import io
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnpipe.config import Recipe
from attnpipe.errors import AttnpipeError
from attnpipe.evaluate.run import split_images
from attnpipe.modelfile import load_model_file
from attnpipe.paths import PipelinePaths

DEFAULT_OPSET = 17
METADATA_KEY = "attnpipe"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# ONNX Runtime and PyTorch pick different kernels: logits agree to ~1e-5 relative to their
# scale. The check allows ATOL per unit of the largest |logit| (and never less than ATOL).
ATOL = 1e-4


class ExportError(AttnpipeError, RuntimeError):
    pass


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size_bytes: int
    samples_checked: int
    max_abs_diff: float
    onnx_latency_ms: float
    torch_latency_ms: float
    opset: int


def onnx_metadata(
    payload: dict[str, Any], flip_tta: bool, threshold: float, crop_ratio: float = 1.0
) -> dict[str, Any]:
    """What `predict` needs to use the ONNX file alone, with evaluate's decision rule."""
    return {
        "model_name": payload["model_name"],
        "model_kwargs": payload.get("model_kwargs", {}),
        "class_names": list(payload["class_names"]),
        "input_size": int(payload["input_size"]),
        "mean": list(payload["mean"]),
        "std": list(payload["std"]),
        "flip_tta": bool(flip_tta),
        "crop_ratio": float(crop_ratio),
        "threshold": float(threshold),
        "epoch": payload.get("epoch"),
        "git_commit": payload.get("git_commit"),
        "data_version": payload.get("data_version"),
        "run_name": payload.get("run_name"),
    }


def export_onnx(
    model: torch.nn.Module,
    input_size: int,
    path: Path | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """Serialise `model` (eval mode) to ONNX with a dynamic batch axis; return the bytes and,
    with `path`, write them there atomically."""
    import onnx

    if opset < 17:
        raise ExportError(f"opset {opset} is too old: use 17 or newer")
    model = model.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter: deprecated in favour of torch.export (which would
        # need onnxscript and exports these networks 3-4x slower), still the supported path.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    if metadata is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    proto.producer_name = "attnpipe"
    data = proto.SerializeToString()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".onnx.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return data


def onnx_session(model: bytes | Path, threads: int = 0):
    """An ONNX Runtime CPU session (`threads` 0: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    session = onnx_session(path, threads=1)
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ExportError(f"{path} has no '{METADATA_KEY}' metadata: export it with attnpipe")
    return json.loads(raw)


def compare(reference: np.ndarray, candidate: np.ndarray, atol: float = ATOL) -> float:
    """Max |difference|; raises ExportError beyond `atol` per unit of the largest |logit|."""
    if reference.shape != candidate.shape:
        raise ExportError(f"ONNX output shape {candidate.shape} != PyTorch {reference.shape}")
    diff = float(np.max(np.abs(reference - candidate)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    if not np.isfinite(diff) or diff > atol * scale:
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree: max |logit difference| {diff:.3g} > "
            f"{atol * scale:.3g}"
        )
    return diff


def latency_ms(run, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of `run()` in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def export(
    recipe: Recipe, paths: PipelinePaths, opset: int = DEFAULT_OPSET, samples: int = 16
) -> ExportResult:
    """Export model.pt to model.onnx, verify it on `samples` real test images, time it."""
    model, payload = load_model_file(paths.model_file)
    size = int(payload["input_size"])
    data = export_onnx(
        model,
        size,
        opset=opset,
        metadata=onnx_metadata(
            payload,
            recipe.evaluate.flip_tta,
            recipe.evaluate.threshold,
            recipe.evaluate.crop_ratio,
        ),
    )
    images = split_images(recipe, paths, size, samples)
    if not len(images):
        raise ExportError("the test split is empty: nothing real to verify the export on")
    session = onnx_session(data)
    with torch.inference_mode():
        reference = model(images).numpy()
    diff = compare(reference, session.run(None, {INPUT_NAME: images.numpy()})[0])
    single = images[:1].numpy()
    diff = max(diff, compare(reference[:1], session.run(None, {INPUT_NAME: single})[0]))
    # Only a verified file replaces the previous one.
    tmp = paths.onnx_file.with_suffix(".onnx.tmp")
    paths.onnx_file.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    tmp.replace(paths.onnx_file)

    # Latency on one thread for both runtimes: comparable, and stable on a shared machine
    # (several intra-op threads spin-waiting on busy cores can take 100x longer).
    single_thread = onnx_session(data, threads=1)
    onnx_ms = latency_ms(lambda: single_thread.run(None, {INPUT_NAME: single}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            torch_ms = latency_ms(lambda: model(images[:1]))
    finally:
        torch.set_num_threads(threads)
    result = ExportResult(
        path=paths.onnx_file,
        size_bytes=len(data),
        samples_checked=len(images),
        max_abs_diff=diff,
        onnx_latency_ms=onnx_ms,
        torch_latency_ms=torch_ms,
        opset=opset,
    )
    share_export(recipe, paths, payload, result)
    return result


def share_export(
    recipe: Recipe, paths: PipelinePaths, payload: dict[str, Any], result: ExportResult
) -> None:
    """The ONNX file as a new version of the training run's model artifact (alias "onnx"),
    from a run of job type "export" in that run's group; the check's numbers as its summary."""
    from attnpipe import tracking

    config = recipe.tracking.wandb
    if config.mode == "disabled":
        return
    run = tracking.follow_up_run(
        config,
        paths.wandb_parent,
        payload,
        "export",
        {"pipeline": recipe.name, "opset": result.opset},
    )
    run.summary(
        {
            "export/size_bytes": result.size_bytes,
            "export/samples_checked": result.samples_checked,
            "export/max_abs_diff": result.max_abs_diff,
            "export/onnx_latency_ms": result.onnx_latency_ms,
            "export/torch_latency_ms": result.torch_latency_ms,
        }
    )
    run.log_model(
        result.path,
        name=f"model-{payload.get('run_name') or recipe.name}",
        metadata={"format": "onnx", "opset": result.opset, "epoch": payload.get("epoch")},
        aliases=tracking.artifact_aliases(
            "onnx", payload.get("git_commit"), tracking.experiment_name()
        ),
    )
    tracking.finish_and_say(run)


def format_size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
