"""`predict`: the class and its probability for image files, with `model.pt` or `model.onnx`.

Images are decoded like `prepare` decodes them (EXIF orientation, any mode to RGB) and
transformed like evaluation (resize, centre crop, normalise), with the recipe's flip TTA when
it was on. A file that is not a usable image gets an error instead of a prediction; the others
are still predicted.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnpipe.data.images import BadImage
from attnpipe.errors import AttnpipeError
from attnpipe.evaluate.inference import eval_transform, flip_tta_numpy, load_image_tensor
from attnpipe.metrics import predict_classes
from attnpipe.modelfile import decision_threshold
from attnpipe.predictions import class_log_probabilities

ONNX_SUFFIXES = {".onnx"}


class PredictError(AttnpipeError, ValueError):
    pass


@dataclass(frozen=True)
class Prediction:
    path: Path
    class_index: int | None = None
    class_name: str | None = None
    probability: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Predictor:
    """A model file with what it needs to read images and decide: classes, input size,
    mean/std, flip TTA and the binary decision threshold (the ones evaluate used)."""

    source: Path
    class_names: list[str]
    input_size: int
    crop_ratio: float  # evaluate.crop_ratio: resize to input_size / crop_ratio, centre-crop
    mean: list[float]
    std: list[float]
    flip_tta: bool
    threshold: float

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities of a normalised float32 (N, 3, S, S) batch."""
        return flip_tta_numpy(self._probabilities, batch, self.flip_tta)


class TorchPredictor(Predictor):
    def __init__(self, path: Path):
        from attnpipe.modelfile import load_model_file

        self.source = path
        self.model, payload = load_model_file(path)
        self.class_names = list(payload["class_names"])
        self.input_size = int(payload["input_size"])
        self.mean, self.std = list(payload["mean"]), list(payload["std"])
        recipe = payload.get("recipe") or {}
        self.flip_tta = bool(recipe.get("evaluate", {}).get("flip_tta", False))
        self.crop_ratio = float(recipe.get("evaluate", {}).get("crop_ratio", 1.0))
        self.threshold = decision_threshold(payload)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        # The same function evaluate and validation use (flip TTA included).
        with torch.inference_mode():
            log_probs = class_log_probabilities(self.model, torch.from_numpy(batch), self.flip_tta)
        return np.exp(log_probs.numpy().astype(np.float64))


class OnnxPredictor(Predictor):
    def __init__(self, path: Path):
        from attnpipe.evaluate.export import INPUT_NAME, onnx_session, read_onnx_metadata

        self.source = path
        meta = read_onnx_metadata(path)
        self.session = onnx_session(path)
        self.input_name = INPUT_NAME
        self.class_names = list(meta["class_names"])
        self.input_size = int(meta["input_size"])
        self.mean, self.std = list(meta["mean"]), list(meta["std"])
        self.flip_tta = bool(meta.get("flip_tta", False))
        self.crop_ratio = float(meta.get("crop_ratio", 1.0))
        self.threshold = float(meta.get("threshold", 0.5))

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: batch.astype(np.float32)})[0]
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)


def load_predictor(path: Path) -> Predictor:
    """`model.pt` (PyTorch) or an ONNX file written by `attnpipe export` (by suffix)."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    if path.suffix.lower() in ONNX_SUFFIXES:
        return OnnxPredictor(path)
    return TorchPredictor(path)


def collect_files(inputs: Sequence[Path]) -> list[Path]:
    """Files as given; for a folder, its files (not hidden, not recursive) sorted by name.

    A path that does not exist is kept, so it gets its own error line.
    """
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(
                sorted(p for p in item.iterdir() if p.is_file() and not p.name.startswith("."))
            )
        else:
            files.append(item)
    return files


def predict_files(
    predictor: Predictor, files: Sequence[Path], batch_size: int = 32
) -> list[Prediction]:
    """One `Prediction` per file, in order; unusable files carry `error`."""
    transform = eval_transform(
        predictor.input_size, predictor.mean, predictor.std, predictor.crop_ratio
    )
    results: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        tensors: list[torch.Tensor] = []
        outcome: list[Prediction | int] = []
        for path in chunk:
            try:
                if not path.exists():
                    raise BadImage("no such file")
                if not path.is_file():
                    raise BadImage("not a file")
                tensors.append(load_image_tensor(path, transform))
                outcome.append(len(tensors) - 1)
            except BadImage as error:
                outcome.append(Prediction(path, error=error.reason))
        probs = (
            predictor.probabilities(torch.stack(tensors).numpy()) if tensors else np.zeros((0, 0))
        )
        for path, item in zip(chunk, outcome, strict=True):
            if isinstance(item, Prediction):
                results.append(item)
                continue
            index = int(predict_classes(probs[item : item + 1], predictor.threshold)[0])
            results.append(
                Prediction(
                    path,
                    class_index=index,
                    class_name=predictor.class_names[index],
                    probability=float(probs[item, index]),
                )
            )
    return results


# --------------------------------------------------------------------------- outputs
CSV_COLUMNS = ["file", "class_index", "class", "probability", "error"]


def write_predictions_csv(rows: Sequence[Prediction], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    str(row.path),
                    "" if row.class_index is None else row.class_index,
                    row.class_name or "",
                    "" if row.probability is None else f"{row.probability:.6f}",
                    row.error or "",
                ]
            )


def format_table(rows: Sequence[Prediction]) -> str:
    body = [
        (
            str(r.path),
            r.class_name if r.ok else "ERROR",
            f"{r.probability:.4f}" if r.ok else r.error or "",
        )
        for r in rows
    ]
    header = ("file", "class", "probability")
    widths = [max(len(x[i]) for x in (header, *body)) for i in range(2)]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]}"]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in body]
    return "\n".join(lines)


@dataclass(frozen=True)
class Submission:
    path: Path
    rows: int
    problems: list[str]  # ids that could not be predicted (they keep the sample's value)


def write_submission(
    rows: Sequence[Prediction], path: Path, sample: Path | None = None
) -> Submission:
    """Kaggle's `image_id,label` CSV: label is the predicted class index, the id the file name.

    With a `sample` submission: its header and its ids in its order, exactly; an id whose image
    was not given or could not be read keeps the sample's label (and is reported). Without: a
    row per predicted file, by file name.
    """
    by_name = {r.path.name: r for r in rows}
    by_stem = {r.path.stem: r for r in rows}
    problems: list[str] = []
    if sample is None:
        header = ["image_id", "label"]
        ordered = sorted(rows, key=lambda r: r.path.name)
        body = [[r.path.name, str(r.class_index)] for r in ordered if r.ok]
        problems = [f"{r.path.name}: {r.error}" for r in ordered if not r.ok]
    else:
        with sample.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None) or []
            sample_rows = [row for row in reader if row]
        if len(header) != 2:
            raise PredictError(
                f"{sample}: expected two columns (id, label), found {len(header)}: {header}"
            )
        body = []
        for sample_id, default in sample_rows:
            match = by_name.get(sample_id) or by_stem.get(sample_id)
            if match is None:
                problems.append(f"{sample_id}: not among the input images")
                body.append([sample_id, default])
            elif not match.ok:
                problems.append(f"{sample_id}: {match.error}")
                body.append([sample_id, default])
            else:
                body.append([sample_id, str(match.class_index)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
    return Submission(path, len(body), problems)
