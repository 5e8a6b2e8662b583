"""The real `kaggle` client against a fake Kaggle API on loopback: downloads and every refusal."""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from attnpipe.cli import main
from attnpipe.config import load_recipe, parse_recipe
from attnpipe.data.kaggle_source import KaggleError
from attnpipe.data.layouts import read_layout
from attnpipe.data.sources import MARKER_NAME, fetch
from tests.conftest import write_project
from tests.data.fake_kaggle import FakeKaggle, point_client_at

CASSAVA = "cassava-leaf-disease-classification"
MELANOMA = "shonenkov/melanoma-merged-external-data-512x512-jpeg"
MELANOMA_DIR = "512x512-dataset-melanoma/512x512-dataset-melanoma"
CASSAVA_CLASSES = {
    "0": "Cassava Bacterial Blight (CBB)",
    "1": "Cassava Brown Streak Disease (CBSD)",
    "2": "Cassava Green Mottle (CGM)",
    "3": "Cassava Mosaic Disease (CMD)",
    "4": "Healthy",
}
# Ten per class: the cassava recipe's 0.8/0.1/0.1 gives each class a validation and a test image
# (prepare refuses a split that comes out empty).
CASSAVA_IMAGES = 50


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def cassava_zip() -> bytes:
    files = {
        "label_num_to_disease_map.json": json.dumps(CASSAVA_CLASSES).encode(),
        "sample_submission.csv": b"image_id,label\n2216849948.jpg,4\n",
        "test_images/2216849948.jpg": _jpeg((0, 0, 0)),
        "train_tfrecords/ld_train00-1338.tfrec": b"\0" * 64,
    }
    rows = ["image_id,label"]
    for i in range(CASSAVA_IMAGES):
        image_id = f"{1000 + i}.jpg"
        rows.append(f"{image_id},{i % 5}")
        files[f"train_images/{image_id}"] = _jpeg((i * 5, 100, 200 - i * 3))  # no duplicates
    files["train.csv"] = ("\n".join(rows) + "\n").encode()
    return _zip(files)


def melanoma_zip() -> bytes:
    rows = ["image_id,patient_id,target,source,sex,age_approx,anatom_site_general_challenge"]
    files: dict[str, bytes] = {}
    for i in range(8):
        image_id = f"ISIC_{i:07d}"
        rows.append(f"{image_id},IP_{i // 2},{int(i == 3)},ISIC20,male,45.0,torso")
        files[f"{MELANOMA_DIR}/{image_id}.jpg"] = _jpeg((i * 30, 50, 50))
    files["marking.csv"] = ("\n".join(rows) + "\n").encode()
    files["folds.csv"] = b"image_id,fold\n"
    files["512x512-test/512x512-test/ISIC_9999999.jpg"] = _jpeg((1, 2, 3))
    return _zip(files)


