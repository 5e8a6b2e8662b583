"""Commands about the project rather than one stage: start a pipeline from your images
(`init`), show a resolved recipe (`config show`), list the models (`models`)."""

from __future__ import annotations

import argparse

from attnpipe.cli.options import PIPELINE_HELP, add_recipe_change_options, load_for_command

INIT_DESCRIPTION = """\
Write pipelines/<name>.yaml for your own images and add the pipeline to params.yaml, so that
`dvc repro` and `attnpipe run <name>` build it.

--from takes a folder, a CSV file or a Kaggle reference:
  a folder of split folders   train/ val/ (or valid/, validation/) test/, one folder per class
                              inside each: the splits are kept exactly (a missing val/ is
                              carved from train/, stratified)
  a folder of class folders   one folder per class: split train/val/test, stratified
  a CSV file                  columns image path and label (and optionally split), paths
                              relative to the CSV's folder
  kaggle:competition/NAME     a Kaggle competition, kaggle:dataset/OWNER/SLUG a dataset

The recipe's defaults suit a GPU machine (train.workers: auto, loader workers, shards at the
size the model reads), with a model sized to the data. Read it, change what you like
(`attnpipe config show <name>` prints every key with its default), then run the command it
prints.
"""


def add_project_commands(commands: argparse._SubParsersAction) -> None:
    init = commands.add_parser(
        "init",
        help="write a pipeline recipe for your own images (folder, CSV or Kaggle)",
        description=INIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("pipeline", help="name of the new pipeline: writes pipelines/<name>.yaml")
    init.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="FOLDER|CSV|kaggle:...",
        help="your images: a folder (split or class folders), a labels CSV, or "
        "kaggle:competition/NAME or kaggle:dataset/OWNER/SLUG",
    )
    init.add_argument(
        "--model", help="a registry model (`attnpipe models`); default: chosen for the data"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing recipe")
    init.set_defaults(handler=_init)

    config = commands.add_parser(
        "config",
        help="show a pipeline's resolved recipe",
        description="Inspect recipes: `attnpipe config show <name>` prints the recipe with "
        "every default filled in (and --set/--overrides applied), as YAML that can be saved "
        "as a recipe. docs/recipe.md explains every key.",
    )
    actions = config.add_subparsers(title="actions", metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="print the resolved recipe, defaults included",
        description="Print pipelines/<name>.yaml resolved: every key, defaults included, "
        "with this command's --set and --overrides applied. Nothing runs.",
    )
    show.add_argument("pipeline", help=PIPELINE_HELP)
    add_recipe_change_options(show)
    show.set_defaults(handler=_config_show)
    config.set_defaults(handler=lambda args: config.print_help() or 2)

    models = commands.add_parser(
        "models",
        help="list the registered networks",
        description="Print every model name with its parameters (1000 classes), multiply-adds "
        "at its default input size, default input size and the attention maps it exposes.",
    )
    models.set_defaults(handler=_models)


def _init(args: argparse.Namespace) -> None:
    from attnpipe.new_pipeline import init_pipeline

    created = init_pipeline(
        args.root.resolve(), args.pipeline, args.source, model=args.model, force=args.force
    )
    print(created.summary)
    print(f"wrote {created.recipe_file} and added '{args.pipeline}' to params.yaml")
    print("next:")
    print(f"  attnpipe config show {args.pipeline}   # every key, defaults included")
    print(f"  attnpipe run {args.pipeline}           # or: dvc repro")


def _config_show(args: argparse.Namespace) -> None:
    from attnpipe.config.reference import resolved_recipe_yaml

    recipe, _ = load_for_command(args, announce=False)
    print(resolved_recipe_yaml(recipe), end="")


def _models(args: argparse.Namespace) -> None:
    from attnpipe.models import format_model_table

    print(format_model_table())
