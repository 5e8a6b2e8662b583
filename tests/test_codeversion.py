"""Each stage depends on the code it runs: dvc.yaml lists it, run identities include it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from attnpipe import codeversion
from attnpipe.codeversion import STAGE_ENTRIES, code_version, dvc_code_deps, stage_modules

REPO = Path(__file__).resolve().parents[1]


def _dvc_code(stage: str) -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = stages[stage]["do"]["deps"]
    return [d for d in deps if d.startswith("src/") or d == "uv.lock"]


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES))
def test_dvc_yaml_lists_exactly_the_code_each_stage_runs(stage):
    assert _dvc_code(stage) == dvc_code_deps(stage), (
        f"dvc.yaml's {stage} code deps are out of date: `python -m attnpipe.codeversion --write "
        "dvc.yaml`"
    )


def test_data_stages_do_not_depend_on_models_or_training():
    for stage in ("fetch", "prepare", "shard"):
        parts = {path.parts[0] for path in stage_modules(stage)}
        assert not parts & {"models", "train", "evaluate"}, (stage, sorted(parts))
    train = {path.as_posix() for path in stage_modules("train")}
    assert "models/residual_attention.py" in train and "data/prepare.py" not in train
    evaluate = {path.as_posix() for path in stage_modules("evaluate")}
    assert not any(path.startswith("train/") for path in evaluate)


def _package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "src" / "attnpipe"
    shutil.copytree(codeversion.package_root(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "uv.lock", tmp_path / "uv.lock")
    monkeypatch.setattr(codeversion, "package_root", lambda: copy)
    stage_modules.cache_clear()
    return copy


def test_code_version_follows_the_stages_own_modules(tmp_path, monkeypatch):
    copy = _package_copy(tmp_path, monkeypatch)
    before = {stage: code_version(stage) for stage in STAGE_ENTRIES}
    with (copy / "models" / "residual_attention.py").open("a") as handle:
        handle.write("\n# a change to a model\n")
    after = {stage: code_version(stage) for stage in STAGE_ENTRIES}
    changed = {stage for stage in STAGE_ENTRIES if before[stage] != after[stage]}
    assert changed == {"train", "tune", "evaluate", "export"}
    (tmp_path / "uv.lock").write_text("a different lock\n")
    assert all(code_version(stage) != after[stage] for stage in STAGE_ENTRIES)
    stage_modules.cache_clear()


def test_write_brings_a_stale_dvc_yaml_up_to_date():
    from attnpipe.codeversion import rewrite_dvc_yaml

    current = (REPO / "dvc.yaml").read_text()
    stale = current.replace("        - src/attnpipe/train/loop.py\n", "", 1)
    assert stale != current
    assert rewrite_dvc_yaml(stale) == rewrite_dvc_yaml(current)
