"""The recipe reference, rendered from the schema alone: `docs/recipe.md`, and resolved recipes.

Every key's type, default and meaning live in the section models (`Field(description=...)`),
so the reference cannot drift from the code: `recipe_reference()` renders them as Markdown and
`resolved_recipe_yaml()` writes a recipe with every default filled in, each key commented.

    python -m attnpipe.config.reference --write docs/recipe.md   # regenerate the reference
    python -m attnpipe.config.reference --check docs/recipe.md   # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from attnpipe.config.recipe import Recipe
from attnpipe.config.train import TrainConfig

REFERENCE_PATH = "docs/recipe.md"
REGENERATE = f"uv run python -m attnpipe.config.reference --write {REFERENCE_PATH}"
# Keys that a training run's identity leaves out (see `Recipe.weights_fingerprint`).
EXECUTION_PATHS = frozenset(f"train.{key}" for key in TrainConfig.EXECUTION_KEYS)
# What a dict-valued key's entries are called in key paths (`tune.space.<key>.low`).
DICT_KEY = "<key>"
# A resolved recipe's lines, comments included, stay within this width where they can.
YAML_WIDTH = 100

HEADER = f"""\
# Recipe reference

_Generated from the recipe schema (the `Field(description=...)` of each key in
`src/attnpipe/config/`): do not edit it by hand. After changing a key, regenerate it with
`{REGENERATE}`
(tests/test_recipe_reference.py fails while it is out of date)._

Every key of a recipe, `pipelines/<name>.yaml`, by section. A key not written takes its
default; keys are written nested (`train: {{optimizer: {{lr: 0.1}}}}`), and the dotted paths
below are also what `--set` and `tune.space` take (`--set train.optimizer.lr=0.05`).
`attnpipe config show <name>` prints a recipe resolved, every default included.

