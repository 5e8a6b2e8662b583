"""The package's shape, checked on its source: the dependency rule, no import circles and
short functions.

models <- data <- train, evaluate <- cli: `models` imports nothing of attnpipe outside
itself, `data` never imports train/evaluate/models, and train and evaluate never import each
other (both build on the shared modules: config, metrics, predictions, overlays, modelfile...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "attnpipe"
MAX_FUNCTION_LINES = 80
FORBIDDEN = {
    "models": {"config", "data", "train", "evaluate", "cli", "tracking", "jobs", "metrics"},
    "data": {"train", "evaluate", "models", "cli"},
    "train": {"evaluate", "cli"},
    "evaluate": {"train", "cli"},
}


def _part(path: Path, root: Path) -> str:
    return path.relative_to(root).parts[0].removesuffix(".py")


def _from_base(node: ast.ImportFrom, module: str) -> str:
    """The module a `from X import ...` in `module` (a package's as `pkg.__init__`) names,
    relative imports resolved against the module's package."""
    if not node.level:
        return node.module or ""
    return ".".join([*module.split(".")[: -node.level], *([node.module] if node.module else [])])


def _imported_parts(tree: ast.AST, module: str) -> set[str]:
    """Top-level parts of attnpipe (`train`, `config`, ...) that `tree` imports anywhere."""
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [_from_base(node, module)]
        else:
            continue
        parts |= {n.split(".")[1] for n in names if n.startswith("attnpipe.") and n.count(".")}
    return parts


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def violations(paths: list[Path], root: Path = SRC) -> list[str]:
    found = []
    for path in paths:
        part, where = _part(path, root), path.relative_to(root)
        module = ".".join(["attnpipe", *where.with_suffix("").parts])
        imported = _imported_parts(ast.parse(path.read_text()), module)
        for target in sorted(imported & FORBIDDEN.get(part, set())):
            found.append(f"{where}: {part} imports attnpipe.{target}")
        if part == "models" and imported - {"models"}:
            found.append(f"{where}: models imports {sorted(imported)}")
    return found


def module_imports(root: Path = SRC) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, anywhere in it (in functions and under
    TYPE_CHECKING too: a lazy import is still a dependency). `from package import name`
    depends on package.name where that is a module, else on the package."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        module = f"{name}.__init__" if path.name == "__init__.py" else name
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(node, module)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in names else base)
        graph[name] = {target for target in targets if target in names and target != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of `graph`: its strongly connected parts of more than one module."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            part = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(part) > 1:
                circles.append(sorted(part))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return circles


def long_functions(paths: list[Path], root: Path = SRC) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    where = path.relative_to(root)
                    found.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    return found


def test_dependencies_point_one_way():
    assert violations(_modules()) == []


def test_no_module_imports_itself_through_others():
    """E.g. evaluate's run.py writes the figures that report.py and sharing.py read: the
    types they share live in evaluate/results.py, not in run.py, which imports both."""
    graph = module_imports()
    assert "attnpipe.evaluate.results" in graph["attnpipe.evaluate.sharing"]
    assert import_circles(graph) == []


def test_the_circle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(graph) == [["a", "b", "c"]]


def test_no_function_is_longer_than_80_lines():
    assert long_functions(_modules()) == []


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("evaluate/x.py", "from attnpipe.train.launch import train\n", "evaluate imports"),
        ("train/x.py", "def f():\n    from attnpipe.evaluate import figures\n", "train imports"),
        ("models/x.py", "from attnpipe.config import Recipe\n", "models imports"),
        ("data/x.py", "import attnpipe.models.registry\n", "data imports"),
    ],
)
def test_the_checks_catch_a_violation(tmp_path, where, source, expected):
    """The rule is not vacuous: a forbidden import, even inside a function, is reported."""
    fake = tmp_path / where
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    assert any(expected in line for line in violations([fake], root=tmp_path))


def test_the_length_check_catches_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    fake = tmp_path / "long.py"
    fake.write_text(f"def long_one():\n{body}\n")
    assert long_functions([fake], root=tmp_path) == ["long.py:1 long_one: 81 lines"]
