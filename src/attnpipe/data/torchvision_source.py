"""torchvision datasets (CIFAR-10/100, FGVC-Aircraft) converted to the common raw layout.

torchvision downloads and unpacks the archives (into `source.download_dir`, default
`~/.cache/attnpipe/torchvision`); this module then reads the files in their own on-disk
formats and writes `train.csv` (image_id, label, split) + `train_images/` + `label_map.json`,
the layout every other source ends in. The `split` column keeps the dataset's official
train/test split (`prepare.test_split: official` uses it).

The files are read here rather than through torchvision's dataset classes: those decode every
image into memory and (for CIFAR) refuse files whose MD5 differs from the published archive,
which would make the converter untestable without downloading 170 MB. The integrity check is
kept where it belongs, on the downloaded files (`verify_cifar`), and the converters are tested
on tiny files written in the real formats. CIFAR's pickles are read with an unpickler that
only builds numpy arrays, so a tampered batch file cannot run code.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from attnpipe.config import TorchvisionSource
from attnpipe.data.pools import process_pool
from attnpipe.data.sources import FetchError

FGVC_BANNER_PIXELS = 20
DEFAULT_DOWNLOAD_DIR = "~/.cache/attnpipe/torchvision"

CIFAR_FILES = {
    "CIFAR10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names_key": "label_names",
        "labels_key": "labels",
    },
    "CIFAR100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names_key": "fine_label_names",
        "labels_key": "fine_labels",
    },
}


def fetch_torchvision(
    source: TorchvisionSource, raw_dir: Path, progress: bool = True, root: Path | None = None
) -> None:
    cache = Path(source.download_dir or DEFAULT_DOWNLOAD_DIR).expanduser()
    if source.dataset in CIFAR_FILES:
        folder = download_cifar(source.dataset, cache)
        verify_cifar(source.dataset, folder)
        convert_cifar(folder, source.dataset, raw_dir, progress=progress)
    else:
        folder = download_fgvc(cache)
        convert_fgvc(
            folder,
            raw_dir,
            annotation_level=source.annotation_level,
            remove_banner=source.remove_banner,
            progress=progress,
        )


# --------------------------------------------------------------------------- download
def _dataset_class(name: str):
    import torchvision.datasets as datasets

    return getattr(datasets, name)


def download_cifar(name: str, cache: Path) -> Path:
    """Download and unpack (MD5-checked by torchvision) unless the folder is there already."""
    cls = _dataset_class(name)
    folder = cache / cls.base_folder
    if not folder.is_dir():
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(
                cls.url, str(cache), filename=cls.filename, md5=cls.tgz_md5
            )
        except Exception as error:  # urllib, http and checksum errors alike
            raise FetchError(f"could not download {name} from {cls.url}: {error}") from None
    return folder


def verify_cifar(name: str, folder: Path) -> None:
    """Every batch file must have the MD5 torchvision publishes for it."""
    from torchvision.datasets.utils import check_integrity

    cls = _dataset_class(name)
    for filename, md5 in [*cls.train_list, *cls.test_list]:
        if not check_integrity(str(folder / filename), md5):
            raise FetchError(
                f"{folder / filename} is missing or does not match its published MD5; delete "
                f"{folder} to download {name} again"
            )


def download_fgvc(cache: Path) -> Path:
    cls = _dataset_class("FGVCAircraft")
    folder = cache / "fgvc-aircraft-2013b"
    if not (folder / "data").is_dir():
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(cls._URL, str(cache))
        except Exception as error:
            raise FetchError(f"could not download FGVCAircraft from {cls._URL}: {error}") from None
    return folder


# --------------------------------------------------------------------------- CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """Builds only numpy arrays, dtypes and bytes: what CIFAR's batches hold, nothing else."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        if name == "_reconstruct":
            return _reconstruct
        if name == "scalar":
            return _scalar
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def _reconstruct(*args):
    from numpy._core.multiarray import _reconstruct as real

    return real(*args)


def _scalar(*args):
    from numpy._core.multiarray import scalar as real

    return real(*args)


