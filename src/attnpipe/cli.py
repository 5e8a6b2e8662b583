"""`attnpipe`: a thin command line over the library; each subcommand runs one stage."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from attnpipe.config import ConfigError, Recipe, load_recipe
from attnpipe.paths import PipelinePaths

DESCRIPTION = """\
Reproducible training of attention CNNs: fetch -> prepare -> shard -> train -> evaluate.

Each stage reads pipelines/<name>.yaml (the recipe) and the previous stage's outputs under
data/<name>/, models/<name>/ and reports/<name>/. `dvc repro` runs them all for the pipelines
listed in params.yaml; every stage also runs on its own. `attnpipe run <name>` chains them
without DVC.
"""

STAGES = {
    "fetch": (
        "download or write the raw dataset",
        "Reads the recipe's `source` and writes data/<name>/raw/ in the dataset's native layout "
        "(for the embedded `digits`: train.csv, train_images/*.png, label_map.json). Kaggle "
        "sources need KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY, or "
        "~/.kaggle/kaggle.json (and a competition's rules accepted); torchvision sources "
        "download through torchvision; a folder source is copied. Data already fetched "
        "(raw/.attnpipe-fetch.json) is not downloaded again.",
    ),
    "prepare": (
        "validate images, split stratified, write the manifest",
        "Decodes every image referenced in data/<name>/raw/ (in parallel), rejects unusable "
        "files with a reason into data/<name>/rejected.csv, drops exact duplicates, splits "
        "train/val/test stratified by class (group-aware when the dataset has groups) and "
        "writes data/<name>/manifest.parquet, data/<name>/classes.json and the metrics "
        "reports/<name>/data.json.",
    ),
    "shard": (
        "write WebDataset tar shards per split",
        "Reads data/<name>/manifest.parquet and writes data/<name>/shards/{train,val,test}-*.tar "
        "(optionally resized, byte-identical on every run) and data/<name>/shards/index.json.",
    ),
    "train": (
        "train with Ray Train (DDP), checkpointing every epoch",
        "Reads data/<name>/shards/ and trains the recipe's model with a Ray TorchTrainer "
        "(train.workers ranks; GPUs when available). Checkpoints go to "
        "models/<name>/checkpoints/ (or train.storage_path); an interrupted run resumes from "
        "its last checkpoint when started again. Writes models/<name>/model.pt (best epoch on "
        "validation) and reports/<name>/train_history.csv. Connects to RAY_ADDRESS or "
        "--address when given, else starts a local Ray cluster.",
    ),
    "evaluate": (
        "score the model on the test split",
        "Reads models/<name>/model.pt and the test shards; writes reports/<name>/metrics.json, "
        "reports/<name>/confusion.csv and reports/<name>/per_class.csv.",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print(
            "attnpipe: interrupted; finished work (checkpoints, outputs) is kept", file=sys.stderr
        )
        return 130
    except Exception as error:
        if args.debug or not _is_user_error(error):
            raise
        print(f"attnpipe: error: {error}", file=sys.stderr)
        return 1


def _is_user_error(error: Exception) -> bool:
    from attnpipe.data.layouts import LayoutError
    from attnpipe.data.prepare import PrepareError
    from attnpipe.data.shard import ShardError
    from attnpipe.data.sources import FetchError
    from attnpipe.train.launch import TrainError

    known = (
        ConfigError,
        FetchError,
        LayoutError,
        PrepareError,
        ShardError,
        TrainError,
        FileNotFoundError,
    )
    return isinstance(error, known)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnpipe",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="project folder holding pipelines/ (default: .)",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    handlers: dict[str, Callable[[argparse.Namespace], int | None]] = {
        "fetch": _fetch,
        "prepare": _prepare,
        "shard": _shard,
        "train": _train,
        "evaluate": _evaluate,
    }
    for name, (summary, details) in STAGES.items():
        sub = commands.add_parser(name, help=summary, description=f"{summary}.\n\n{details}")
        sub.add_argument("pipeline", help="pipeline name: pipelines/<pipeline>.yaml")
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
        if name == "train":
            sub.add_argument(
                "--address",
                help="Ray cluster to join, e.g. ray://head:10001 or auto (default: RAY_ADDRESS, "
                "else a new local cluster)",
            )
        sub.set_defaults(handler=handlers[name])

    run = commands.add_parser(
        "run",
        help="run every stage of a pipeline in order (no DVC needed)",
        description="Run fetch, prepare, shard, train and evaluate for one pipeline, in order. "
        "Unlike `dvc repro`, this re-runs every stage.",
    )
    run.add_argument("pipeline", help="pipeline name: pipelines/<pipeline>.yaml")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--address", help="Ray cluster to train on (see `attnpipe train --help`)")
    run.set_defaults(handler=_run_all)

    models = commands.add_parser(
        "models",
        help="list the registered networks",
        description="Print every model name with its parameters (1000 classes), multiply-adds "
        "at its default input size, default input size and the attention maps it exposes.",
    )
    models.set_defaults(handler=_models)
    return parser


# --------------------------------------------------------------------------- handlers
def _load(args: argparse.Namespace) -> tuple[Recipe, PipelinePaths]:
    root = args.root.resolve()
    return load_recipe(args.pipeline, root), PipelinePaths(root, args.pipeline)


def _fetch(args: argparse.Namespace) -> None:
    from attnpipe.data.sources import fetch

    recipe, paths = _load(args)
    out = fetch(recipe, paths.raw, progress=not args.no_progress, root=paths.root)
    print(f"fetched '{recipe.source.kind}' into {out}")


def _prepare(args: argparse.Namespace) -> None:
    from attnpipe.data.prepare import format_data_report, prepare

    recipe, paths = _load(args)
    result = prepare(recipe, paths, progress=not args.no_progress)
    print(format_data_report(result.report))
    print(f"manifest: {paths.manifest}  rejected: {paths.rejected}")


def _shard(args: argparse.Namespace) -> None:
    from attnpipe.data.shard import shard

    recipe, paths = _load(args)
    index = shard(recipe, paths, progress=not args.no_progress)
    for split, block in index["splits"].items():
        print(f"{split}: {block['samples']} samples in {len(block['shards'])} shard(s)")


def _train(args: argparse.Namespace) -> None:
    from attnpipe.train.launch import train

    recipe, paths = _load(args)
    result = train(recipe, paths, address=args.address)
    metric = recipe.train.monitor
    best = result.best_metrics.get(metric, float("nan"))
    print(
        f"best epoch {result.best_epoch}: {metric} {best:.4f}; model written to {result.model_file}"
    )


def _evaluate(args: argparse.Namespace) -> None:
    from attnpipe.evaluate.run import evaluate

    recipe, paths = _load(args)
    metrics = evaluate(recipe, paths)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"test ({metrics['test_samples']} samples): {shown}")
    print(f"metrics: {paths.metrics}")


def _run_all(args: argparse.Namespace) -> None:
    for step in (_fetch, _prepare, _shard, _train, _evaluate):
        step(args)


def _models(args: argparse.Namespace) -> None:
    from attnpipe.models import format_model_table

    print(format_model_table())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
