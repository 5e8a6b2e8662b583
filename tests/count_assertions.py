"""Count the checks in the test suite: `assert` statements and `pytest.raises` blocks.

A guard for "nothing dropped" when tests are merged or sped up: the count must not fall
(docs/testing.md records it before and after each such change).

    uv run python -m tests.count_assertions            # the total, then per file
    uv run python -m tests.count_assertions --total    # the total alone
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterable
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_pytest_raises(node: ast.AST) -> bool:
    """`pytest.raises(...)`, as a `with` item or a plain call."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "raises"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "pytest"
    )


def count_checks(source: str) -> int:
    """The `assert` statements and `pytest.raises` calls in one file's source."""
    return sum(
        isinstance(node, ast.Assert) or _is_pytest_raises(node)
        for node in ast.walk(ast.parse(source))
    )


def checks_per_file(files: Iterable[Path]) -> dict[str, int]:
    return {path.relative_to(TESTS).as_posix(): count_checks(path.read_text()) for path in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", action="store_true", help="print the total alone")
    args = parser.parse_args(argv)
    counts = checks_per_file(sorted(TESTS.rglob("*.py")))
    total = sum(counts.values())
    if args.total:
        print(total)
        return 0
    print(f"{total} checks (assert statements and pytest.raises) in {len(counts)} files")
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        if count:
            print(f"{count:6d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
