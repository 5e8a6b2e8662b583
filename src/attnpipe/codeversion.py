"""Which of the package's modules each pipeline stage runs, and a version of that code.

A stage's result depends on its inputs, its recipe section *and the code that computes it*.
`dvc.yaml` lists each stage's modules (and uv.lock) as dependencies, so editing a model re-runs
train, evaluate and export but not the data stages; the training run's identity includes
`code_version("train")`, so a code change starts a new run instead of resuming a stale one.

The modules of a stage are the closure of the `attnpipe` imports (module level and inside
functions, read from the source without importing it) of its entry modules. The command line
(`attnpipe.cli`) is left out: it parses arguments and calls one library function, and editing
its help must not re-run the pipeline. `tests/test_codeversion.py` checks that dvc.yaml lists
exactly these files.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

import attnpipe

PACKAGE = "attnpipe"
# Imports that never change what a stage computes: the recipe loader checks a recipe's model
# section against the registry (the data stages do not depend on the models), and this module
# reads the source-kind table only to list the fetch and layout modules.
OUTSIDE_THE_RESULT = {
    ("attnpipe.config.recipe", "attnpipe.models"),
    ("attnpipe.codeversion", "attnpipe.data.source_kinds"),
}


def _source_modules(part: str) -> tuple[str, ...]:
    """The modules the source-kind table names for `part` ("fetch" or "layout"): they are
    looked up by name at run time, so no import statement leads to them."""
    from attnpipe.data.source_kinds import SOURCE_KINDS

    return tuple(sorted({getattr(kind, part).split(":")[0] for kind in SOURCE_KINDS.values()}))


STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "fetch": ("attnpipe.data.sources", *_source_modules("fetch")),
    "prepare": ("attnpipe.data.prepare", *_source_modules("layout")),
    "shard": ("attnpipe.data.shard",),
    "train": ("attnpipe.train.launch", "attnpipe.train.loop"),
    "tune": ("attnpipe.train.tune", "attnpipe.train.loop"),
    "evaluate": ("attnpipe.evaluate.run", "attnpipe.evaluate.report"),
    "export": ("attnpipe.evaluate.export",),
}


def package_root() -> Path:
    """The folder of the `attnpipe` package that is running (src/attnpipe in a checkout)."""
    return Path(attnpipe.__file__).resolve().parent


def _module_file(module: str, root: Path) -> Path | None:
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """`attnpipe` modules imported anywhere in `path` (absolute and relative imports)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(PACKAGE)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] == PACKAGE:
                found.add(target)
                found |= {f"{target}.{alias.name}" for alias in node.names}  # submodules
    return found


@cache
def stage_modules(stage: str, root: Path | None = None) -> tuple[Path, ...]:
    """The source files (relative to the package folder) that `stage` runs, sorted."""
    root = root or package_root()
    pending = [*STAGE_ENTRIES[stage], PACKAGE]
    files: dict[str, Path] = {}
    while pending:
        module = pending.pop()
        if module in files or module.split(".")[:2] == [PACKAGE, "cli"]:
            continue
        path = _module_file(module, root)
        if path is None:
            continue  # a name imported from a module, not a module
        files[module] = path
        # A module's parent packages run first (their __init__).
        parents = [module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)]
        imported = {
            name
            for name in _imports(path, module)
            if not any(module == a and name.startswith(b) for a, b in OUTSIDE_THE_RESULT)
        }
        pending += parents + sorted(imported)
    return tuple(sorted(path.relative_to(root) for path in files.values()))


def lock_file(root: Path | None = None) -> Path | None:
    """uv.lock of the checkout the package runs from (src layout), if there is one."""
    candidate = (root or package_root()).parent.parent / "uv.lock"
    return candidate if candidate.is_file() else None


def code_version(stage: str) -> str:
    """A short hash of the stage's module files and uv.lock, e.g. 'code:1a2b3c4d5e6f'."""
    root = package_root()
    digest = hashlib.sha256()
    for relative in stage_modules(stage, root):
        digest.update(relative.as_posix().encode() + b"\0" + (root / relative).read_bytes())
    lock = lock_file(root)
    digest.update(lock.read_bytes() if lock else b"no uv.lock")
    return "code:" + digest.hexdigest()[:12]


def dvc_code_deps(stage: str) -> list[str]:
    """The stage's code as `dvc.yaml` lists it: paths from the project root, then uv.lock."""
    source = package_root().relative_to(package_root().parent.parent)
    return [f"{source.as_posix()}/{path.as_posix()}" for path in stage_modules(stage)] + ["uv.lock"]


CODE_MARKER = "# the code it runs (`python -m attnpipe.codeversion --write dvc.yaml`)"


def rewrite_dvc_yaml(text: str) -> str:
    """`dvc.yaml` with each stage's code list (the lines after CODE_MARKER) made current."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    position = 0
    while position < len(lines):
        line = lines[position]
        out.append(line)
        position += 1
        name = line.strip().rstrip(":")
        if line.startswith("  ") and not line.startswith("   ") and name in STAGE_ENTRIES:
            stage = name
        if CODE_MARKER in line and stage is not None:
            indent = line[: len(line) - len(line.lstrip())]
            while position < len(lines) and lines[position].strip().startswith(
                ("- src/", "- uv.lock")
            ):
                position += 1  # the old list
            out += [f"{indent}- {path}\n" for path in dvc_code_deps(stage)]
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    """Print each stage's code dependencies, or rewrite them in a dvc.yaml (`--write`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attnpipe.codeversion", description=__doc__)
    parser.add_argument("--write", type=Path, metavar="DVC_YAML", help="update this dvc.yaml")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(rewrite_dvc_yaml(args.write.read_text()))
        return
    for stage in STAGE_ENTRIES:
        print(f"{stage}:")
        for path in dvc_code_deps(stage):
            print(f"  - {path}")


if __name__ == "__main__":
    main()