Types: `a` \\| `b` is one of those values; `[min, max]` a range; `in [0, 1)` the bounds, `[`
inclusive, `(` exclusive; `null` (YAML's empty value) turns a setting off or leaves it to a
default that the description names.

A training run is named after everything that shapes its weights: the model, augment and train
sections and the data and code versions. Launching it again continues from its checkpoints;
changing one of those keys starts a new run, except the keys marked "changing it resumes the
run" (loader processes, CPUs per rank, failure budget, checkpoints kept, storage location).
"""


# --------------------------------------------------------------------------- types
def _unwrap(annotation: Any) -> Any:
    """The type inside `Annotated[...]` (its metadata is on the field already)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> tuple[Any, ...]:
    annotation = _unwrap(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(_unwrap(member) for member in get_args(annotation))
    return (annotation,)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bounds(metadata: Sequence[Any]) -> str:
    """`>= 1`, `in [0, 1)`, ... from pydantic's constraint metadata (Ge, Gt, Le, Lt objects,
    one attribute each)."""
    low = high = None
    for item in metadata:
        if getattr(item, "ge", None) is not None:
            low = f"[{_number(item.ge)}"
        elif getattr(item, "gt", None) is not None:
            low = f"({_number(item.gt)}"
        elif getattr(item, "le", None) is not None:
            high = f"{_number(item.le)}]"
        elif getattr(item, "lt", None) is not None:
            high = f"{_number(item.lt)})"
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f" {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return ""


def _pattern(metadata: Sequence[Any]) -> str:
    for item in metadata:
        pattern = getattr(item, "pattern", None)
        if pattern:
            return f" matching `{pattern}`"
    return ""


def type_text(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A readable type: `int >= 1`, `float in [0, 1]`, `` `a` | `b` ``, `[float, float]`..."""
    members = _union_members(annotation)
    if len(members) > 1:
        return " | ".join(type_text(member, metadata) for member in members)
    annotation = members[0]
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(f"`{_flow(value)}`" for value in args)
    if annotation in (int, float):
        return annotation.__name__ + _bounds(metadata)
    if annotation is str:
        return "str" + _pattern(metadata)
    if annotation is bool:
        return "bool"
    if annotation is Any:
        return "any"
    if _is_model(annotation):
        return "section"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list of {type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_text(arg) for arg in args) + "]"
    if origin is list:
        return f"list of {type_text(args[0])}" if args and args[0] is not Any else "list"
    if origin is dict:
        value = args[1] if len(args) == 2 else Any
        return "mapping" if value is Any else f"mapping of {type_text(args[0])} to {DICT_KEY}"
    return getattr(annotation, "__name__", str(annotation))


# --------------------------------------------------------------------------- values
def _flow(value: Any) -> str:
    """A JSON-like `value` as one line of YAML (flow style, quoted where YAML would read it as
    something else: `'4:2:0'` is a number to YAML 1.1, `'off'` a boolean)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10**9)
    return text.strip()[1:-1]


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    return f"`{_flow(TypeAdapter(field.annotation).dump_python(default, mode='json'))}`"


# --------------------------------------------------------------------------- the schema
def nested_models(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """The sections a field holds: (path suffix, model), e.g. ("", OptimizerConfig) for
    `train.optimizer`, ("<key>", SearchDimension) for `tune.space`, one per source kind."""
    found: list[tuple[str, type[BaseModel]]] = []
    for member in _union_members(annotation):
        if _is_model(member):
            found.append(("", member))
        elif get_origin(member) is dict and _is_model(_unwrap(get_args(member)[1])):
            found.append((DICT_KEY, _unwrap(get_args(member)[1])))
    return found


def field_paths(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every key of `model` as (dotted path, field), depth first, sections before their keys."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, field
        for suffix, section in nested_models(field.annotation):
            inner = f"{path}.{suffix}." if suffix else f"{path}."
            yield from field_paths(section, inner)


def _docstring(model: type[BaseModel]) -> str:
    """The class's own docstring, each paragraph on one line (pydantic's base has its own)."""
    doc = model.__dict__.get("__doc__") or ""
    paragraphs = inspect.cleandoc(doc).split("\n\n") if doc else []
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


# --------------------------------------------------------------------------- markdown
def _markdown(text: str) -> str:
    """Escape a table cell: `|` always; `<`, `*` outside code spans (HTML, emphasis)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def _anchor(title: str) -> str:
    """GitHub's heading id: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _heading(level: int, title: str) -> str:
    return f"{'#' * min(level, 6)} {title}"


def _section_kind(path: str, field: FieldInfo) -> str | None:
    """The type cell of a key that holds sections, linking to where they are described."""
    sections = nested_models(field.annotation)
    if not sections:
        return None
    if sections[0][0] == DICT_KEY:
        title = f"{path}.{DICT_KEY}"
        return f"mapping: key -> [`{title}`](#{_anchor(title)})"
    if len(sections) > 1:
        return f"one of the [`{path}` kinds](#{_anchor(path)}), by `{path}.kind`"
    return f"section: [`{path}`](#{_anchor(path)})"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        holds = _section_kind(path, field)
        kind = holds or _markdown(type_text(field.annotation, field.metadata))
        if holds and DICT_KEY not in holds:  # a section's defaults are its keys'
            default = "required" if field.is_required() else "see its keys"
        else:
            default = _markdown(default_text(field))
        description = _markdown(" ".join((field.description or "").split()))
        if path in EXECUTION_PATHS:
            description = description.rstrip(".") + ". _Changing it resumes the run._"
        rows.append(f"| `{path}` | {kind} | {default} | {description} |")
    return rows


def _prose(text: str) -> list[str]:
    return [_markdown(text).replace("\\|", "|"), ""] if text else []


def _field_sections(path: str, field: FieldInfo, level: int) -> list[str]:
    """The sections a key holds: one, one per dict entry (`<key>`), or one per source kind."""
    sections = nested_models(field.annotation)
    about = " ".join((field.description or "").split())
    if len(sections) > 1:  # a union, told apart by `kind`
        lines = [_heading(level, path), "", *_prose(about)]
        for _, model in sections:
            kind = get_args(model.model_fields["kind"].annotation)[0]
            title = f"{path}.kind: {kind}"
            lines += _section(path, model, level + 1, title, "")
        return lines
    lines = []
    for suffix, model in sections:
        inner = f"{path}.{suffix}" if suffix else path
        lines += _section(inner, model, level, f"`{inner}`" if suffix else inner, about)
    return lines


def _section(path: str, model: type[BaseModel], level: int, title: str, about: str) -> list[str]:
    """A heading, what the section is for, its keys' table, then the sections it holds."""
    # The key's description is in the table above; the class says more, where it has a say.
    lines = [_heading(level, title), "", *_prose(_docstring(model) or about)]
    lines += [*_rows(model, f"{path}."), ""]
    for name, field in model.model_fields.items():
        lines += _field_sections(f"{path}.{name}", field, level + 1)
    return lines


def recipe_reference() -> str:
    """The Markdown reference of every recipe key (`docs/recipe.md`)."""
    lines = [_heading(2, "Sections"), "", *_rows(Recipe, ""), ""]
    for name, field in Recipe.model_fields.items():
        lines += _field_sections(name, field, 2)
    return HEADER + "\n" + "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- resolved YAML
def _commented(line: str, description: str | None, indent: int) -> list[str]:
    """`line` with its key's description: after it where that fits in `YAML_WIDTH`, else
    wrapped above it."""
    text = " ".join((description or "").split())
    if not text:
        return [line]
    if len(line) + 4 + len(text) <= YAML_WIDTH:
        return [f"{line}  # {text}"]
    pad = " " * indent
    wrapped = textwrap.wrap(text, YAML_WIDTH - indent - 2, break_on_hyphens=False)
    return [*(f"{pad}# {chunk}" for chunk in wrapped), line]


def _yaml_lines(model: BaseModel, indent: int, comments: bool) -> list[str]:
    """A section's keys in the schema's order, sections nested as block mappings."""
    data = model.model_dump(mode="json")
    pad = " " * indent
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        about = field.description if comments else None
        if isinstance(value, BaseModel):
            lines += _commented(f"{pad}{name}:", about, indent)
            lines += _yaml_lines(value, indent + 2, comments)
        elif isinstance(value, dict) and value:
            lines += _commented(f"{pad}{name}:", about, indent)
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    lines.append(f"{pad}  {_flow(key)}:")
                    lines += _yaml_lines(item, indent + 4, comments)
                else:
                    lines.append(f"{pad}  {_flow(key)}: {_flow(data[name][key])}")
        else:
            lines += _commented(f"{pad}{name}: {_flow(data[name])}", about, indent)
    return lines


def resolved_recipe_yaml(recipe: Recipe, comments: bool = True) -> str:
    """`recipe` with every default, as YAML in the schema's section order; with `comments`,
    each key's description as a YAML comment. `parse_recipe` of it gives `recipe` again.

    `name` is left out: a recipe takes it from its file name (pipelines/<name>.yaml).
    """
    lines = [
        f"# pipelines/{recipe.name}.yaml resolved: every key, defaults included"
        + (f" (reference: {REFERENCE_PATH})" if comments else "")
    ]
    for name, field in Recipe.model_fields.items():
        if name == "name":
            continue
        section = getattr(recipe, name)
        # One section at a time: a blank line between them, as in the recipes themselves.
        lines += ["", *_commented(f"{name}:", field.description if comments else None, 0)]
        lines += _yaml_lines(section, 2, comments)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """Print the reference, write it (`--write`), or check that a file holds it (`--check`)."""
    parser = argparse.ArgumentParser(
        prog="python -m attnpipe.config.reference", description=__doc__.split("\n\n")[0]
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--write", type=Path, metavar="PATH", help=f"write it (e.g. {REFERENCE_PATH})"
    )
    group.add_argument("--check", type=Path, metavar="PATH", help="exit 1 if PATH is out of date")
    args = parser.parse_args(argv)
    text = recipe_reference()
    if args.write:
        args.write.write_text(text)
        print(f"wrote {args.write}")
        return 0
    if args.check:
        current = args.check.read_text() if args.check.is_file() else None
        if current != text:
            state = "is out of date" if current is not None else "is missing"
            print(
                f"{args.check} {state}: the recipe schema changed; regenerate it with "
                f"`uv run python -m attnpipe.config.reference --write {args.check}`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.check} is up to date")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
