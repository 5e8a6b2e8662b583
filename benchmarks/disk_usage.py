"""How many times a DVC project stores its data: workspace outputs plus DVC's cache, against
the workspace outputs alone (run it in a project after `make demo`).

    uv run python benchmarks/disk_usage.py [PROJECT]

Bytes are counted per inode (a hardlinked file once, as `du` does) and for files only, so the
figure does not depend on folder sizes; DVC's listings of directory outputs (`*.dir`) are
counted with the cache. `du -sb data .dvc/cache` against `du -sb data` gives the same picture
with folders included.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

WORKSPACE = ("data", "models")  # DVC-tracked outputs live here (reports/ is not cached)
CACHE = ".dvc/cache"


def stored_bytes(*folders: Path) -> int:
    """Bytes of the regular files under `folders`, each inode once."""
    sizes: dict[tuple[int, int], int] = {}
    for folder in folders:
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                stat = os.lstat(os.path.join(dirpath, name))
                if not os.path.islink(os.path.join(dirpath, name)):
                    sizes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(sizes.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", nargs="?", default=".", type=Path)
    root = parser.parse_args().project
    workspace = stored_bytes(*(root / name for name in WORKSPACE))
    together = stored_bytes(*(root / name for name in WORKSPACE), root / CACHE)
    print(f"workspace outputs ({', '.join(WORKSPACE)}/): {workspace / 1e6:.2f} MB")
    print(f"workspace + {CACHE}: {together / 1e6:.2f} MB")
    print(f"data stored {together / workspace:.2f} times")


if __name__ == "__main__":
    main()
