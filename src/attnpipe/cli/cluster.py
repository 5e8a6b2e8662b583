"""Commands for a Ray cluster's jobs: submit a stage, list, follow and stop jobs, pull
the outputs a job published home, and plan a training run's ranks on a cluster."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from attnpipe.cli.options import PIPELINE_HELP, add_recipe_change_options, recipe_changes

if TYPE_CHECKING:
    from attnpipe.config import Recipe
    from attnpipe.placement import ClusterCapacity

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

--set and --overrides change the recipe as for the stage itself: the job runs
`attnpipe <stage> <pipeline> --set KEY=VALUE ...` (an overrides file's keys are passed inline
as --set, so the file need not be uploaded; --set wins).

Outputs: the job's logs; a last line with its status and the metrics it reported (train: the
best epoch's validation metrics; evaluate: the test metrics; tune: the best trial). The job
publishes the stage's outputs to train.storage_path, under
<storage_path>/<pipeline>/outputs/<stage>/<job id>/, and when it succeeds they are brought
home to where a local run writes them: train: models/<pipeline>/model.pt and
reports/<pipeline>/train.json, train_summary.json, train_history.csv; evaluate:
reports/<pipeline>/metrics.json, test_summary.json, confusion.csv, per_class.csv, figures/,
index.html; tune: reports/<pipeline>/tune_trials.csv, best_params.yaml; and the W&B offline
run folders under wandb/. A failed job brings nothing home. Evaluate scores the training run
of the same recipe from train.storage_path (submit train first), never a model.pt uploaded
from here. Checkpoints stay in train.storage_path. With --no-wait it prints the job id and
returns at once; follow it with `attnpipe jobs logs ID --follow` and bring its outputs home
with `attnpipe pull <pipeline> --job ID`. With ATTNPIPE_CLUSTER=http://HEAD:8265 set, `attnpipe
train`, `evaluate` and `tune` (and so `dvc repro`) submit themselves this way.
"""

PULL_HELP = """\
Bring home the outputs that cluster jobs published to train.storage_path (see `attnpipe
submit --help`): for a job submitted with --no-wait, run by a RayJob, or whose download
failed. Reads <storage_path>/<pipeline>/outputs/<stage>/: the newest complete outputs of each
stage asked for (default: train, tune and evaluate, those that have any), or those of --job ID.
Writes them where a local run writes them (models/<pipeline>/, reports/<pipeline>/, wandb/),
replacing what is there; everything is downloaded and checked before anything is replaced.
Only jobs that succeeded publish outputs. Needs the storage credentials (AWS_*) here.
"""

PLAN_HELP = """\
Print what `attnpipe train <pipeline>` would start, without starting anything: the ranks
(train.workers: a number, auto, or an elastic [min, max]), GPU or CPU, how many go on each
node type (alive nodes first, then nodes the autoscaler would add), the node types that hold
none and the setting that would change that, the global batch (ranks x train.batch_size x
train.accumulate_steps), the learning rate scaled to it (train.optimizer.scale_lr) and the
loader processes per rank. The decision is the run's own, so plan and run never disagree.

A worker is a bundle (train.cpus_per_worker CPUs, train.gpus_per_worker GPUs) that must fit
on one node: `auto` counts the whole workers each node holds, times the nodes of its type
alive or addable (each type's max_workers, and the cluster's max_workers). A plan that
cannot be placed is refused (exit 1) with what fits and what to change, as the run would
refuse it before any worker starts.

The cluster: --cluster FILE, a `ray up` file (cluster/aws.yaml, cluster/gcp.yaml: its node
types' resources and min/max_workers; nothing is contacted); or --address, a running Ray
cluster (HEAD:6379, ray://HEAD:10001: its alive nodes and its autoscaler's node types); by
default RAY_ADDRESS, else this machine as `attnpipe train` would use it (a private cluster of
its CPUs and GPUs). Reads pipelines/<pipeline>.yaml; writes nothing.

  attnpipe plan imagenet --cluster cluster/aws.yaml
  attnpipe plan imagenet --cluster cluster/aws.yaml --set train.cpus_per_worker=4
"""

JOBS_HELP = """\
List, follow and stop the Ray jobs on a cluster (those `attnpipe submit` started, or all with
--all). Reads the cluster at --address (the dashboard, http://HEAD:8265) or
RAY_API_SERVER_ADDRESS. Nothing here prints a job's environment variables.
"""


