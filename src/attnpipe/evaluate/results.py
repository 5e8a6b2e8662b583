"""What an evaluation hands to the report and to W&B: its figures (the scored rows are
`scoring.SplitResult`). A module of its own, so that run.py, which writes both, and the
report and W&B modules, which read them, import it without importing one another."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FigureFile:
    """A PNG of the report: `key` names it on W&B, `title` and `caption` on the page."""

    key: str
    title: str
    caption: str
    path: Path
