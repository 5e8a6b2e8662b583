"""What `prepare` checks of its splits before writing them: none that training or evaluation
needs comes out empty, and none that prepare carved lacks a class.

Training validates every epoch and reports per-class metrics, so a split ratio too small for
the data (`prepare.splits.val: 0.01` of 90 images) must fail here, naming the key to change,
not an hour later in `train`. Splits that the dataset's owner gave (an official test set,
split folders) are kept as they are: one that lacks a class is the owner's choice.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from attnpipe.config import PrepareConfig

CARVED = ("train", "val", "test")
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def split_problem(
    labels: Sequence[int],
    splits: Sequence[str],
    owner: Sequence[str | None] | None,
    class_names: Sequence[str],
    config: PrepareConfig,
    keeps_splits: bool = False,
) -> str | None:
    """Why these splits cannot be trained and evaluated on (one message), or None.

    `owner` is each sample's split as its owner gave it (None where prepare splits freely);
    owner val and test samples are kept as given, the rest ("the pool") was carved by the
    ratios. With `keeps_splits` (a folder source's own splits) every class must also have
    training images; an official dataset may list a class that only its test set holds.
    """
    owner = owner if owner is not None else [None] * len(labels)
    given = {mark for mark in owner if mark in ("val", "test")}
    counts = {split: Counter[int]() for split in CARVED}
    pool, everywhere = Counter[int](), Counter[int]()
    for label, split, mark in zip(labels, splits, owner, strict=True):
        counts[split][label] += 1
        everywhere[label] += 1
        if mark not in ("val", "test"):
            pool[label] += 1
    ratios = {
        "train": config.splits.train,
        "val": 0.0 if "val" in given else config.splits.val,
        "test": 0.0 if "test" in given else config.splits.test,
    }
    carved = [s for s in CARVED if s == "train" or (s not in given and ratios[s] > 0)]
    pool_text = f"{sum(pool.values())} {'+'.join(carved)} image(s)"
    problems = [
        _missing_training(counts["train"], pool, everywhere, class_names, keeps_splits, pool_text)
    ]
    for split in ("val", "test"):
        # Training needs validation images; a test share of 0 asks for no test split.
        if split not in given and (split == "val" or ratios[split] > 0):
            problems.append(
                _carved_split(split, ratios[split], counts[split], pool, class_names, pool_text)
            )
    return next((p for p in problems if p), None)


def _missing_training(
    train: Counter[int],
    pool: Counter[int],
    everywhere: Counter[int],
    class_names: Sequence[str],
    keeps_splits: bool,
    pool_text: str,
) -> str | None:
    if not sum(pool.values()):
        return (
            "no image is left for training: every image is in the owner's val or test split; "
            "give training images (a train/ folder, or rows with split train)"
        )
    carved = [c for c in sorted(pool) if not train[c]]
    if carved:
        shown = _classes(carved, pool, class_names)
        return (
            f"prepare.splits.train leaves class(es) {shown} without training images (of "
            f"{pool_text}); add images of those classes or raise prepare.splits.train"
        )
    owned = [c for c in sorted(everywhere) if keeps_splits and not train[c] and not pool[c]]
    if owned:
        shown = _classes(owned, everywhere, class_names)
        return (
            f"class(es) {shown} have images only in the owner's val/test split(s), none to train "
            "on; add their training images (train/<class>/, or rows with split train) or remove "
            "the class"
        )
    return None


def _carved_split(
    split: str,
    ratio: float,
    got: Counter[int],
    pool: Counter[int],
    class_names: Sequence[str],
    pool_text: str,
) -> str | None:
    """A split that prepare carved from the pool: not empty, and with every class in it."""
    key, word = f"prepare.splits.{split}", SPLIT_WORDS[split]
    if ratio <= 0:
        return (
            f"{key} = 0 gives no {word} images, and training validates on them every epoch; "
            f"set {key} above 0"
        )
    need = math.ceil(1 / ratio)
    if not sum(got.values()):
        return (
            f"{key} = {ratio:g} of {pool_text} gives 0 {word} images; raise {key} (a class "
            f"needs about {need} images for one {word} image) or add images"
        )
    missing = [c for c in sorted(pool) if pool[c] and not got[c]]
    if missing:
        return (
            f"{key} = {ratio:g} of {pool_text} gives no {word} image to class(es) "
            f"{_classes(missing, pool, class_names)}; raise {key} (a class needs about {need} "
            "images for one) or add images of those classes"
        )
    return None


def _classes(labels: Sequence[int], counts: Counter[int], class_names: Sequence[str]) -> str:
    shown = ", ".join(f"{class_names[c]!r} ({counts[c]} image(s))" for c in labels[:10])
    return shown + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")
