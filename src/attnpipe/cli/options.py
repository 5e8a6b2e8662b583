"""Options and helpers that every command taking a pipeline shares."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attnpipe.config import Recipe, apply_overrides, load_overrides, load_recipe, parse_assignments
from attnpipe.paths import PipelinePaths

PIPELINE_HELP = "pipeline name: pipelines/<pipeline>.yaml"


def add_recipe_change_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one recipe key for this command, as `dvc exp run -S` does (repeatable; "
        "values are YAML: --set train.epochs=3 --set train.storage_path=s3://bucket/ckpt)",
    )
    parser.add_argument(
        "--overrides",
        type=Path,
        metavar="YAML",
        help="recipe keys to change, from a file, e.g. a sweep's "
        "reports/<name>/best_params.yaml ({train.optimizer.lr: 0.01, ...}); --set wins",
    )


def load_for_command(
    args: argparse.Namespace, announce: bool = True
) -> tuple[Recipe, PipelinePaths]:
    """The recipe with this command's --overrides and --set applied, and the project's paths;
    `announce` prints the changes (not where the output must be the recipe alone)."""
    root = args.root.resolve()
    recipe = load_recipe(args.pipeline, root)
    changes = recipe_changes(args)
    if changes:
        recipe = apply_overrides(
            recipe, changes, origin=f"pipelines/{args.pipeline}.yaml + changes"
        )
        if announce:
            print(f"recipe changes for this run: {changes}")
    return recipe, PipelinePaths(root, args.pipeline)


def recipe_changes(args: argparse.Namespace) -> dict[str, Any]:
    """This command's --overrides file, then its --set (which wins), as {dotted key: value}."""
    changes: dict[str, Any] = {}
    if getattr(args, "overrides", None):
        changes.update(load_overrides(args.overrides))
    changes.update(parse_assignments(getattr(args, "set", None) or []))
    return changes
