"""A small ImageNet in the Kaggle layout, through the real `kaggle` client against a fake Kaggle
on loopback: fetch, prepare, shard, one epoch of training (1 Ray worker), evaluate."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from attnpipe.cli import main
from attnpipe.config import AugmentConfig, parse_recipe
from attnpipe.data.images import ImageInfo
from attnpipe.data.layouts import LayoutError, RawRecord, read_layout, read_synsets
from attnpipe.data.prepare import Sample, ScanFacts, _drop_duplicates
from attnpipe.data.transforms import build_transform, resize_for_crop
from attnpipe.evaluate.export import onnx_metadata
from attnpipe.evaluate.predict import Predictor, predict_files
from attnpipe.paths import PipelinePaths
from tests.conftest import write_project
from tests.data.fake_kaggle import FakeKaggle, point_client_at
from tests.wandb_offline import finished_runs, history_rows, summary

COMPETITION = "imagenet-object-localization-challenge"
DATA = "ILSVRC/Data/CLS-LOC"
# Not in sorted order, as a check that class i is line i of the mapping file; two synsets share
# the name "crane", as in the real file.
SYNSETS = [
    ("n03126707", "crane"),
    ("n01440764", "tench, Tinca tinca"),
    ("n02012849", "crane"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n02085620", "Chihuahua"),
    ("n04037443", "racer, race car, racing car"),
    ("n09999999", "a class without images"),
]
TRAIN_COUNTS = [7, 5, 6, 4, 8, 5, 0]  # unequal, one class empty
VAL_PER_CLASS = 2
RNG = np.random.default_rng(0)


def _encode(mode: str, fmt: str) -> bytes:
    """A distinct 40 x 32 image (noise: no two files are byte-identical)."""
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    pixels = RNG.integers(0, 256, (32, 40, channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def imagenet_files() -> tuple[dict[str, bytes], dict[str, str]]:
    """The archive's members, and each validation image's class."""
    files = {
        "LOC_synset_mapping.txt": "".join(f"{w} {n}\n" for w, n in SYNSETS).encode(),
        "LOC_sample_submission.csv": b"ImageId,PredictionString\nILSVRC2012_test_00000001,\n",
        "LOC_train_solution.csv": b"ImageId,PredictionString\n",
        "ILSVRC/Annotations/CLS-LOC/val/ILSVRC2012_val_00000001.xml": b"<annotation/>",
        "ILSVRC/ImageSets/CLS-LOC/test.txt": b"ILSVRC2012_test_00000001 1\n",
    }
    for i in range(1, 4):  # unlabelled: never part of a split
        files[f"{DATA}/test/ILSVRC2012_test_{i:08d}.JPEG"] = _encode("RGB", "JPEG")
    for (wnid, _), count in zip(SYNSETS, TRAIN_COUNTS, strict=True):
        for n in range(count):
            files[f"{DATA}/train/{wnid}/{wnid}_{n}.JPEG"] = _encode("RGB", "JPEG")
    # The real set's oddities: a PNG named .JPEG, a CMYK JPEG, a grayscale JPEG.
    files[f"{DATA}/train/n02085620/n02085620_0.JPEG"] = _encode("RGB", "PNG")
    files[f"{DATA}/train/n01440764/n01440764_1.JPEG"] = _encode("CMYK", "JPEG")
    files[f"{DATA}/train/n03126707/n03126707_2.JPEG"] = _encode("L", "JPEG")
    val_classes: dict[str, str] = {}
    rows = ["ImageId,PredictionString"]
    for n in range(VAL_PER_CLASS * len(SYNSETS)):
        image_id = f"ILSVRC2012_val_{n + 1:08d}"
        wnid = SYNSETS[(n * 3) % len(SYNSETS)][0]
        val_classes[image_id] = wnid
        rows.append(f"{image_id},{wnid} 1 2 30 20 {wnid} 4 5 38 30 ")  # two boxes, one class
        files[f"{DATA}/val/{image_id}.JPEG"] = _encode("L" if n == 0 else "RGB", "JPEG")
    files["LOC_val_solution.csv"] = ("\n".join(rows) + "\n").encode()
    return files, val_classes


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# Tiny everything; the recipe's data, split, schedule and evaluation protocol as written.
TINY = {
    "shard": {"image_size": 36, "min_shards": 2, "maxcount": 100},
    "prepare": {"splits": {"train": 0.8, "val": 0.2, "test": 0.0}, "workers": 1},
    "model": {"name": "attention56_cifar", "input_size": 32, "kwargs": {"width_multiplier": 0.25}},
    "train": {
        "workers": 1,
        "use_gpu": False,
        "cpus_per_worker": 1,
        "loader_workers": 0,
        "epochs": 1,
        "batch_size": 8,
        "max_failures": 0,
    },
    "tracking": {"wandb": {"mode": "offline"}},
    # Evaluated larger than trained (as Attention-92 at 320): resize 46, centre-crop 40.
    "evaluate": {"batch_size": 16, "crop_ratio": 0.875, "image_size": 40},
}


@pytest.mark.ray
def test_small_imagenet_from_kaggle_to_a_top5_report(tmp_path: Path, monkeypatch, capsys):
    files, val_classes = imagenet_files()
    server = FakeKaggle(competitions={COMPETITION: _zip(files)}, rules_not_accepted={COMPETITION})
    root = write_project(_mkdir(tmp_path / "project"), TINY, name="imagenet")
    server.start()
    # The client's proxy settings only while fetching: Ray's own connections must not use them.
    with monkeypatch.context() as kaggle_env:
        point_client_at(server, tmp_path / "home", kaggle_env)
        kaggle_env.setenv("KAGGLE_USERNAME", "alice")
        kaggle_env.setenv("KAGGLE_KEY", "alice-key")
        # The user's step first: accepting the rules, which the one error line points at.
        assert main(["--root", str(root), "fetch", "imagenet", "--no-progress"]) != 0
        rules = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
        assert rules in capsys.readouterr().err
        server.rules_not_accepted.clear()
        fetched = main(["--root", str(root), "fetch", "imagenet", "--no-progress"])
    server.stop()
    assert fetched == 0 and server.connects == []
    assert server.downloads() == [f"/files/competitions/{COMPETITION}.zip"]
    for stage in ("prepare", "shard", "train", "evaluate"):
        assert main(["--root", str(root), stage, "imagenet", "--no-progress"]) == 0, stage
    paths = PipelinePaths(root, "imagenet")

    # Only what the layout reads was extracted.
    assert not (paths.raw / DATA / "test").exists()
    assert not (paths.raw / "ILSVRC" / "Annotations").exists()
    assert not (paths.raw / "LOC_train_solution.csv").exists()

    # Class i is line i of the mapping, each with a unique human-readable name.
    classes = json.loads(paths.classes.read_text())["classes"]
    assert classes == [
        "crane (n03126707)",
        "tench",
        "crane (n02012849)",
        "goldfish",
        "Chihuahua",
        "racer",
        "a class without images",
    ]
    wnid_index = {wnid: i for i, (wnid, _) in enumerate(SYNSETS)}
    manifest = pq.read_table(paths.manifest).to_pylist()
    assert not list(paths.rejected.open())[1:]  # PNG, CMYK and grayscale are all usable
    for row in manifest:
        if row["split"] != "test":
            assert row["label"] == wnid_index[row["id"].split("_")[0]]
    by_id = {row["id"]: row for row in manifest}
    assert by_id["n02085620_0"]["format"] == "PNG"
    assert by_id["n01440764_1"]["mode"] == "CMYK" and by_id["n03126707_2"]["mode"] == "L"

    # The test split is exactly the published validation images with their classes.
    test_rows = {row["id"]: row["label"] for row in manifest if row["split"] == "test"}
    assert test_rows == {image_id: wnid_index[w] for image_id, w in val_classes.items()}
    train_val = [row for row in manifest if row["split"] in ("train", "val")]
    assert len(train_val) == sum(TRAIN_COUNTS)
    assert {row["split"] for row in train_val} == {"train", "val"}

    # Top-5 in validation (history and W&B), the test metrics, the report page and W&B.
    with paths.train_history.open() as handle:
        history = list(csv.DictReader(handle))
    assert len(history) == 1 and 0 <= float(history[0]["val_top5_accuracy"]) <= 1
    metrics = json.loads(paths.metrics.read_text())["test"]
    assert metrics["test_samples"] == len(val_classes)
    assert metrics["top5_accuracy"] >= metrics["accuracy"]
    assert "Top-5 accuracy" in paths.report_html.read_text()
    runs = finished_runs(root / "wandb", count=2)  # training's and evaluate's
    logged = {key for run in runs for row in history_rows(run.records) for key in row}
    assert any(key.startswith("val") and "top5_accuracy" in key for key in logged), logged
    tests = [summary(run.records).get("test/top5_accuracy") for run in runs]
    assert metrics["top5_accuracy"] in tests


def test_layout_errors_name_the_file(tmp_path: Path):
    source = {"kind": "kaggle-competition", "competition": COMPETITION, "layout": "imagenet"}
    recipe = parse_recipe({"source": source, "model": {"name": "attention56"}}, name="imagenet")
    with pytest.raises(LayoutError, match=r"LOC_synset_mapping\.txt is missing"):
        read_layout(recipe, tmp_path)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench\nn01440764 tench\n")
    with pytest.raises(LayoutError, match="listed twice"):
        read_synsets(tmp_path / "LOC_synset_mapping.txt")
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench\n")
    (tmp_path / DATA / "train" / "n99999999").mkdir(parents=True)
    with pytest.raises(LayoutError, match="n99999999 are not synsets"):
        read_layout(recipe, tmp_path)


def test_crop_ratio_resizes_the_shorter_side_then_centre_crops():
    image = torch.from_numpy(RNG.integers(0, 256, (3, 300, 400), dtype=np.uint8))
    protocol = build_transform(AugmentConfig(), 224, train=False, crop_ratio=0.875)
    expected = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(image))
    assert torch.equal(protocol.augment(image), expected)
    plain = build_transform(AugmentConfig(), 224, train=False)  # the default: as before
    assert torch.equal(plain.augment(image), v2.CenterCrop(224)(v2.Resize(224)(image)))
    assert resize_for_crop(320, 0.875) == 366 and resize_for_crop(32, 1.0) == 32


def _samples(*specs: tuple[str, str, str]) -> tuple[list[Sample], ScanFacts]:
    """(image id, split, content) -> samples and their scan facts (equal content: equal sha)."""
    infos = [
        ImageInfo(8, 8, "RGB", "JPEG", hashlib.sha256(content.encode()).hexdigest(), 10)
        for _, _, content in specs
    ]
    samples = [
        Sample(RawRecord(image_id, image_id, "n01440764", split=split), 0, row)
        for row, (image_id, split, _) in enumerate(specs)
    ]
    return samples, ScanFacts.of(infos)


def test_official_test_images_are_never_dropped_as_duplicates_but_training_copies_are():
    samples, facts = _samples(
        ("ILSVRC2012_val_00000002", "test", "same"),
        ("ILSVRC2012_val_00000001", "test", "same"),
        ("A_train_copy", "train", "same"),  # sorts first by id: kept without the rule
        ("n01440764_1", "train", "other"),
    )
    kept, dropped = _drop_duplicates(samples, "keep-first", facts, official_test=True)
    assert sorted(s.record.image_id for s in kept) == [
        "ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002", "n01440764_1",
    ]  # fmt: skip
    assert [(s.record.image_id, why) for s, why in dropped] == [
        ("A_train_copy", "duplicate of ILSVRC2012_val_00000001")
    ]
    kept, _ = _drop_duplicates(samples, "keep-first", facts)  # no official split: by id
    assert sorted(s.record.image_id for s in kept) == ["A_train_copy", "n01440764_1"]


class _Recorder(Predictor):
    """A stand-in model (only the model: files are read and transformed for real) that keeps
    the batches `predict` feeds it."""

    def __init__(self, crop_ratio: float) -> None:
        self.source, self.class_names, self.input_size = Path("m"), ["a", "b", "c"], 8
        self.mean, self.std, self.flip_tta, self.threshold = [0.0] * 3, [1.0] * 3, False, 0.5
        self.crop_ratio = crop_ratio
        self.batches: list[np.ndarray] = []

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch)
        return np.full((len(batch), 3), 1 / 3)


def test_predict_and_onnx_metadata_follow_the_crop_ratio(tmp_path: Path):
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[4:12, 4:12] = 255  # a white centre in a black frame
    Image.fromarray(pixels).save(tmp_path / "frame.png")
    centre, whole = _Recorder(crop_ratio=0.5), _Recorder(crop_ratio=1.0)
    for predictor in (centre, whole):
        predict_files(predictor, [tmp_path / "frame.png"])
    assert centre.batches[0].shape == (1, 3, 8, 8) and centre.batches[0].min() == 1.0
    assert whole.batches[0].min() < 0.5  # resized whole to 8: the frame is still in
    payload = {"model_name": "m", "class_names": ["a"], "input_size": 8, "mean": [0] * 3}
    metadata = onnx_metadata({**payload, "std": [1] * 3}, False, 0.5, crop_ratio=0.875)
    assert metadata["crop_ratio"] == 0.875
