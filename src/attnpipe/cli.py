"""`attnpipe`: a thin command line over the library; each subcommand runs one stage."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from attnpipe.config import Recipe, apply_overrides, load_overrides, load_recipe, parse_assignments
from attnpipe.errors import AttnpipeError
from attnpipe.jobs import print_results
from attnpipe.paths import PipelinePaths

DESCRIPTION = """\
Reproducible training of attention CNNs: fetch -> prepare -> shard -> train -> evaluate,
export (ONNX); then `predict` on new images.

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
        "(optionally resized, byte-identical on every run) and data/<name>/shards/index.json. "
        "With shard.publish_to in the recipe (or --publish URL) it also uploads them to object "
        "storage (s3://bucket/prefix) or a shared folder, index last; train and evaluate then "
        "read the shards from shard.publish_to on every node.",
    ),
    "train": (
        "train with Ray Train (DDP), checkpointing every epoch",
        "Reads data/<name>/shards/ (or shard.publish_to) and trains the recipe's model with a "
        "Ray TorchTrainer "
        "(train.workers ranks; GPUs when available). Checkpoints go to "
        "models/<name>/checkpoints/ (or train.storage_path, e.g. s3://bucket/checkpoints, "
        "which a multi-node cluster needs); an interrupted run resumes from "
        "its last checkpoint when started again. Writes models/<name>/model.pt (best epoch on "
        "validation) and reports/<name>/train_history.csv. Connects to RAY_ADDRESS or "
        "--address when given, else starts a local Ray cluster.",
    ),
    "evaluate": (
        "score the model on the test split and write the report",
        "Reads models/<name>/model.pt, the test shards (data/<name>/shards/) and "
        "reports/<name>/train_history.csv. Predicts every test image exactly once (with flip "
        "TTA when the recipe's evaluate.flip_tta is on) and writes reports/<name>/metrics.json "
        "(accuracy, balanced accuracy, macro precision/recall/F1, ECE, top-5 with more than 5 "
        "classes; binary: ROC-AUC, PR-AUC, sensitivity and specificity at evaluate.threshold), "
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `kill`, a scheduler or a preempted node sends SIGTERM: unwind like Ctrl-C, so that Ray
    # shuts down cleanly and every checkpoint written so far survives for the next run.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print(
            "attnpipe: interrupted; finished epochs are checkpointed: run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        if args.debug or not is_expected(error):
            raise
        # One line, whatever the message holds: the traceback is one --debug away.
        print(f"attnpipe: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def is_expected(error: BaseException) -> bool:
    """A failure of the user's input or environment (printed as one line), not a bug."""
    from attnpipe.models import ModelError

    return isinstance(error, AttnpipeError | ModelError | FileNotFoundError)


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
    _add_stage_commands(commands)
    _add_tune(commands)
    _add_predict(commands)
    _add_run(commands)
    _add_cluster_commands(commands)
    models = commands.add_parser(
        "models",
        help="list the registered networks",
        description="Print every model name with its parameters (1000 classes), multiply-adds "
        "at its default input size, default input size and the attention maps it exposes.",
    )
    models.set_defaults(handler=_models)
    return parser


def _add_stage_commands(commands: argparse._SubParsersAction) -> None:
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
        sub.add_argument("pipeline", help="pipeline name: pipelines/<pipeline>.yaml")
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
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
        if name in ("train", "evaluate"):
            _recipe_change_options(sub)
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


def _add_tune(commands: argparse._SubParsersAction) -> None:
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
    tune.add_argument("pipeline", help="pipeline name: pipelines/<pipeline>.yaml")
    tune.add_argument("--address", help="Ray cluster to run the trials on")
    _recipe_change_options(tune)
    tune.set_defaults(handler=_tune)


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="run every stage of a pipeline in order (no DVC needed)",
        description="Run fetch, prepare, shard, train, evaluate and export for one pipeline, "
        "in order. Unlike `dvc repro`, this re-runs every stage.",
    )
    run.add_argument("pipeline", help="pipeline name: pipelines/<pipeline>.yaml")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--address", help="Ray cluster to train on (see `attnpipe train --help`)")
    _recipe_change_options(run)
    _export_options(run)
    run.set_defaults(handler=_run_all, publish=None)


SUBMIT_HELP = """\
Run `attnpipe <stage> <pipeline>` on a Ray cluster as a Ray job, stream its logs here and exit
with the job's status (0 when it succeeded, non-zero when it failed or was stopped).

Inputs: the project folder (--root) is uploaded as the job's working directory: code,
pipelines/, dvc.lock; never data/, models/*/checkpoints/, .venv/, wandb/, .dvc/cache/, .git/
(nor what .gitignore or .rayignore exclude); at most 512 MiB. The job therefore reads its
shards from the recipe's shard.publish_to (publish them first: `attnpipe shard <pipeline>`)
and checkpoints to train.storage_path (s3://...); both are checked before anything is uploaded.
AWS_* and WANDB_* variables of this shell (and any named with --env) are set in the job's
environment; their values are never printed. With token authentication on the cluster, set
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN here.

Outputs: the job's logs; a last line with its status and the metrics it reported (train: the
best epoch's validation metrics; evaluate: the test metrics). Checkpoints stay in
train.storage_path: running `attnpipe train <pipeline>` here afterwards finds the finished run
there, trains nothing and writes models/<pipeline>/model.pt. With --no-wait it prints the job
id and returns at once; follow it with `attnpipe jobs logs ID --follow`.
"""

JOBS_HELP = """\
List, follow and stop the Ray jobs on a cluster (those `attnpipe submit` started, or all with
--all). Reads the cluster at --address (the dashboard, http://HEAD:8265) or
RAY_API_SERVER_ADDRESS. Nothing here prints a job's environment variables.
"""


def _add_cluster_commands(commands: argparse._SubParsersAction) -> None:
    address_help = (
        "the cluster's Ray dashboard, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)"
    )
    submit = commands.add_parser(
        "submit",
        help="run a stage on a Ray cluster as a job and follow it",
        description=SUBMIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("pipeline", help="pipeline name: pipelines/<pipeline>.yaml")
    submit.add_argument("--address", help=address_help)
    submit.add_argument(
        "--stage",
        choices=["train", "tune", "evaluate"],
        default="train",
        help="the command the job runs: attnpipe <stage> <pipeline> (default: train)",
    )
    submit.add_argument(
        "--no-wait", action="store_true", help="print the job id and return without following"
    )
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="also pass this environment variable to the job (repeatable; AWS_* and WANDB_* "
        "always are); give names, never values",
    )
    submit.set_defaults(handler=_submit)

    jobs = commands.add_parser(
        "jobs",
        help="list, follow or stop cluster jobs",
        description=JOBS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = jobs.add_subparsers(title="actions", metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="the jobs with their status",
        description="One line per job, newest first: id, status, stage, pipeline, start time "
        "and duration.",
    )
    listing.add_argument("--all", action="store_true", help="also jobs not started by attnpipe")
    listing.add_argument("--address", help=address_help)
    listing.set_defaults(handler=_jobs_list)
    logs = actions.add_parser(
        "logs",
        help="print (or follow) a job's logs",
        description="Print a job's logs so far; with --follow, stream them until the job ends "
        "and exit with its status.",
    )
    logs.add_argument("job_id", metavar="ID", help="the id `attnpipe submit` printed")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    logs.add_argument("--address", help=address_help)
    logs.set_defaults(handler=_jobs_logs)
    stop = actions.add_parser(
        "stop",
        help="stop a running job",
        description="Stop a job (SIGTERM, then SIGKILL): its finished epochs stay checkpointed "
        "in train.storage_path, and submitting the same pipeline again resumes.",
    )
    stop.add_argument("job_id", metavar="ID", help="the job to stop")
    stop.add_argument("--address", help=address_help)
    stop.set_defaults(handler=_jobs_stop)
    jobs.set_defaults(handler=lambda args: jobs.print_help() or 2)


def _recipe_change_options(parser: argparse.ArgumentParser) -> None:
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


PREDICT_DESCRIPTION = """\
Predict the class of image files with a trained model: models/<name>/model.pt, or the
models/<name>/model.onnx that `attnpipe export` writes (run by ONNX Runtime; no PyTorch model
code needed). Images are read like the training data (EXIF orientation, any mode to RGB) and
resized, centre-cropped and normalised like evaluation; flip TTA is used when the model's
recipe had evaluate.flip_tta on.

Inputs: image files and/or folders (a folder's files, not recursive, sorted by name).

Output: one line per file, the predicted class and its probability, as a table on stdout,
or as CSV with --output FILE.csv (columns file, class_index, class, probability, error).
A file that is missing, corrupt or not an image gets an error line (on stderr, and in the
error column) and every other file is still predicted.

--kaggle-submission writes a Kaggle submission instead (default file: submission.csv):
header image_id,label, the file name as image_id and the predicted class index as label
(for Cassava, the competition's numeric label). With --sample-submission, its header and its
ids in its order are copied exactly; an id without a usable image keeps the sample's label
and counts as a failure.

Exit status: 0 when every file was predicted, 1 when any failed (or an error stopped the
command), 2 for wrong arguments.
"""


def _add_predict(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "predict",
        help="predict image files or folders with model.pt or model.onnx",
        description=PREDICT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    sub.add_argument(
        "-m",
        "--model",
        type=Path,
        required=True,
        help="models/<name>/model.pt, or an .onnx file written by `attnpipe export`",
    )
    sub.add_argument(
        "-o",
        "--output",
        type=Path,
        help="write CSV here instead of printing a table (with --kaggle-submission: the "
        "submission file, default submission.csv)",
    )
    sub.add_argument(
        "--kaggle-submission",
        action="store_true",
        help="write a Kaggle submission (image_id,label) instead of the prediction table",
    )
    sub.add_argument(
        "--sample-submission",
        type=Path,
        help="the competition's sample_submission.csv: copy its header and id order exactly",
    )
    sub.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default: 32)"
    )
    sub.set_defaults(handler=_predict)


# --------------------------------------------------------------------------- handlers
def _load(args: argparse.Namespace) -> tuple[Recipe, PipelinePaths]:
    """The recipe with this command's --overrides and --set applied, and the project's paths."""
    root = args.root.resolve()
    recipe = load_recipe(args.pipeline, root)
    changes = {}
    if getattr(args, "overrides", None):
        changes.update(load_overrides(args.overrides))
    changes.update(parse_assignments(getattr(args, "set", None) or []))
    if changes:
        recipe = apply_overrides(
            recipe, changes, origin=f"pipelines/{args.pipeline}.yaml + changes"
        )
        print(f"recipe changes for this run: {changes}")
    return recipe, PipelinePaths(root, args.pipeline)


def _fetch(args: argparse.Namespace) -> None:
    _fetch_stage(args, *_load(args))


def _fetch_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.data.sources import fetch

    out = fetch(recipe, paths.raw, progress=not args.no_progress, root=paths.root)
    print(f"fetched '{recipe.source.kind}' into {out}")


def _prepare(args: argparse.Namespace) -> None:
    _prepare_stage(args, *_load(args))


def _prepare_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.data.prepare import format_data_report, prepare
    from attnpipe.data.ray_tasks import cluster_address

    address = cluster_address(getattr(args, "address", None))
    shared = getattr(args, "shared_root", None)
    result = prepare(recipe, paths, not args.no_progress, address, shared)
    print(format_data_report(result.report))
    print(f"manifest: {paths.manifest}  rejected: {paths.rejected}")


def _shard(args: argparse.Namespace) -> None:
    _shard_stage(args, *_load(args))


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
    _train_stage(args, *_load(args))


def _train_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.train.launch import train

    result = train(recipe, paths, address=args.address)
    metric = recipe.train.monitor
    best = result.best_metrics.get(metric, float("nan"))
    print(
        f"best epoch {result.best_epoch}: {metric} {best:.4f}; model written to {result.model_file}"
    )
    print_results(
        "train",
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
    _evaluate_stage(args, *_load(args))


def _evaluate_stage(args: argparse.Namespace, recipe: Recipe, paths: PipelinePaths) -> None:
    from attnpipe.evaluate.run import evaluate

    metrics = evaluate(recipe, paths, address=getattr(args, "address", None))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"test ({metrics['test_samples']} samples): {shown}")
    print(f"metrics: {paths.metrics}")
    print(f"report:  {paths.report_html}")
    print_results("evaluate", {"pipeline": recipe.name, "metrics": metrics})


def _submit(args: argparse.Namespace) -> int:
    from attnpipe.jobs import describe, submit

    result = submit(
        args.root,
        args.pipeline,
        args.address,
        stage=args.stage,
        wait=not args.no_wait,
        extra_env=args.env,
    )
    if args.no_wait:
        return 0
    print(describe(result, _summarize_results))
    return result.exit_code


def _summarize_results(results: dict) -> str:
    metrics = results.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    epoch = f"best epoch {results['best_epoch']}: " if "best_epoch" in results else ""
    return f"{results.get('stage', '')} {epoch}{shown}".strip()


def _jobs_list(args: argparse.Namespace) -> None:
    from attnpipe.jobs import format_jobs, list_jobs

    print(format_jobs(list_jobs(args.address, every=args.all)))


def _jobs_logs(args: argparse.Namespace) -> int:
    from attnpipe.jobs import job_logs

    return job_logs(args.address, args.job_id, args.follow)


def _jobs_stop(args: argparse.Namespace) -> int:
    from attnpipe.jobs import stop_job

    status = stop_job(args.address, args.job_id)
    print(f"job {args.job_id} {status}")
    return 0 if status in ("STOPPED", "SUCCEEDED", "FAILED") else 1


def _export(args: argparse.Namespace) -> None:
    _export_stage(args, *_load(args))


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


def _predict(args: argparse.Namespace) -> int:
    from attnpipe.evaluate.predict import (
        PredictError,
        collect_files,
        format_table,
        load_predictor,
        predict_files,
        write_predictions_csv,
        write_submission,
    )

    if args.sample_submission and not args.kaggle_submission:
        raise PredictError("--sample-submission needs --kaggle-submission")
    predictor = load_predictor(args.model)
    files = collect_files(args.inputs)
    if not files:
        print("attnpipe: error: no files found in the inputs", file=sys.stderr)
        return 1
    rows = predict_files(predictor, files, batch_size=args.batch_size)
    failed = [f"{r.path.name} ({r.error})" for r in rows if not r.ok]
    if args.kaggle_submission:
        target = args.output or Path("submission.csv")
        submission = write_submission(rows, target, args.sample_submission)
        print(f"submission: {submission.rows} rows written to {target}")
        for problem in submission.problems:
            print(f"  kept the sample's label: {problem}")
        failed = [problem.replace(": ", " (", 1) + ")" for problem in submission.problems]
    elif args.output:
        write_predictions_csv(rows, args.output)
        print(f"predictions: {len(rows) - len(failed)} of {len(rows)} files -> {args.output}")
    else:
        print(format_table(rows))  # failed files are ERROR rows, with the reason
    if failed:
        # One line whatever the count: the table, the CSV's error column or the lines above
        # hold every file's reason.
        shown = ", ".join(failed[:3]) + (f", and {len(failed) - 3} more" if len(failed) > 3 else "")
        count = f"{len(failed)} of {len(rows)} file(s)"
        print(f"attnpipe: error: {count} could not be predicted: {shown}", file=sys.stderr)
        return 1
    return 0


def _tune(args: argparse.Namespace) -> None:
    from attnpipe.train.tune import tune

    recipe, paths = _load(args)
    result = tune(recipe, paths, address=args.address)
    best = {k: v for k, v in result.best.items() if "." in k}
    print(
        f"sweep '{result.experiment}': {len(result.trials)} trials; best {result.best['trial_id']}"
    )
    print(f"best settings {best} written to {paths.reports / 'best_params.yaml'}")


def _run_all(args: argparse.Namespace) -> None:
    """Every stage in order, on one recipe (with this command's --set and --overrides)."""
    recipe, paths = _load(args)
    for stage in (
        _fetch_stage,
        _prepare_stage,
        _shard_stage,
        _train_stage,
        _evaluate_stage,
        _export_stage,
    ):
        stage(args, recipe, paths)


def _models(args: argparse.Namespace) -> None:
    from attnpipe.models import format_model_table

    print(format_model_table())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
