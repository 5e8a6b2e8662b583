"""Every command README.md and docs/*.md show (their ```bash blocks) is either run here, as
written, or named with the reason it cannot run on this machine (a cloud account, a download, a
cluster). A new command in those pages fails `test_every_readme_command_is_run_or_excused` until
it is one or the other.

`uv run CMD` means "CMD in the project's environment": the tests run CMD with this
environment's bin/ first on PATH, in a copy of the digits project that `dvc repro` built
(tiny training settings, so that each training command takes seconds).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnpipe.config import apply_overrides, load_recipe
from attnpipe.paths import PipelinePaths
from attnpipe.runs import current_run_name
from tests.conftest import REPO, ReproProject, run_in, stages_run

pytestmark = [pytest.mark.ray, pytest.mark.dvc, pytest.mark.timeout(1200)]

RUN_HERE = [
    # First, while the copied project's outputs (copies, not links) are still dvc.lock's.
    "uv run dvc checkout --relink",
    "uv run attnpipe run digits",
    "uv run attnpipe predict -m models/digits/model.onnx "
    "data/digits/raw/train_images/digit_0001.png",
    "uv run attnpipe train digits --set train.epochs=1 "
    "--set 'model.kwargs={width_multiplier: 0.5}'",
    "uv run dvc metrics show",
    "uv run dvc plots show",
    "uv run dvc exp show --drop '.*' --keep "
    "'Experiment|best_epoch|val_accuracy|test_accuracy|wandb_run'",
    # Last: it changes the workspace (and checks that only the model stages re-run).
    "uv run dvc exp run -S pipelines/digits.yaml:train.epochs=1",
]
EXPERIMENT = RUN_HERE[-1]
# Run in the repository itself: they check or describe it (`uv run python`: this environment's).
RUN_IN_REPO = ["make lint", "make help", "uv run python -m tests.count_assertions"]
# The stage commands are dvc.yaml's (which the session's `dvc repro` build runs, with
# --no-progress); `attnpipe models` is run by tests/test_cli_help.py.
STAGES = ("fetch", "prepare", "shard", "train", "evaluate", "export")
BY_DVC_REPRO = [f"uv run attnpipe {stage} digits" for stage in STAGES]
QUEUED = "tests/e2e/test_dvc_experiments.py (two tiny experiments queued, run with -j 2)"
ELSEWHERE = {
    "uv run attnpipe models": "tests/test_cli_help.py::test_models_help_and_table",
    "uv run python docs/wandb_story.py . docs/images/wandb_story.png": (
        "tests/e2e/test_dvc_pipeline.py::test_the_readme_wandb_figure_is_drawn_from_the_offline_runs"
    ),
    "uv run dvc exp run --queue -n lr-low -S pipelines/digits.yaml:train.optimizer.lr=0.05": QUEUED,
    "uv run dvc exp run --queue -n tta -S pipelines/digits.yaml:evaluate.flip_tta=true": QUEUED,
    "ATTNPIPE_RAY_CPUS=1 uv run dvc queue start -j 2": QUEUED,
    "uv run dvc queue status": QUEUED,
}
WANDB_ACCOUNT = (
    "needs a W&B account and wandb.ai (no network here); offline runs are read back by tests"
)

CLUSTER = "needs a cloud account and a running Ray cluster (tests/cluster runs `attnpipe submit` and `jobs` against a local Ray head)"  # noqa: E501
DOWNLOAD = "downloads a dataset (no network here); tests/data runs the sources against local fakes"
IMAGENET = (
    DOWNLOAD + " (tests/data/test_imagenet.py runs every stage on a small ImageNet in the Kaggle "
    "layout, fetched from a fake Kaggle)"
)
NOT_HERE = {
    "uv run wandb sync wandb/offline-run-*": WANDB_ACCOUNT,
    "uv run wandb login": WANDB_ACCOUNT,
    "uv run attnpipe train digits --set tracking.wandb.mode=online": WANDB_ACCOUNT,
    "make demo": "this suite's `dvc repro` build is the demo with tiny settings",
    "make test": "this is make test",
    "make check": "runs this suite's tests that start no Ray, DVC or test hosts",
    "make format": "rewrites the working tree; `make lint`, its check, runs here",
    "ray up cluster/aws.yaml && ray dashboard cluster/aws.yaml &": CLUSTER,
    "uv run attnpipe submit digits --address http://127.0.0.1:8265": CLUSTER,
    "uv run attnpipe jobs list": CLUSTER,
    "uv run attnpipe submit cifar10 --stage tune --address http://127.0.0.1:8265": CLUSTER,
    "RAY_ADDRESS=HEAD:6379 uv run attnpipe tune cifar10": CLUSTER,
    "uv run dvc remote add -d storage s3://BUCKET/dvcstore": "a placeholder bucket; "
    "tests/cluster/test_dvc_remote.py runs these against the S3 test server",
    "uv run dvc remote modify storage endpointurl http://127.0.0.1:9000": "as above",
    "uv run dvc push": "as above",
    "uv run dvc pull": "as above",
    "uv run attnpipe predict -m models/cassava/model.pt data/cassava/raw/test_images "
    "--kaggle-submission --sample-submission data/cassava/raw/sample_submission.csv": DOWNLOAD
    + " (tests/evaluate/test_predict.py runs --kaggle-submission on the digits)",
    "uv run attnpipe run cassava": DOWNLOAD,
    "uv run attnpipe fetch imagenet": IMAGENET,
    "uv run attnpipe prepare imagenet": IMAGENET,
    "uv run attnpipe shard imagenet": IMAGENET,
    "uv run attnpipe submit imagenet --address http://127.0.0.1:8265": CLUSTER,
    "uv run attnpipe submit imagenet --address http://127.0.0.1:8265 --set train.epochs=90": CLUSTER
    + " (tests/cluster/test_submit.py submits with --set to a local head)",
    "uv run attnpipe pull imagenet": CLUSTER
    + " (tests/cluster/test_submit.py pulls a --no-wait job)",
    "uv run attnpipe plan imagenet --cluster cluster/aws.yaml": "run by tests/test_placement.py, "
    "which checks its 16 ranks against cluster/aws.yaml",
    "uv run attnpipe fetch cifar10": DOWNLOAD,
    "uv run dvc exp run -S 'params.yaml:pipelines=[cassava]'": DOWNLOAD,
    "uv run attnpipe tune cifar10": DOWNLOAD,
    "uv run attnpipe train cifar10 --overrides reports/cifar10/best_params.yaml": DOWNLOAD,
    "uv run dvc exp run -S pipelines/cifar10.yaml:train.optimizer.lr=0.042": DOWNLOAD,
}

# docs/testing.md: ways into this suite, which does not run itself.
SUITE = "runs this test suite, or a part of it"
NOT_HERE |= {
    "uv run pytest tests/train/test_loop.py": SUITE,
    'uv run pytest -m "ray and not netns"': SUITE,
    'uv run pytest -m "not (ray or dvc or netns)" -n 2': SUITE + " (make check)",
    'make test PYTEST_ADDOPTS="--durations=0" > test.log 2>&1 && uv run python -m tests.durations '
    "test.log": SUITE + "; tests/test_suite_tools.py checks the per-file report of tests.durations",
}
# README, "Your own images": they need a folder of your images.
# The README's "Your own images" block: tests/e2e/test_own_images.py runs it as written, on a
# generated folder of split folders standing for /path/to/images.
OWN_IMAGES_COMMANDS = (
    "uv run attnpipe init mine --from /path/to/images",
    "uv run attnpipe config show mine",
    "uv run attnpipe run mine",
    "uv run attnpipe prepare mine --set prepare.seed=1",
)
NOT_HERE |= dict.fromkeys(OWN_IMAGES_COMMANDS, "run by tests/e2e/test_own_images.py")
# Where the commands are shown: the README and every page under docs/.
PAGES = ("README.md", "docs/*.md")


def shown_pages() -> list[Path]:
    return [path for pattern in PAGES for path in sorted(REPO.glob(pattern))]


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            command = re.split(r"\s+#", line)[0].strip()
            if command and not command.startswith("#"):
                commands.append(" ".join(command.split()))
    return commands


def test_every_readme_command_is_run_or_excused():
    pages = shown_pages()
    assert REPO / "README.md" in pages and len(pages) > 1, pages
    shown = {command for page in pages for command in readme_commands(page.read_text())}
    planned = set(RUN_HERE) | set(RUN_IN_REPO) | set(BY_DVC_REPRO) | set(ELSEWHERE) | set(NOT_HERE)
    assert shown - planned == set(), "README/docs commands neither run here nor excused"
    assert planned - shown == set(), "commands no longer in README.md or docs/*.md"


def _as_written(command: str) -> list[str]:
    words = shlex.split(command)
    return words[2:] if words[:2] == ["uv", "run"] else words


def test_readme_commands_run_as_written(repro_project: ReproProject, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(repro_project.root, root, symlinks=True)
    run_in(root, "git", "add", "-A")
    run_in(root, "git", "commit", "-q", "-m", "built")
    _edit_model_code(root)
    # A wide terminal, so that tables (`dvc exp show`) keep their column names whole.
    wide = {"COLUMNS": "300"}
    # The edited model code is what the experiment runs (as it would be in a checkout); the
    # commands before it run the installed package, whose code the finished run was made by.
    edited = {**wide, "PYTHONPATH": str(root / "src")}
    outputs = {
        command: run_in(root, *_as_written(command), env=edited if command == EXPERIMENT else wide)
        for command in RUN_HERE
    }

    def output_of(part: str) -> str:
        return next(out for command, out in outputs.items() if part in command)

    assert "digit_0001.png" in output_of("attnpipe predict")
    trained = output_of("attnpipe train")
    assert "0.5" in trained and "best epoch" in trained
    exp_show = output_of("exp show")
    # The headline columns, and the training run's W&B run beside them.
    for column in ("best_epoch", "val_accuracy", "test_accuracy", "wandb_run"):
        assert column in exp_show, exp_show
    assert stages_run(outputs[EXPERIMENT]) == {"train@digits", "evaluate@digits", "export@digits"}
    history = (root / "reports/digits/train_history.csv").read_text().splitlines()
    assert len(history) == 1 + 1  # the experiment's one epoch, applied to the workspace
    _check_the_experiment_is_a_new_run_of_the_edited_code(root, outputs[EXPERIMENT])
    for command in RUN_IN_REPO:
        words = shlex.split(command)
        if words[:3] == ["uv", "run", "python"]:
            words = [sys.executable, *words[3:]]
        done = subprocess.run(words, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}:\n{(done.stdout + done.stderr)[-2000:]}"
        if "count_assertions" in command:
            assert "checks (assert statements and pytest.raises)" in done.stdout, done.stdout


def _edit_model_code(root: Path) -> None:
    """dvc.yaml's stages depend on the package modules they run: files under tests/ and docs/
    are no stage's dependency; an edit to a model's code makes the model stages stale, and
    only those."""
    for extra in ("tests/test_new.py", "docs/notes.md"):
        (root / extra).parent.mkdir(exist_ok=True)
        (root / extra).write_text("nothing any stage runs\n")
    assert "Data and pipelines are up to date." in run_in(root, "dvc", "status")
    with (root / "src/attnpipe/models/residual_attention.py").open("a") as handle:
        handle.write("\n# a change to a model's code\n")
    status = run_in(root, "dvc", "status")
    changed = {line.split(":")[0].strip() for line in status.splitlines() if line.endswith(":")}
    changed = {name for name in changed if "@" in name}
    assert changed == {"train@digits", "evaluate@digits", "export@digits"}, status


# The run name of digits at one epoch as the edited code (root/src) names it.
RUN_NAME_PROBE = """
import sys
from pathlib import Path
from attnpipe.config import apply_overrides, load_recipe
from attnpipe.paths import PipelinePaths
from attnpipe.runs import current_run_name
root = Path(sys.argv[1])
recipe = apply_overrides(load_recipe("digits", root), {"train.epochs": 1}, origin="probe")
print(current_run_name(recipe, PipelinePaths(root, "digits")))
"""


def _check_the_experiment_is_a_new_run_of_the_edited_code(root: Path, output: str) -> None:
    """The experiment trained a new run, not a resume of a stale one: its name holds the
    version of the edited code, which differs from the installed code's (this process's)."""
    assert "resuming" not in output, output[-2000:]
    trained = json.loads((root / "reports/digits/train.json").read_text())["run_name"]
    probe = [sys.executable, "-c", RUN_NAME_PROBE, str(root)]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    done = subprocess.run(probe, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    edited = done.stdout.strip()
    recipe = apply_overrides(load_recipe("digits", root), {"train.epochs": 1}, origin="test")
    installed = current_run_name(recipe, PipelinePaths(root, "digits"))
    assert trained == edited != installed, (trained, edited, installed)
    assert (root / "models/digits/checkpoints" / trained).is_dir()


def test_the_stage_commands_are_the_ones_dvc_repro_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for command in BY_DVC_REPRO:
        stage = _as_written(command)[1]
        assert stages[stage]["do"]["cmd"].split(" --")[0] == f"attnpipe {stage} ${{item}}"
    assert 'main(["models"])' in (REPO / "tests" / "test_cli_help.py").read_text()


def test_the_readme_parser_joins_continuations_and_drops_comments():
    text = "```bash\nuv run a \\\n    --b c   # note\n# only a comment\n\nmake x\n```\n"
    assert readme_commands(text) == ["uv run a --b c", "make x"]
    assert _as_written("uv run attnpipe train digits --set 'a=b c'") == [
        "attnpipe", "train", "digits", "--set", "a=b c",
    ]  # fmt: skip
