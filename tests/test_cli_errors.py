"""Every expected failure is one line on stderr, `attnpipe: error: ...`, and a non-zero exit.

A table of bad inputs a user will meet: wrong recipe values, an unknown model or model
argument, a stage run before its inputs exist, unreadable files for predict, a malformed
`--set`, an unreachable cluster. None may end in a traceback; `--debug` shows one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from attnpipe.cli import main
from attnpipe.config import load_recipe
from attnpipe.modelfile import Provenance, write_model_file
from attnpipe.models import create_model
from tests.conftest import write_project


def _edit_recipe(root: Path, section: str, key: str, value) -> None:
    path = root / "pipelines" / "digits.yaml"
    data = yaml.safe_load(path.read_text())
    data.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(data))


def _tiny_model_file(root: Path) -> Path:
    recipe = load_recipe("digits", root)
    path = root / "tiny.pt"  # not models/digits/model.pt: evaluate must find no model
    model = create_model("attention56_cifar", 10, width_multiplier=0.25)
    classes = [str(i) for i in range(10)]
    write_model_file(path, recipe, model.state_dict(), classes, Provenance(1, {}, "g", "d", "r"))
    return path


def _files(root: Path) -> None:
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 half a zip")


CASES = {
    # name: (recipe edit or None, argv, a fragment of the one line)
    "bad recipe value": (("train", "batch_size", 0), ["prepare", "digits"], "'train.batch_size'"),
    "unknown model": (("model", "name", "attention57"), ["fetch", "digits"], "unknown model"),
    "unknown model kwarg": (
        None,
        ["train", "digits", "--set", "model.kwargs={widht_multiplier: 0.5}"],
        "unknown key 'model.kwargs.widht_multiplier'",
    ),
    "imagenet for a model without it": (
        None,
        ["evaluate", "digits", "--set", "model.pretrained=imagenet"],
        "'model.pretrained'",
    ),
    "--set without a value": (None, ["train", "digits", "--set", "train.epochs"], "KEY=VALUE"),
    "--set of an unknown key": (
        None,
        ["evaluate", "digits", "--set", "train.epoch=3"],
        "unknown key 'train.epoch'",
    ),
    "--set of a bad value": (None, ["train", "digits", "--set", "train.epochs=-1"], "epochs"),
    "unknown pipeline": (None, ["train", "digitz"], "unknown pipeline 'digitz'"),
    "prepare before fetch": (None, ["prepare", "digits"], "raw"),
    "shard before prepare": (None, ["shard", "digits"], "run `attnpipe prepare` first"),
    "train before shard": (None, ["train", "digits"], "attnpipe shard digits"),
    "evaluate before train": (None, ["evaluate", "digits"], "run `attnpipe train` first"),
    "export before train": (None, ["export", "digits"], "run `attnpipe train` first"),
    "tune without a search space": (None, ["tune", "digits"], "no tune.space"),
    "unreachable cluster": (
        None,
        ["prepare", "digits", "--address", "127.0.0.1:1"],
        "cannot reach the Ray cluster at 127.0.0.1:1",
    ),
    "malformed cluster address": (
        None,
        ["shard", "digits", "--address", "head-without-port"],
        "not HOST:PORT",
    ),
    "predict an unreadable image": (
        None,
        ["predict", "bad.png", "-m", "tiny.pt"],
        "1 of 1 file(s) could not be predicted: bad.png",
    ),
    "predict with a corrupt model file": (
        None,
        ["predict", "bad.png", "-m", "corrupt.pt"],
        "corrupt.pt is not a readable model file",
    ),
    "predict with no model file": (
        None,
        ["predict", "bad.png", "-m", "models/none.pt"],
        "models/none.pt",
    ),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_project(tmp_path_factory.mktemp("errors"))
    _tiny_model_file(root)
    _files(root)
    return root


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_a_failure(name, project, tmp_path, capsys, monkeypatch):
    edit, argv, fragment = CASES[name]
    root = project
    if edit is not None:
        root = tmp_path / "project"
        shutil.copytree(project, root, ignore=shutil.ignore_patterns("src", "uv.lock"))
        _edit_recipe(root, *edit)
    monkeypatch.chdir(root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["--root", str(root), *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert len(lines) == 1, err
    assert lines[0].startswith("attnpipe: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(project, capsys):
    with pytest.raises(Exception, match="unknown pipeline"):
        main(["--root", str(project), "--debug", "train", "digitz"])


def test_the_installed_command_prints_the_same_one_line(project):
    """The real entry point, in its own process: what a user's shell shows."""
    done = subprocess.run(
        [sys.executable, "-m", "attnpipe.cli", "--root", str(project), "evaluate", "digits"],
        capture_output=True,
        text=True,
        cwd=project,
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        f"attnpipe: error: {project.resolve()}/models/digits/model.pt is missing: "
        "run `attnpipe train` first"
    )


def test_a_file_that_is_not_a_model_file_is_one_line(project, tmp_path, capsys):
    """A readable torch file that attnpipe did not write: named, not a KeyError."""
    other = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    code = main(["--root", str(project), "predict", str(project / "bad.png"), "-m", str(other)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "weights.pt is not a model file written by attnpipe" in line
