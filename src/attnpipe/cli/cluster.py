"""Commands for a Ray cluster's jobs: submit a stage, list, follow and stop jobs."""

from __future__ import annotations

import argparse

from attnpipe.cli.options import PIPELINE_HELP

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
