"""`fetch`: bring a dataset into `data/<name>/raw/` in its native (Kaggle-style) layout.

Each source writes or downloads files only; reading them into labelled records is the job of
the layout adapters in `attnpipe.data.layouts`, so the embedded digits take the same code
path as a real Kaggle competition.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from attnpipe.config import Recipe, SklearnDigitsSource

DIGIT_NAMES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
]  # fmt: skip


def fetch(recipe: Recipe, raw_dir: Path) -> Path:
    """Fetch `recipe.source` into `raw_dir` and return it."""
    source = recipe.source
    if isinstance(source, SklearnDigitsSource):
        write_sklearn_digits(raw_dir, image_size=source.image_size)
        return raw_dir
    raise NotImplementedError(
        f"source kind '{source.kind}' is not available yet in this version of attnpipe"
    )


def write_sklearn_digits(raw_dir: Path, image_size: int = 32) -> None:
    """Write scikit-learn's bundled digits as `train.csv` + `train_images/*.png` + label map.

    The 8x8 images (values 0..16) are scaled to 0..255 and enlarged with bicubic resampling to
    `image_size` RGB, the layout of the Cassava competition download.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_dir = raw_dir / "train_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        image_id = f"digit_{index:04d}.png"
        gray = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        gray = gray.resize((image_size, image_size), Image.Resampling.BICUBIC)
        gray.convert("RGB").save(images_dir / image_id, format="PNG", optimize=False)
        rows.append((image_id, int(label)))
    with (raw_dir / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"])
        writer.writerows(rows)
    label_map = {str(i): name for i, name in enumerate(DIGIT_NAMES)}
    (raw_dir / "label_map.json").write_text(json.dumps(label_map, indent=2) + "\n")
