"""torchvision and folder sources, on tiny files in the datasets' real on-disk formats.

Nothing is downloaded: the CIFAR batches are pickled dicts exactly like the published ones
(uint8 `data` N x 3072 in R,G,B planes; `labels` / `fine_labels`; Python-2 style pickles whose
arrays name `numpy.core.multiarray`), FGVC-Aircraft is its `data/` folder of text files and
JPEGs with the 20-pixel banner at the bottom.
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnpipe.config import parse_recipe
from attnpipe.data import torchvision_source as tvs
from attnpipe.data.layouts import read_layout
from attnpipe.data.prepare import SPLITS, prepare
from attnpipe.data.sources import MARKER_NAME, FetchError, fetch
from attnpipe.paths import PipelinePaths

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


def _recipe(source: dict, **sections):
    return parse_recipe({"source": source, "model": {"name": "resnet50"}, **sections}, name="t")


def _write_pickle(path: Path, payload: dict) -> None:
    data = pickle.dumps(payload, protocol=2)
    # The published files were written by numpy 1.x: same bytes, older module name.
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _cifar_pixels(label: int, index: int) -> np.ndarray:
    """A 32x32 RGB image whose channels encode who it is: R=label*20, G=index, B=column*8."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[..., 0] = label * 20
    image[..., 1] = index
    image[..., 2] = (np.arange(32) * 8)[None, :]
    return image


def make_cifar10(root: Path, per_batch: int = 3, test: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _write_pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_vis": 3072})
    counter = 0
    batches = [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]
    for name, count in batches:
        labels = [(counter + k) % 10 for k in range(count)]
        images = [_cifar_pixels(label, counter + k) for k, label in enumerate(labels)]
        data = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])  # R, G, B planes
        _write_pickle(folder / name, {"batch_label": name, "labels": labels, "data": data})
        counter += count
    return folder


def test_cifar10_batches_become_pngs_with_labels_and_official_split(tmp_path: Path):
    folder = make_cifar10(tmp_path / "cache")
    raw = tmp_path / "raw"
    assert tvs.convert_cifar(folder, "CIFAR10", raw, progress=False) == 19
    with (raw / "train.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["split"] for r in rows].count("train") == 15
    assert [r["split"] for r in rows].count("test") == 4
    assert json.loads((raw / "label_map.json").read_text())["9"] == "truck"
    for position, row in enumerate(rows):
        pixels = np.asarray(Image.open(raw / "train_images" / row["image_id"]))
        expected = _cifar_pixels(int(row["label"]), position)
        np.testing.assert_array_equal(pixels, expected)  # planes put back in the right order


def test_cifar100_uses_fine_labels(tmp_path: Path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i:02d}" for i in range(100)]
    _write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["x"] * 20})
    for split, labels in (("train", [7, 99, 0]), ("test", [42])):
        data = np.stack([_cifar_pixels(0, i).transpose(2, 0, 1).reshape(-1) for i in labels])
        payload = {"fine_labels": labels, "coarse_labels": [0] * len(labels), "data": data}
        _write_pickle(folder / split, payload)
    raw = tmp_path / "raw"
    tvs.convert_cifar(folder, "CIFAR100", raw, progress=False)
    with (raw / "train.csv").open() as handle:
        assert [(r["label"], r["split"]) for r in csv.DictReader(handle)] == [
            ("7", "train"), ("99", "train"), ("0", "train"), ("42", "test"),
        ]  # fmt: skip
    assert json.loads((raw / "label_map.json").read_text())["99"] == "class99"


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path):
    class Evil:
        # Not `print`: other tests in the session may have patched it (Ray Train does).
        def __reduce__(self):
            return (eval, ("__import__('os').getcwd()",))

    path = tmp_path / "batches.meta"
    path.write_bytes(pickle.dumps({"label_names": Evil()}))
    with pytest.raises(FetchError, match=r"refusing to load builtins\.eval"):
        tvs.read_cifar_pickle(path)


def test_cifar_files_that_do_not_match_the_published_md5_are_refused(tmp_path: Path):
    folder = make_cifar10(tmp_path)
    with pytest.raises(FetchError, match="does not match its published MD5"):
        tvs.verify_cifar("CIFAR10", folder)


