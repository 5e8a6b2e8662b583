"""`attnpipe predict`: good, broken and non-image files in one folder, with model.pt and with
the ONNX file; Kaggle submissions that follow a sample_submission.csv exactly."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from attnpipe.cli import main

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
GOOD = 12


@pytest.fixture(scope="module")
def image_folder(
    evaluated_project, exported_project, tmp_path_factory
) -> tuple[Path, dict[str, str], list[str]]:
    """12 test images (their raw PNGs), a truncated PNG, a text file and an empty '.jpg'.

    Returns (folder, {file name: class the evaluation predicted}, broken file names)."""
    paths, _ = evaluated_project
    manifest = pq.read_table(paths.manifest, columns=["id", "split"]).to_pylist()
    test_ids = sorted(row["id"] for row in manifest if row["split"] == "test")[:GOOD]
    with paths.confusion.open(newline="") as handle:
        evaluated = {row["id"]: row["predicted"] for row in csv.DictReader(handle)}
    folder = tmp_path_factory.mktemp("to_predict")
    expected = {}
    for image_id in test_ids:
        shutil.copy(paths.raw / "train_images" / image_id, folder / image_id)
        expected[image_id] = evaluated[image_id]
    first = (folder / test_ids[0]).read_bytes()
    (folder / "truncated.png").write_bytes(first[: len(first) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(b"ignored: hidden files are skipped")
    return folder, expected, ["empty.jpg", "notes.txt", "truncated.png"]


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("model_file", ["model.pt", "model.onnx"])
def test_predict_folder_with_broken_files(exported_project, image_folder, model_file, tmp_path):
    paths, _ = exported_project
    folder, expected, broken = image_folder
    out = tmp_path / "predictions.csv"
    code = main(["predict", str(folder), "--model", str(paths.models / model_file), "-o", str(out)])
    assert code == 1  # some files failed
    rows = _read_csv(out)
    assert [Path(r["file"]).name for r in rows] == sorted([*expected, *broken])
    for row in rows:
        name = Path(row["file"]).name
        if name in broken:
            assert row["error"] and not row["class"] and not row["probability"], row
            continue
        assert not row["error"]
        # The same class evaluation gave this test image (same decoding and transform).
        assert row["class"] == expected[name], name
        assert DIGITS[int(row["class_index"])] == row["class"]
        assert 0.1 <= float(row["probability"]) <= 1  # the top class of 10
    errors = {Path(r["file"]).name: r["error"] for r in rows if r["error"]}
    assert errors["empty.jpg"] == "zero-byte file"
    assert errors["notes.txt"] == "not an image (unrecognised format)"
    assert errors["truncated.png"].startswith("corrupt or truncated")


def test_predict_table_and_error_lines(exported_project, image_folder, capsys):
    paths, _ = exported_project
    folder, expected, _ = image_folder
    good = sorted(expected)[:2]
    code = main(
        [
            "predict",
            str(folder / good[0]),
            str(folder / good[1]),
            str(folder / "missing.png"),
            str(folder / "notes.txt"),
            "-m",
            str(paths.model_file),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.out.splitlines()
    assert lines[0].split() == ["file", "class", "probability"]
    for name in good:
        (line,) = [x for x in lines if name in x]
        assert line.split()[1] == expected[name]
        assert 0 < float(line.split()[2]) <= 1
    (error,) = captured.err.splitlines()  # one line, naming each failed file and why
    assert error.startswith("attnpipe: error: 2 of 4 file(s) could not be predicted")
    assert "missing.png (no such file)" in error and "notes.txt (not an image" in error
    assert any(line.split()[:2] == [str(folder / "notes.txt"), "ERROR"] for line in lines)
    # Only good files: exit status 0.
    assert main(["predict", str(folder / good[0]), "-m", str(paths.onnx_file)]) == 0


def _sample_submission(path: Path, ids: list[str]) -> None:
    path.write_text("image_id,label\n" + "".join(f"{i},4\n" for i in ids))


def test_kaggle_submission_follows_the_sample_exactly(exported_project, image_folder, tmp_path):
    paths, _ = exported_project
    folder, expected, _ = image_folder
    good_folder = tmp_path / "test_images"
    good_folder.mkdir()
    for name in expected:
        shutil.copy(folder / name, good_folder / name)
    ids = sorted(expected, reverse=True)  # an order that is not the folder's
    sample = tmp_path / "sample_submission.csv"
    _sample_submission(sample, ids)
    out = tmp_path / "submission.csv"
    code = main(
        [
            "predict",
            str(good_folder),
            "-m",
            str(paths.onnx_file),
            "--kaggle-submission",
            "--sample-submission",
            str(sample),
            "-o",
            str(out),
        ]
    )
    assert code == 0
    written = out.read_text().splitlines()
    assert written[0] == sample.read_text().splitlines()[0] == "image_id,label"
    rows = [line.split(",") for line in written[1:]]
    assert [r[0] for r in rows] == ids
    assert [int(r[1]) for r in rows] == [DIGITS.index(expected[i]) for i in ids]


def test_kaggle_submission_keeps_every_sample_row_when_images_fail(
    exported_project, image_folder, tmp_path, monkeypatch
):
    paths, _ = exported_project
    folder, expected, _ = image_folder
    some = sorted(expected)[:3]
    sample = tmp_path / "sample_submission.csv"
    _sample_submission(sample, ["truncated.png", *some, "not_there.png"])
    monkeypatch.chdir(tmp_path)  # the default output is ./submission.csv
    code = main(
        [
            "predict",
            str(folder),
            "-m",
            str(paths.model_file),
            "--kaggle-submission",
            "--sample-submission",
            str(sample),
        ]
    )
    assert code == 1
    rows = [line.split(",") for line in (tmp_path / "submission.csv").read_text().splitlines()]
    assert rows[0] == ["image_id", "label"]
    assert [r[0] for r in rows[1:]] == ["truncated.png", *some, "not_there.png"]
    assert rows[1][1] == "4" and rows[-1][1] == "4"  # failed: the sample's label is kept
    assert [int(r[1]) for r in rows[2:-1]] == [DIGITS.index(expected[i]) for i in some]


def test_kaggle_submission_without_a_sample(exported_project, image_folder, tmp_path):
    paths, _ = exported_project
    folder, expected, _ = image_folder
    out = tmp_path / "submission.csv"
    code = main(
        ["predict", str(folder), "-m", str(paths.model_file), "--kaggle-submission", "-o", str(out)]
    )
    assert code == 1  # the broken files
    lines = out.read_text().splitlines()
    assert lines[0] == "image_id,label"
    assert [line.split(",")[0] for line in lines[1:]] == sorted(expected)


def test_sample_submission_must_have_two_columns(exported_project, image_folder, tmp_path):
    paths, _ = exported_project
    folder, _, _ = image_folder
    sample = tmp_path / "sample.csv"
    sample.write_text("a,b,c\n1,2,3\n")
    args = ["predict", str(folder), "-m", str(paths.model_file), "--kaggle-submission"]
    assert main([*args, "--sample-submission", str(sample), "-o", str(tmp_path / "s.csv")]) == 1


def test_predict_and_evaluate_decide_a_binary_task_with_the_same_threshold(
    trained_project, image_folder, tmp_path
):
    """A model whose positive probability is 0.7 for every image, evaluated at threshold 0.9:
    negative for evaluate's confusion rows and for predict with model.pt and with the ONNX
    file (argmax alone would say positive)."""
    import math

    import numpy as np
    import torch

    from attnpipe.config import apply_overrides
    from attnpipe.evaluate.export import export_onnx, onnx_metadata
    from attnpipe.evaluate.run import SplitResult, write_confusion_rows
    from attnpipe.modelfile import Provenance, read_payload, write_model_file
    from attnpipe.models import create_model

    recipe, _ = trained_project
    recipe = apply_overrides(recipe, {"evaluate.threshold": 0.9}, origin="test")
    model = create_model("attention56_cifar", 2, width_multiplier=0.25).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, math.log(0.7 / 0.3)]))
    model_file = tmp_path / "binary.pt"
    names = ["benign", "malignant"]
    write_model_file(model_file, recipe, model.state_dict(), names, Provenance(1, {}, "", "", ""))
    onnx_file = tmp_path / "binary.onnx"
    metadata = onnx_metadata(read_payload(model_file), False, recipe.evaluate.threshold)
    export_onnx(model, 32, onnx_file, metadata=metadata)

    folder, expected, _ = image_folder
    images = sorted(expected)[:3]
    confusion = tmp_path / "confusion.csv"
    probs = np.tile([0.3, 0.7], (3, 1))
    write_confusion_rows(
        confusion, SplitResult.from_probs(images, np.array([1, 1, 1]), probs, names, 0.9)
    )
    assert {row["predicted"] for row in _read_csv(confusion)} == {"benign"}
    for model_path in (model_file, onnx_file):
        out = tmp_path / f"{model_path.suffix[1:]}.csv"
        files = [str(folder / name) for name in images]
        assert main(["predict", *files, "-m", str(model_path), "-o", str(out)]) == 0
        rows = _read_csv(out)
        assert {r["class"] for r in rows} == {"benign"}, (model_path, rows)
        assert all(float(r["probability"]) == pytest.approx(0.3, abs=1e-4) for r in rows)