def add_cluster_commands(commands: argparse._SubParsersAction) -> None:
    address_help = (
        "the cluster's Ray dashboard, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)"
    )
    submit = commands.add_parser(
        "submit",
        help="run a stage on a Ray cluster as a job and follow it",
        description=SUBMIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("pipeline", help=PIPELINE_HELP)
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
    add_recipe_change_options(submit)
    submit.set_defaults(handler=_submit)
    _add_pull(commands)
    _add_plan(commands)

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


def _submit(args: argparse.Namespace) -> int:
    from attnpipe.jobs import describe, submit

    result = submit(
        args.root,
        args.pipeline,
        args.address,
        stage=args.stage,
        wait=not args.no_wait,
        extra_env=args.env,
        changes=recipe_changes(args),
    )
    if args.no_wait:
        return 0
    print(describe(result, _summarize_results))
    return result.exit_code


def submitted_to_cluster(stage: str, args: argparse.Namespace) -> bool:
    """`ATTNPIPE_CLUSTER=http://HEAD:8265 dvc repro`: with the variable set, the Ray stages
    (train, evaluate, tune) submit themselves as cluster jobs and bring their outputs home to
    where DVC expects them; False: run here (not set, inside a job already, or --address
    given, which joins a cluster from this process instead)."""
    from attnpipe.joboutputs import in_job
    from attnpipe.jobs import CLUSTER_ENV, JobError, describe, submit

    address = os.environ.get(CLUSTER_ENV)
    if not address or in_job() or getattr(args, "address", None):
        return False
    print(f"{CLUSTER_ENV} is set: `attnpipe {stage} {args.pipeline}` runs as a job at {address}")
    result = submit(args.root, args.pipeline, address, stage=stage, changes=recipe_changes(args))
    print(describe(result, _summarize_results))
    if result.exit_code != 0:
        raise JobError(
            f"the {stage} job {result.job_id} ended {result.status}; nothing was brought home. "
            f"Its logs: attnpipe jobs logs {result.job_id} --address {address}"
        )
    return True


def _add_pull(commands: argparse._SubParsersAction) -> None:
    pull = commands.add_parser(
        "pull",
        help="bring home the outputs cluster jobs published",
        description=PULL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull.add_argument("pipeline", help=PIPELINE_HELP)
    pull.add_argument(
        "--stage",
        action="append",
        choices=["train", "tune", "evaluate"],
        help="the stage whose outputs to bring home (repeatable; default: every stage that "
        "published any)",
    )
    pull.add_argument(
        "--job", metavar="ID", help="this job's outputs (the id `attnpipe submit` printed)"
    )
    add_recipe_change_options(pull)  # e.g. --set train.storage_path=... as the job had it
    pull.set_defaults(handler=_pull)


def _pull(args: argparse.Namespace) -> None:
    from attnpipe.cli.options import load_for_command
    from attnpipe.joboutputs import PUBLISHED_STAGES, pull

    recipe, paths = load_for_command(args, announce=False)
    stages = tuple(args.stage) if args.stage else PUBLISHED_STAGES
    pull(recipe.train.storage_path, paths, stages, job_id=args.job)


def _add_plan(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan",
        help="print the ranks, nodes, global batch and learning rate a training run would use",
        description=PLAN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("pipeline", help=PIPELINE_HELP)
    where = plan.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        type=Path,
        metavar="FILE",
        help="a `ray up` cluster file to plan on, e.g. cluster/aws.yaml (relative to the "
        "current folder or --root)",
    )
    where.add_argument(
        "--address",
        help="a running Ray cluster to plan on, e.g. HEAD:6379 or ray://HEAD:10001 (default: "
        "RAY_ADDRESS, else this machine)",
    )
    add_recipe_change_options(plan)
    plan.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> None:
    import os

    from attnpipe.cli.options import load_for_command
    from attnpipe.train.plan import describe_training_plan, plan_training

    recipe, _ = load_for_command(args)
    address = args.address or (None if args.cluster else os.environ.get("RAY_ADDRESS"))
    if args.cluster:
        capacity, where = _file_capacity(args.cluster, args.root)
    elif address:
        capacity, where = _live_capacity(address), f"at {address}"
    else:
        capacity, where = _local_capacity(recipe), "(local)"
    print(describe_training_plan(plan_training(recipe, capacity, where)))


def _file_capacity(path: Path, root: Path) -> tuple[ClusterCapacity, str]:
    from attnpipe.placement import capacity_from_file

    if not path.is_file() and (root / path).is_file():
        path = root / path
    return capacity_from_file(path), f"in {path}"


def _live_capacity(address: str) -> ClusterCapacity:
    """The running cluster's nodes and node types, read through a short connection."""
    import ray

    from attnpipe.capacity import cluster_capacity
    from attnpipe.raycluster import configure_ray_environment, connect_ray

    configure_ray_environment()
    started_here = connect_ray(address)
    try:
        return cluster_capacity()
    finally:
        if started_here:
            ray.shutdown()


def _local_capacity(recipe: Recipe) -> ClusterCapacity:
    """This machine as the private cluster `attnpipe train` would start here."""
    from attnpipe.capacity import cpus_needed, local_capacity
    from attnpipe.raycluster import private_cluster_cpus
    from attnpipe.train.cluster import worker_shape

    needed = cpus_needed(worker_shape(recipe.train), recipe.train.workers)
    return local_capacity(private_cluster_cpus(needed))


def _summarize_results(results: dict) -> str:
    metrics = results.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    epoch = f"best epoch {results['best_epoch']}: " if "best_epoch" in results else ""
    if "best_trial" in results:  # tune
        epoch = f"best trial {results['best_trial']} {results.get('best_params', {})}: "
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