def test_cifar10_recipe_fetches_then_prepares_with_the_official_test_split(
    tmp_path: Path, monkeypatch
):
    cache = tmp_path / "cache"
    make_cifar10(cache, per_batch=6, test=10)
    monkeypatch.setattr(tvs, "verify_cifar", lambda name, folder: None)  # fake files
    import torchvision.datasets.utils

    def no_download(*args, **kwargs):
        raise AssertionError("the archive is unpacked already: nothing to download")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", no_download)
    recipe = _recipe(
        {"kind": "torchvision", "dataset": "CIFAR10", "download_dir": str(cache)},
        prepare={"test_split": "official", "splits": {"train": 0.8, "val": 0.2, "test": 0.0}},
        shard={"format": "png", "min_shards": 1},
    )
    paths = PipelinePaths(tmp_path, "t")
    fetch(recipe, paths.raw, progress=False)  # the folder exists: torchvision is not asked
    assert json.loads((paths.raw / MARKER_NAME).read_text())["files"] == 40 + 2
    prepare(recipe, paths, progress=False)
    import pyarrow.parquet as pq

    rows = pq.read_table(paths.manifest).to_pylist()
    by_split = {s: sorted(r["id"] for r in rows if r["split"] == s) for s in SPLITS}
    assert by_split["test"] == [f"test_{i:05d}.png" for i in range(10)]
    # The other 30 (3 per class) split 0.8/0.2 per class: 2.4 -> 2 train, 0.6 -> 1 val.
    for label in range(10):
        counts = Counter(r["split"] for r in rows if r["label"] == label and r["split"] != "test")
        assert counts == {"train": 2, "val": 1}, label


def make_fgvc(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    variants = ["707-320", "Boeing 717", "A340-500"]
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = {"trainval": [], "test": []}
    for i in range(9):
        image_id = f"{1025794 + i:07d}"
        split = "test" if i % 3 == 0 else "trainval"
        lines[split].append(f"{image_id} {variants[i % 3]}")
        picture = Image.new("RGB", (64, 60), (30 * i, 120, 60))
        picture.paste((255, 255, 255), (0, 40, 64, 60))  # the banner: bottom 20 pixels
        picture.save(data / "images" / f"{image_id}.jpg", quality=95)
    for split, content in lines.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(content) + "\n")
    return root / "fgvc-aircraft-2013b"