@pytest.fixture
def kaggle_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fake Kaggle on 127.0.0.1 that the real client reaches, and a throwaway home folder."""
    server = FakeKaggle(competitions={CASSAVA: cassava_zip()}, datasets={MELANOMA: melanoma_zip()})
    server.start()
    point_client_at(server, tmp_path / "home", monkeypatch)
    yield server
    server.stop()
    assert server.connects == []  # nothing tried to leave for the real Kaggle


def _recipe(source: dict):
    return parse_recipe({"source": source, "model": {"name": "resnet50"}}, name="t")


def _competition():
    return _recipe(
        {"kind": "kaggle-competition", "competition": CASSAVA, "exclude": ["train_tfrecords/*"]}
    )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _use_legacy_key(monkeypatch, key: str = "alice-key") -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", key)


def test_competition_download_extracts_and_a_rerun_downloads_nothing(
    kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch
):
    _use_legacy_key(monkeypatch)
    raw = tmp_path / "raw"
    fetch(_competition(), raw, progress=False)

    assert kaggle_env.calls("DownloadDataFiles") == [{"competitionName": CASSAVA}]
    assert kaggle_env.downloads() == [f"/files/competitions/{CASSAVA}.zip"]
    assert not (raw / "train_tfrecords").exists()  # excluded
    assert not (raw / ".download").exists()  # the zip is gone once extracted
    index = read_layout(_competition(), raw)
    assert len(index.records) == CASSAVA_IMAGES and all(r.path.is_file() for r in index.records)
    assert index.class_names[4] == "Healthy" and index.label_values == ["0", "1", "2", "3", "4"]
    marker = json.loads((raw / MARKER_NAME).read_text())
    assert marker["source"]["competition"] == CASSAVA and marker["files"] == CASSAVA_IMAGES + 4

    seen = len(kaggle_env.requests)
    fetch(_competition(), raw, progress=False)
    assert len(kaggle_env.requests) == seen  # already there: no request at all

    (raw / "train_images" / "1003.jpg").unlink()  # damaged copy: fetched again
    fetch(_competition(), raw, progress=False)
    assert (raw / "train_images" / "1003.jpg").is_file()
    assert len(kaggle_env.downloads()) == 2


def test_dataset_download_with_an_access_token_reads_as_melanoma(
    kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token-alice")
    recipe = _recipe({"kind": "kaggle-dataset", "dataset": MELANOMA})
    raw = tmp_path / "raw"
    fetch(recipe, raw, progress=False)

    assert kaggle_env.calls("IntrospectToken")  # the client checked the token first
    owner, slug = MELANOMA.split("/")
    assert kaggle_env.calls("DownloadDataset") == [{"ownerSlug": owner, "datasetSlug": slug}]
    index = read_layout(recipe, raw)
    assert len(index.records) == 8
    assert index.class_names == ["benign", "melanoma"]
    assert {r.group for r in index.records} == {"IP_0", "IP_1", "IP_2", "IP_3"}
    assert all(r.path.is_file() and MELANOMA_DIR in r.path.as_posix() for r in index.records)


def test_kaggle_json_is_used_and_a_loose_mode_is_warned_about(
    kaggle_env: FakeKaggle, tmp_path: Path, capsys
):
    config = Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json"
    config.write_text(json.dumps({"username": "alice", "key": "alice-key"}))
    config.chmod(0o644)
    fetch(_competition(), tmp_path / "raw", progress=False)
    err = capsys.readouterr().err
    assert "readable by other users" in err and f"chmod 600 {config}" in err
    assert (tmp_path / "raw" / "train.csv").is_file()

    config.chmod(0o600)
    fetch(_competition(), tmp_path / "raw2", progress=False)
    assert "readable by other users" not in capsys.readouterr().err


def test_missing_credentials_name_every_way_to_give_them(kaggle_env: FakeKaggle, tmp_path: Path):
    with pytest.raises(KaggleError) as caught:
        fetch(_competition(), tmp_path / "raw", progress=False)
    message = str(caught.value)
    for needle in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "~/.kaggle/kaggle.json"):
        assert needle in message
    assert "\n" not in message
    assert kaggle_env.requests == []  # refused before the client was even asked


def test_wrong_key_is_a_401_message(kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch):
    _use_legacy_key(monkeypatch, key="stale-key")
    with pytest.raises(KaggleError, match=r"rejected the credentials .*HTTP 401") as caught:
        fetch(_competition(), tmp_path / "raw", progress=False)
    assert "KAGGLE_USERNAME/KAGGLE_KEY" in str(caught.value)
    assert kaggle_env.downloads() == []


def test_invalid_token_is_a_401_message(kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token-of-nobody")
    recipe = _recipe({"kind": "kaggle-dataset", "dataset": MELANOMA})
    with pytest.raises(KaggleError, match=r"KAGGLE_API_TOKEN .*HTTP 401"):
        fetch(recipe, tmp_path / "raw", progress=False)
    assert kaggle_env.downloads() == []


def test_rules_not_accepted_points_at_the_rules_page(
    kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch
):
    kaggle_env.rules_not_accepted.add(CASSAVA)
    _use_legacy_key(monkeypatch)
    with pytest.raises(KaggleError) as caught:
        fetch(_competition(), tmp_path / "raw", progress=False)
    message = str(caught.value)
    assert f"https://www.kaggle.com/competitions/{CASSAVA}/rules" in message
    assert "HTTP 403" in message and "accept" in message
    assert kaggle_env.downloads() == []


def test_unknown_dataset_is_a_404_message(kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch):
    _use_legacy_key(monkeypatch)
    recipe = _recipe({"kind": "kaggle-dataset", "dataset": "someone/nothing-here"})
    with pytest.raises(KaggleError, match=r"no dataset 'someone/nothing-here' \(HTTP 404\)"):
        fetch(recipe, tmp_path / "raw", progress=False)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda mp, fake: None, "KAGGLE_API_TOKEN"),
        (
            lambda mp, fake: (
                mp.setenv("KAGGLE_USERNAME", "alice"),
                mp.setenv("KAGGLE_KEY", "alice-key"),
                fake.rules_not_accepted.add(CASSAVA),
            ),
            f"https://www.kaggle.com/competitions/{CASSAVA}/rules",
        ),
    ],
    ids=["missing-credentials", "rules-not-accepted"],
)
def test_cli_prints_kaggle_errors_as_one_line(
    kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch, capsys, setup, expected
):
    setup(monkeypatch, kaggle_env)
    root = write_project(_mkdir(tmp_path / "project"))
    assert load_recipe("cassava", root).source.competition == CASSAVA
    code = main(["--root", str(root), "fetch", "cassava", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnpipe: error:")
    assert expected in lines[0]
    assert "Authentication required" not in captured.out + captured.err  # the client's help


def test_cassava_recipe_end_to_end_through_prepare(
    kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch
):
    """The repository's cassava recipe: fetch through the client, then prepare its layout."""
    _use_legacy_key(monkeypatch)
    root = write_project(_mkdir(tmp_path / "project"))
    assert main(["--root", str(root), "fetch", "cassava", "--no-progress"]) == 0
    assert main(["--root", str(root), "prepare", "cassava", "--no-progress"]) == 0
    with (root / "data/cassava/rejected.csv").open() as handle:
        assert list(csv.DictReader(handle)) == []
    classes = json.loads((root / "data/cassava/classes.json").read_text())["classes"]
    assert classes[3] == "Cassava Mosaic Disease (CMD)"


def test_a_download_that_is_not_a_zip_is_reported(
    kaggle_env: FakeKaggle, tmp_path: Path, monkeypatch
):
    kaggle_env.competitions[CASSAVA] = b"<html>maintenance</html>"
    _use_legacy_key(monkeypatch)
    with pytest.raises(KaggleError, match=r"sent no zip archive .*\(got: "):
        fetch(_competition(), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw" / MARKER_NAME).exists()