def read_cifar_pickle(path: Path) -> dict:
    """A CIFAR batch or meta file (a Python 2 pickle of a dict), keys as str."""
    try:
        with path.open("rb") as handle:
            data = _ArrayUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise FetchError(f"{path} is missing: the CIFAR folder is incomplete") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise FetchError(f"{path} is not a CIFAR batch file: {error}") from None
    if not isinstance(data, dict):
        raise FetchError(f"{path} is not a CIFAR batch file (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def convert_cifar(folder: Path, name: str, raw_dir: Path, progress: bool = True) -> int:
    """Write every image of a CIFAR folder as PNG; return the number written."""
    spec = CIFAR_FILES[name]
    meta = read_cifar_pickle(folder / spec["meta"])
    names = [_text(n) for n in meta[spec["names_key"]]]
    images_dir = raw_dir / "train_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, str]] = []
    for split in ("train", "test"):
        index = 0
        for file_name in spec[split]:
            batch = read_cifar_pickle(folder / file_name)
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = list(batch[spec["labels_key"]])
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise FetchError(
                    f"{folder / file_name}: expected N x 3072 pixels and N labels, got "
                    f"{data.shape} and {len(labels)}"
                )
            pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            bar = tqdm(
                total=len(pixels), desc=f"{name} {file_name}", unit="img", disable=not progress
            )
            with bar:
                for image, label in zip(pixels, labels, strict=True):
                    image_id = f"{split}_{index:05d}.png"
                    Image.fromarray(image, mode="RGB").save(images_dir / image_id, format="PNG")
                    rows.append((image_id, int(label), split))
                    index += 1
                    bar.update()
    _write_layout(raw_dir, rows, names)
    return len(rows)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- FGVC-Aircraft
def read_fgvc_split(data_dir: Path, level: str, split: str) -> list[tuple[str, str]]:
    path = data_dir / f"images_{level}_{split}.txt"
    if not path.is_file():
        raise FetchError(f"{path} is missing: the FGVC-Aircraft folder is incomplete")
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip():
            image, _, label = line.strip().partition(" ")
            pairs.append((image, label))
    return pairs


def convert_fgvc(
    folder: Path,
    raw_dir: Path,
    annotation_level: str = "variant",
    remove_banner: bool = True,
    progress: bool = True,
    workers: int = 0,
) -> int:
    """Write FGVC-Aircraft's trainval and test images (banner cropped) with their labels."""
    data_dir = folder / "data"
    classes_file = (
        data_dir
        / {
            "variant": "variants.txt",
            "family": "families.txt",
            "manufacturer": "manufacturers.txt",
        }[annotation_level]
    )
    if not classes_file.is_file():
        raise FetchError(f"{classes_file} is missing: the FGVC-Aircraft folder is incomplete")
    names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    index_of = {n: i for i, n in enumerate(names)}
    images_dir = raw_dir / "train_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, str]] = []
    jobs: list[tuple[Path, Path, bool]] = []
    for split, official in (("trainval", "train"), ("test", "test")):
        for image, label in read_fgvc_split(data_dir, annotation_level, split):
            if label not in index_of:
                raise FetchError(f"FGVC {split} {image}: unknown {annotation_level} {label!r}")
            file_name = f"{image}.jpg"
            rows.append((file_name, index_of[label], official))
            jobs.append((data_dir / "images" / file_name, images_dir / file_name, remove_banner))
    workers = workers or os.cpu_count() or 1
    with (
        tqdm(total=len(jobs), desc="FGVC-Aircraft", unit="img", disable=not progress) as bar,
        contextlib.ExitStack() as stack,
    ):
        results: Iterable = map(_copy_fgvc_image, jobs)
        if workers > 1 and len(jobs) >= 64:
            pool = stack.enter_context(process_pool(workers, __name__))
            results = pool.map(_copy_fgvc_image, jobs, chunksize=16)
        for _ in results:
            bar.update()
    _write_layout(raw_dir, rows, names)
    return len(rows)


def _copy_fgvc_image(job: tuple[Path, Path, bool]) -> None:
    """Crop the banner (re-encoded as JPEG quality 95); a missing or broken file is left out
    here and reported by `prepare` (its row stays in the CSV)."""
    origin, destination, remove_banner = job
    if not origin.is_file():
        return
    if not remove_banner:
        shutil.copyfile(origin, destination)
        return
    try:
        with Image.open(origin) as image:
            image.load()
            if image.height <= FGVC_BANNER_PIXELS:
                raise OSError("smaller than the banner")
            cropped = image.crop((0, 0, image.width, image.height - FGVC_BANNER_PIXELS))
            buffer = io.BytesIO()
            cropped.save(buffer, format="JPEG", quality=95)
    except OSError:
        shutil.copyfile(origin, destination)  # prepare will reject it with the reason
        return
    destination.write_bytes(buffer.getvalue())


# --------------------------------------------------------------------------- common
def _write_layout(raw_dir: Path, rows: list[tuple[str, int, str]], names: list[str]) -> None:
    with (raw_dir / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label", "split"])
        writer.writerows(rows)
    label_map = {str(i): name for i, name in enumerate(names)}
    (raw_dir / "label_map.json").write_text(json.dumps(label_map, indent=2) + "\n")