def test_fgvc_banner_is_removed_and_names_with_spaces_survive(tmp_path: Path):
    folder = make_fgvc(tmp_path / "cache")
    raw = tmp_path / "raw"
    assert tvs.convert_fgvc(folder, raw, progress=False, workers=1) == 9
    with (raw / "train.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["split"] for r in rows} == {"train", "test"}
    assert json.loads((raw / "label_map.json").read_text())["1"] == "Boeing 717"
    for row in rows:
        image = Image.open(raw / "train_images" / row["image_id"]).convert("RGB")
        assert image.size == (64, 40)
        bottom = np.asarray(image)[-3:].reshape(-1, 3).mean(axis=0)
        assert bottom[0] < 250 and abs(bottom[1] - 120) < 12  # picture, not white banner

    kept = tmp_path / "raw_kept"
    tvs.convert_fgvc(folder, kept, remove_banner=False, progress=False, workers=1)
    assert Image.open(kept / "train_images" / rows[0]["image_id"]).size == (64, 60)


def test_fgvc_recipe_reads_through_its_layout(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    make_fgvc(cache)
    recipe = _recipe({"kind": "torchvision", "dataset": "FGVCAircraft", "download_dir": str(cache)})
    raw = tmp_path / "raw"
    fetch(recipe, raw, progress=False)
    index = read_layout(recipe, raw)
    assert index.class_names == ["707-320", "Boeing 717", "A340-500"]
    assert sum(r.split == "test" for r in index.records) == 3
    assert all(r.path.is_file() for r in index.records)


# --------------------------------------------------------------------------- folder
def _image(path: Path, color=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def test_class_per_folder_tree(tmp_path: Path):
    tree = tmp_path / "mine"
    for name, count in (("cats", 3), ("dogs", 2)):
        for i in range(count):
            _image(tree / name / f"img {i}.png", (i * 50, 0, 0))
    _image(tree / "dogs" / "nested" / "deep.jpg")
    (tree / "dogs" / "notes.txt").write_text("not an image")
    recipe = _recipe({"kind": "folder", "path": "mine"})
    raw = tmp_path / "raw"
    fetch(recipe, raw, progress=False, root=tmp_path)
    index = read_layout(recipe, raw)
    assert index.class_names == ["cats", "dogs"]
    assert sorted(r.image_id for r in index.records) == [
        "cats/img 0.png", "cats/img 1.png", "cats/img 2.png",
        "dogs/img 0.png", "dogs/img 1.png", "dogs/nested/deep.jpg",
    ]  # fmt: skip
    assert all(r.path.is_file() for r in index.records)
    assert all(r.label == r.image_id.split("/")[0] for r in index.records)

    written = (raw / "train.csv").stat().st_mtime_ns
    fetch(recipe, raw, progress=False, root=tmp_path)  # unchanged: nothing copied again
    assert (raw / "train.csv").stat().st_mtime_ns == written
    _image(tree / "cats" / "new.png")  # the user's folder changed: copied again
    fetch(recipe, raw, progress=False, root=tmp_path)
    assert "cats/new.png" in {r.image_id for r in read_layout(recipe, raw).records}


def test_image_folder_with_a_labels_csv(tmp_path: Path):
    images = tmp_path / "pics"
    for i in range(4):
        _image(images / f"p{i}.jpg")
    (tmp_path / "labels.csv").write_text(
        "name,diagnosis,patient\np0,benign,A\np1,malignant,A\np2,benign,\np3,benign,B\n"
        "p9,benign,C\n"  # no such file: prepare reports it
    )
    source = {
        "kind": "folder", "path": str(images), "labels_csv": "labels.csv", "id_column": "name",
        "label_column": "diagnosis", "group_column": "patient", "image_suffix": ".jpg",
    }  # fmt: skip
    recipe = _recipe(source)
    raw = tmp_path / "raw"
    fetch(recipe, raw, progress=False, root=tmp_path)
    index = read_layout(recipe, raw)
    assert index.class_names == ["benign", "malignant"]
    by_id = {r.image_id: r for r in index.records}
    assert by_id["p0"].group == "A" and by_id["p2"].group is None
    assert by_id["p0"].path.is_file() and not by_id["p9"].path.exists()


def test_folder_errors_are_clear(tmp_path: Path):
    (tmp_path / "flat").mkdir()
    _image(tmp_path / "flat" / "a.png")
    with pytest.raises(FetchError, match="no class sub-folders"):
        fetch(_recipe({"kind": "folder", "path": "flat"}), tmp_path / "raw", root=tmp_path)
    with pytest.raises(FetchError, match="is not a folder"):
        fetch(_recipe({"kind": "folder", "path": "nope"}), tmp_path / "raw", root=tmp_path)
    (tmp_path / "l.csv").write_text("file,label\n../../etc/passwd,x\n")
    source = {"kind": "folder", "path": "flat", "labels_csv": "l.csv", "id_column": "file"}
    with pytest.raises(FetchError, match=r"leaves source\.path"):
        fetch(_recipe(source), tmp_path / "raw", root=tmp_path)


def test_cifar_download_path_through_torchvision_offline(tmp_path: Path, monkeypatch):
    """The users' path: torchvision downloads (here from a server on loopback), checks the
    archive's MD5 and unpacks it; the batch files' MD5s are checked; then the conversion runs."""
    import functools
    import hashlib
    import tarfile
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import torchvision.datasets

    source_dir = tmp_path / "published"
    folder = make_cifar10(source_dir)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    cls = torchvision.datasets.CIFAR10
    url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
    monkeypatch.setattr(cls, "url", url)
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
    cache = tmp_path / "cache"
    recipe = _recipe({"kind": "torchvision", "dataset": "CIFAR10", "download_dir": str(cache)})
    raw = tmp_path / "raw"
    try:
        fetch(recipe, raw, progress=False)
        assert (cache / "cifar-10-python.tar.gz").is_file()
        assert len(read_layout(recipe, raw).records) == 19

        (cache / "cifar-10-batches-py" / "test_batch").write_bytes(b"tampered")
        with pytest.raises(FetchError, match="does not match its published MD5"):
            fetch(recipe, tmp_path / "raw2", progress=False)

        shutil.rmtree(cache)
        monkeypatch.setattr(cls, "tgz_md5", "0" * 32)  # a corrupted download
        with pytest.raises(FetchError, match="could not download CIFAR10"):
            fetch(recipe, tmp_path / "raw3", progress=False)
    finally:
        server.shutdown()
        server.server_close()


def test_every_source_kind_is_one_row_of_the_table():
    """Config section, fetch and layout reader of each kind come from one table."""
    import inspect

    from attnpipe.config import SOURCE_CONFIGS
    from attnpipe.data.source_kinds import SOURCE_KINDS, resolve

    assert set(SOURCE_KINDS) == set(SOURCE_CONFIGS)
    for kind, row in SOURCE_KINDS.items():
        assert row.config is SOURCE_CONFIGS[kind]
        fetch, layout = resolve(row.fetch), resolve(row.layout)
        fetch_args = list(inspect.signature(fetch).parameters)
        assert fetch_args == ["source", "raw_dir", "progress", "root"]
        assert list(inspect.signature(layout).parameters) == ["source", "raw_dir"]
