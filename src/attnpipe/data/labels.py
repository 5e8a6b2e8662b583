"""The order of class labels, shared by fetch (folder sources) and the layout readers."""

from __future__ import annotations


def natural_key(text: str) -> tuple[int, int | str]:
    """Numbers by value first ("2" before "10"), then text."""
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)
