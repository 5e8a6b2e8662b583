"""A hostile dataset through prepare + shard: every bad file rejected with its reason, every good
one kept exactly once and decoded upright and RGB with the right pixel values.

The raw folder is in the Cassava layout (train.csv + train_images/ + label map) and is read by
the cassava layout adapter, the path a real competition download takes.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attnpipe.config import parse_recipe
from attnpipe.data import scan as scan_module
from attnpipe.data.layouts import LayoutError, read_csv_layout
from attnpipe.data.prepare import PrepareError, prepare
from attnpipe.data.shard import sample_key, shard
from attnpipe.paths import PipelinePaths

MAX_PIXELS = 50_000
LABELS = {"0": "leaf", "1": "stem"}


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(seed: int, size=(48, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _upright_two_tone() -> Image.Image:
    """20 wide, 40 tall: red on top, blue below, as it should look once upright."""
    image = Image.new("RGB", (20, 40), (220, 20, 20))
    image.paste((20, 20, 220), (0, 20, 20, 40))
    return image


def _exif_rotated_jpeg() -> bytes:
    # Stored sideways (40x20); EXIF orientation 6 = "rotate 90 degrees clockwise to display".
    stored = _upright_two_tone().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _sixteen_bit_png() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    return _encode(Image.fromarray(ramp), "PNG")  # mode I;16


def _corrupt_png() -> bytes:
    data = bytearray(_encode(_noise(99), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 40] = b"\x55" * 40  # garbled compressed pixels
    return bytes(data)


GOOD = {
    # name: (label, bytes)
    **{f"good_{i:02d}.jpg": (str(i % 2), _encode(_noise(i), "JPEG")) for i in range(12)},
    "cmyk.jpg": ("0", _encode(Image.new("RGB", (24, 24), (200, 30, 30)).convert("CMYK"), "JPEG")),
    "png16.png": ("1", _sixteen_bit_png()),
    "gray.png": ("0", _encode(Image.new("L", (24, 24), 200), "PNG")),
    "exif.jpg": ("1", _exif_rotated_jpeg()),
    "rgba.png": ("0", _encode(Image.new("RGBA", (24, 24), (0, 0, 0, 0)), "PNG")),
    "palette.png": ("1", _encode(Image.new("RGB", (24, 24), (0, 128, 0)).convert("P"), "PNG")),
}
BAD = {
    # name: (label, bytes or None for "not on disk", expected reason prefix)
    "corrupt.png": ("0", _corrupt_png(), "corrupt or truncated: broken data stream"),
    "corrupt.jpg": ("1", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3, "not an image"),
    "truncated.jpg": (
        "0",
        _encode(_noise(50), "JPEG")[: len(_encode(_noise(50), "JPEG")) * 6 // 10],
        "corrupt or truncated: image file is truncated",
    ),
    "empty.jpg": ("1", b"", "zero-byte file"),
    "text.jpg": ("0", b"this is a text file, renamed to .jpg\n" * 5, "not an image"),
    "huge.png": ("1", _encode(Image.new("RGB", (300, 300)), "PNG"), "too large: 300x300 exceeds"),
    "missing.jpg": ("0", None, "missing file"),
    "good_03_copy.jpg": (
        "0",
        GOOD["good_03.jpg"][1],
        "duplicate of good_03.jpg (labelled '0' here, '1' there)",
    ),
}


def make_hostile_project(root: Path, rows_extra: list[tuple[str, str]] = ()) -> PipelinePaths:
    paths = PipelinePaths(root, "hostile")
    images = paths.raw / "train_images"
    images.mkdir(parents=True)
    rows = []
    for name, (label, data) in GOOD.items():
        (images / name).write_bytes(data)
        rows.append((name, label))
    for name, (label, data, _) in BAD.items():
        if data is not None:
            (images / name).write_bytes(data)
        rows.append((name, label))
    rows.extend(rows_extra)
    with (paths.raw / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"])
        writer.writerows(rows)
    (paths.raw / "label_num_to_disease_map.json").write_text(json.dumps(LABELS))
    return paths


def _recipe(**prepare_options):
    return parse_recipe(
        {
            "source": {"kind": "kaggle-competition", "competition": "hostile"},
            "prepare": {"max_pixels": MAX_PIXELS, "max_reject_fraction": 0.5, **prepare_options},
            "shard": {"format": "png", "min_shards": 1, "workers": 1},
            "model": {"name": "resnet50"},
        },
        name="hostile",
    )


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    paths = make_hostile_project(tmp_path_factory.mktemp("hostile"))
    recipe = _recipe(workers=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scan_module, "SEQUENTIAL_BELOW", 0)  # scan in worker processes
        result = prepare(recipe, paths, progress=False)
    shard(recipe, paths, progress=False)
    return paths, result


def test_good_images_are_kept_once_and_bad_ones_rejected_with_reasons(hostile):
    paths, result = hostile
    manifest = pq.read_table(paths.manifest).to_pylist()
    assert sorted(r["id"] for r in manifest) == sorted(GOOD)  # each good one, exactly once
    with paths.rejected.open() as handle:
        rejected = {row["image_id"]: row["reason"] for row in csv.DictReader(handle)}
    assert sorted(rejected) == sorted(BAD)  # each bad one, and nothing else lost
    for name, (_, _, reason) in BAD.items():
        assert rejected[name].startswith(reason), (name, rejected[name])
    assert f"prepare.max_pixels={MAX_PIXELS}" in rejected["huge.png"]
    assert result.samples == len(GOOD) and result.rejected == len(BAD) - 1
    assert result.duplicates == 1
    report = json.loads(paths.data_report.read_text())
    assert sum(report["samples"].values()) == len(GOOD)
    assert report["rejected"] == len(BAD) - 1 and report["duplicates"] == 1


def test_manifest_records_upright_sizes_and_stored_modes(hostile):
    paths, _ = hostile
    rows = {r["id"]: r for r in pq.read_table(paths.manifest).to_pylist()}
    assert (rows["exif.jpg"]["width"], rows["exif.jpg"]["height"]) == (20, 40)  # swapped
    assert rows["cmyk.jpg"]["mode"] == "CMYK"
    assert rows["png16.png"]["mode"].startswith("I")
    assert rows["gray.png"]["mode"] == "L"
    assert rows["good_00.jpg"]["format"] == "JPEG"


def _shard_images(paths: PipelinePaths) -> dict[str, np.ndarray]:
    images = {}
    for tar_path in sorted(paths.shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext == "png":
                    data = tar.extractfile(member).read()
                    image = Image.open(io.BytesIO(data))
                    assert image.mode == "RGB"
                    images[key] = np.asarray(image).astype(int)
    return images


def test_shards_hold_upright_rgb_with_sensible_pixels(hostile):
    paths, _ = hostile
    images = _shard_images(paths)
    assert sorted(images) == sorted(sample_key(name) for name in GOOD)

    exif = images[sample_key("exif.jpg")]
    assert exif.shape == (40, 20, 3)  # height 40, width 20: upright
    top, bottom = exif[:16].mean(axis=(0, 1)), exif[24:].mean(axis=(0, 1))
    assert top[0] > 180 and top[2] < 60  # red on top ...
    assert bottom[2] > 180 and bottom[0] < 60  # ... blue below

    cmyk = images[sample_key("cmyk.jpg")].mean(axis=(0, 1))
    assert np.abs(cmyk - (200, 30, 30)).max() < 20  # CMYK -> RGB, not inverted

    ramp = images[sample_key("png16.png")]
    assert (ramp[..., 0] == ramp[..., 1]).all() and (ramp[..., 1] == ramp[..., 2]).all()
    assert ramp[0, 0, 0] == 0 and ramp[0, -1, 0] == 255  # 16 bits scaled, not clipped
    assert abs(ramp[0, 32, 0] - 130) <= 2 and (np.diff(ramp[0, :, 0]) >= 0).all()

    assert (images[sample_key("gray.png")] == 200).all()
    assert (images[sample_key("rgba.png")] == 255).all()  # transparent -> white
    palette = images[sample_key("palette.png")].mean(axis=(0, 1))
    assert np.abs(palette - (0, 128, 0)).max() < 3


def test_too_many_rejects_stop_the_stage_and_name_the_file(tmp_path: Path):
    paths = make_hostile_project(tmp_path)
    with pytest.raises(PrepareError, match=r"are unusable, more than prepare\.max_reject") as err:
        prepare(_recipe(max_reject_fraction=0.1), paths, progress=False)
    assert str(paths.rejected) in str(err.value)
    with paths.rejected.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(BAD) - 1  # duplicates come later


def test_unknown_labels_are_an_error_naming_the_rows(tmp_path: Path):
    paths = make_hostile_project(tmp_path, rows_extra=[("good_00.jpg", "2"), ("x.jpg", "leaf")])
    with pytest.raises(PrepareError) as caught:
        prepare(_recipe(), paths, progress=False)
    message = str(caught.value)
    first_extra_line = len(GOOD) + len(BAD) + 2  # header is line 1
    assert f"line {first_extra_line} (good_00.jpg: '2')" in message
    assert f"line {first_extra_line + 1} (x.jpg: 'leaf')" in message
    assert "2 row(s)" in message and "\n" not in message
    assert not paths.manifest.exists()


def test_duplicates_policy_error_names_both_files(tmp_path: Path):
    paths = make_hostile_project(tmp_path)
    with pytest.raises(PrepareError, match=r"good_03_copy\.jpg: duplicate of good_03\.jpg"):
        prepare(_recipe(duplicates="error"), paths, progress=False)


def test_image_ids_that_leave_the_image_folder_are_refused_by_line(tmp_path: Path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    rows = "image_id,label\nok.jpg,0\n../secret.jpg,0\n/etc/passwd,1\nsub/../../x.jpg,1\n"
    (raw / "train.csv").write_text(rows)
    with pytest.raises(LayoutError) as error:
        read_csv_layout(raw, "train.csv", "images", label_map=None)
    message = str(error.value)
    assert "must stay inside images/" in message
    assert "line 3 ('../secret.jpg')" in message
    assert "line 4 ('/etc/passwd')" in message
    assert "line 5 ('sub/../../x.jpg')" in message
    assert "ok.jpg" not in message


def test_csv_records_hold_the_image_path_and_shared_labels(tmp_path: Path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "train.csv").write_text("image_id,label\na,cat\nb,cat\nc,dog\n")
    index = read_csv_layout(raw, "train.csv", "images", label_map=None, image_suffix=".png")
    assert [r.path for r in index.records] == [raw / "images" / f"{n}.png" for n in "abc"]
    assert index.records[0].label is index.records[1].label  # one string per class, not per row
    assert index.class_names == ["cat", "dog"]
