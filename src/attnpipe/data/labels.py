"""The order of class labels and the names of splits, shared by fetch (folder sources) and the
layout readers."""

from __future__ import annotations


def natural_key(text: str) -> tuple[int, int | str]:
    """Numbers by value first ("2" before "10"), then text."""
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)


# How owners name their splits (torchvision ImageFolder / timm layouts, CSV split columns):
# any case, mapped to the names the manifest uses.
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
SPLIT_ALIASES_TEXT = "train, val (or valid, validation), test, in any case"


def split_name(text: str) -> str | None:
    """The manifest's name ("train", "val", "test") of an owner's split name, or None."""
    return SPLIT_ALIASES.get(text.strip().lower())
