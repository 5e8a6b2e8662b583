"""The pipeline's stages as commands: fetch, prepare, shard, train, evaluate, export, tune
and `run` (all of them in order)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from attnpipe.cli.cluster import submitted_to_cluster
from attnpipe.cli.options import PIPELINE_HELP, add_recipe_change_options, load_for_command
from attnpipe.config import Recipe
from attnpipe.jobs import print_results
from attnpipe.paths import PipelinePaths

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
        "writes data/<name>/manifest.parquet, data/<name>/classes.json, the metrics "
        "reports/<name>/data.json (images kept, rejected, duplicates) and the counts per class "
        "and split, reports/<name>/class_counts.csv. Folder sources with split folders "
        "(train/ val/ test/) or a split column keep those splits.",
    ),
    "shard": (
        "write WebDataset tar shards per split",
        "Reads data/<name>/manifest.parquet and writes data/<name>/shards/{train,val,test}-*.tar "
        "(optionally resized, byte-identical on every run) and data/<name>/shards/index.json. "
        "With shard.publish_to in the recipe (or --publish URL) it also uploads them to object "
        "storage (s3://bucket/prefix) or a shared folder, index last; train and evaluate then "
        "read the shards from shard.publish_to on every node.",
    ),
    "train": (
        "train with Ray Train (DDP), checkpointing every epoch (and train.checkpoint_every)",
        "Reads data/<name>/shards/ (or shard.publish_to) and trains the recipe's model with a "
        "Ray TorchTrainer "
        "(train.workers ranks; GPUs when available). Checkpoints go to "
        "models/<name>/checkpoints/ (or train.storage_path, e.g. s3://bucket/checkpoints, "
        "which a multi-node cluster needs); an interrupted run resumes from "
        "its last checkpoint when started again. Writes models/<name>/model.pt (best epoch on "
        "validation), reports/<name>/train_history.csv, the run's record "
        "reports/<name>/train.json and its headline, the metrics "
        "reports/<name>/train_summary.json. Connects to RAY_ADDRESS or "
        "--address when given, else starts a local Ray cluster.",
    ),
    "evaluate": (
        "score the model on the test split and write the report",
        "Reads models/<name>/model.pt (in a job `attnpipe submit` started: the training "
        "run's, from train.storage_path), the test shards (data/<name>/shards/) and "
        "reports/<name>/train_history.csv. Predicts every test image exactly once (with flip "
        "TTA when the recipe's evaluate.flip_tta is on) and writes reports/<name>/metrics.json "
        "(accuracy, balanced accuracy, macro precision/recall/F1, ECE, top-5 with more than 5 "
        "classes; binary: ROC-AUC, PR-AUC, sensitivity and specificity at evaluate.threshold) "
        "and its headline, the metrics reports/<name>/test_summary.json, "
        "reports/<name>/confusion.csv (one row per test image), reports/<name>/per_class.csv, "
        "PNG figures in reports/<name>/figures/ (confusion matrix, training curves, "
        "calibration, attention overlays of right and wrong test images) and "
        "reports/<name>/index.html, a self-contained page of all of it with the model's "
        "provenance (open it in any browser).",
    ),
    "export": (
        "export the model to ONNX, verified against PyTorch",
        "Reads models/<name>/model.pt and the test shards; writes models/<name>/model.onnx "
        "(input 'input' N x 3 x S x S normalised float32, output 'logits' N x classes, dynamic "
        "batch axis; class names, input size, mean/std and provenance in its metadata, so "
        "`attnpipe predict` needs nothing else). The file is kept only if ONNX Runtime and "
        "PyTorch agree on real test images (max |logit difference| <= 1e-4 per unit of logit "
        "scale). Prints the file size and the single-image CPU latency (one thread) of both "
        "runtimes.",
    ),
}


def add_stage_commands(commands: argparse._SubParsersAction) -> None:
    handlers: dict[str, Callable[[argparse.Namespace], int | None]] = {
        "fetch": _fetch,
        "prepare": _prepare,
        "shard": _shard,
        "train": _train,
        "evaluate": _evaluate,
        "export": _export,
    }
    for name, (summary, details) in STAGES.items():
        sub = commands.add_parser(
            name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.\n\n{details}"
        )
        sub.add_argument("pipeline", help=PIPELINE_HELP)
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
        add_recipe_change_options(sub)
        if name in ("prepare", "shard"):
            work = "validate the images" if name == "prepare" else "write the shards"
            sub.add_argument(
                "--address",
                help=f"Ray cluster (HEAD:6379) to {work} on, as Ray tasks; each task reads its "
                "images from the project folder as the nodes see it (--shared-root) and "
                + ("writes its tar there" if name == "shard" else "returns their facts")
                + ": no image passes through this process; the output is byte-identical to a "
                "local run (default: RAY_ADDRESS, else local processes)",
            )
            sub.add_argument(
                "--shared-root",
                metavar="PATH_OR_URL",
                help="with --address: where every node sees this project's folder, a path on a "
                "shared file system or an object-store URL holding its data/ (s3://bucket/proj); "
                "default: the project folder's own path (shared at the same path, e.g. NFS)",
            )
        if name == "shard":
            sub.add_argument(
                "--publish",
                metavar="URL",
                help="also upload the shards to URL (s3://bucket/prefix or an absolute shared "
                "path); default: the recipe's shard.publish_to. Training reads from the recipe's "
                "shard.publish_to, so set it there for cluster runs",
            )
        if name == "train":
            sub.add_argument(
                "--address",
                help="Ray cluster to join, e.g. ray://head:10001 or auto (default: RAY_ADDRESS, "
                "else a new local cluster)",
            )
        if name == "evaluate":
            sub.add_argument(
                "--address",
                help="Ray cluster to score the test split on: evaluate.workers Ray workers "
                "(auto: one per GPU), each a share of the shards (default: RAY_ADDRESS, else "
                "this process on evaluate.device)",
            )
        if name == "export":
            _export_options(sub)
        sub.set_defaults(handler=handlers[name])


def add_tune(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser(
        "tune",
        help="sweep hyperparameters with Ray Tune (ASHA early stopping)",
        description="Sweep the recipe's `tune.space` (dotted recipe keys with loguniform, "
        "uniform or choice ranges): `tune.num_samples` trials, `tune.max_concurrent_trials` at "
        "once, each a Ray TorchTrainer run on the pipeline's shards (data/<name>/shards/), "
        "stopped early by ASHA on `tune.metric`. Writes reports/<name>/tune_trials.csv (every "
        "trial's settings, last and best metric, stopped early or not) and "
        "reports/<name>/best_params.yaml; apply the latter with `attnpipe train <name> "
        "--overrides reports/<name>/best_params.yaml`. An interrupted sweep resumes when run "
        "again; finished trials are not re-run. Joins RAY_ADDRESS or --address when given.",
    )
    tune.add_argument("pipeline", help=PIPELINE_HELP)
    tune.add_argument("--address", help="Ray cluster to run the trials on")
    add_recipe_change_options(tune)
    tune.set_defaults(handler=_tune)


def add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="run every stage of a pipeline in order (no DVC needed)",
        description="Run fetch, prepare, shard, train, evaluate and export for one pipeline, "
        "in order. Unlike `dvc repro`, this re-runs every stage.",
    )
    run.add_argument("pipeline", help=PIPELINE_HELP)
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--address", help="Ray cluster to train on (see `attnpipe train --help`)")
    add_recipe_change_options(run)
    _export_options(run)
    run.set_defaults(handler=run_all, publish=None)


def _export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--opset", type=int, default=17, help="ONNX opset version, 17 or newer (default: 17)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=16,
        help="test images the export is verified on (default: 16)",
    )


# --------------------------------------------------------------------------- handlers
def _fetch(args: argparse.Namespace) -> None:
    _fetch_stage(args, *load_for_command(args))


def _fetch_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.data.sources import fetch

    out = fetch(recipe, paths.raw, progress=not args.no_progress, root=paths.root)
    print(f"fetched '{recipe.source.kind}' into {out}")


def _prepare(args: argparse.Namespace) -> None:
    _prepare_stage(args, *load_for_command(args))


def _prepare_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.data.prepare import format_data_report, prepare
    from attnpipe.data.ray_tasks import cluster_address

    address = cluster_address(getattr(args, "address", None))
    shared = getattr(args, "shared_root", None)
    result = prepare(recipe, paths, not args.no_progress, address, shared)
    print(format_data_report(result.report))
    print(f"manifest: {paths.manifest}  rejected: {paths.rejected}")


def _shard(args: argparse.Namespace) -> None:
    _shard_stage(args, *load_for_command(args))


def _shard_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.data.ray_tasks import cluster_address
    from attnpipe.data.shard import publish_shards, shard

    address = cluster_address(getattr(args, "address", None))
    shared = getattr(args, "shared_root", None)
    index = shard(recipe, paths, not args.no_progress, address, shared)
    for split, block in index["splits"].items():
        print(f"{split}: {block['samples']} samples in {len(block['shards'])} shard(s)")
    target = args.publish or recipe.shard.publish_to
    if target:
        publish_shards(paths.shards, target)
        count = sum(len(block["shards"]) for block in index["splits"].values())
        print(f"published {count} shard(s) and index.json to {target}")


def _train(args: argparse.Namespace) -> None:
    if not submitted_to_cluster("train", args):
        _train_stage(args, *load_for_command(args))


def _train_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.train.launch import train

    result = train(recipe, paths, address=args.address)
    metric = recipe.train.monitor
    best = result.best_metrics.get(metric, float("nan"))
    print(
        f"best epoch {result.best_epoch}: {metric} {best:.4f}; model written to {result.model_file}"
    )
    finish_stage(
        "train",
        recipe,
        paths,
        {
            "pipeline": recipe.name,
            "run_name": result.run_name,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "resumed_from": result.resumed_from,
            "metrics": result.best_metrics,
        },
    )


def _evaluate(args: argparse.Namespace) -> None:
    if not submitted_to_cluster("evaluate", args):
        _evaluate_stage(args, *load_for_command(args))


def _evaluate_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.evaluate.run import evaluate

    metrics = evaluate(recipe, paths, address=getattr(args, "address", None))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"test ({metrics['test_samples']} samples): {shown}")
    print(f"metrics: {paths.metrics}")
    print(f"report:  {paths.report_html}")
    finish_stage("evaluate", recipe, paths, {"pipeline": recipe.name, "metrics": metrics})


def _export(args: argparse.Namespace) -> None:
    _export_stage(args, *load_for_command(args))


def _export_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.evaluate.export import export, format_size

    result = export(recipe, paths, opset=args.opset, samples=args.samples)
    print(
        f"exported {result.path} (opset {result.opset}, dynamic batch): "
        f"{format_size(result.size_bytes)}"
    )
    print(
        f"verified on {result.samples_checked} test images: ONNX Runtime and PyTorch agree "
        f"(max |logit difference| {result.max_abs_diff:.2e})"
    )
    print(
        f"single-image CPU latency (1 thread, median of 20): ONNX Runtime "
        f"{result.onnx_latency_ms:.2f} ms, PyTorch {result.torch_latency_ms:.2f} ms"
    )


def _tune(args: argparse.Namespace) -> None:
    if submitted_to_cluster("tune", args):
        return
    from attnpipe.train.tune import tune

    recipe, paths = load_for_command(args)
    result = tune(recipe, paths, address=args.address)
    best = {k: v for k, v in result.best.items() if "." in k}
    print(
        f"sweep '{result.experiment}': {len(result.trials)} trials; best {result.best['trial_id']}"
    )
    print(f"best settings {best} written to {paths.reports / 'best_params.yaml'}")
    metric = recipe.tune.metric
    finish_stage(
        "tune",
        recipe,
        paths,
        {
            "pipeline": recipe.name,
            "experiment": result.experiment,
            "trials": len(result.trials),
            "best_trial": result.best["trial_id"],
            "best_params": best,
            "metrics": {metric: result.best.get(f"best_{metric}")},
        },
    )


def finish_stage(stage: str, recipe: Recipe, paths: PipelinePaths, results: dict) -> None:
    """In a cluster job, publish the stage's outputs to shared storage for `submit` or `pull`
    to bring home (the job's working directory is gone soon); then the results line."""
    from attnpipe import joboutputs

    if joboutputs.in_job():
        published = joboutputs.publish(stage, recipe.train.storage_path, paths)
        if published:
            results = {**results, "outputs": published.location}
    print_results(stage, results)


def run_all(args: argparse.Namespace) -> None:
    """Every stage in order, on one recipe (with this command's --set and --overrides)."""
    recipe, paths = load_for_command(args)
    for stage in (
        _fetch_stage,
        _prepare_stage,
        _shard_stage,
        _train_stage,
        _evaluate_stage,
        _export_stage,
    ):
        stage(args, recipe, paths)
