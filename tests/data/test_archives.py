"""Archives are extracted only inside the target: hostile members reject the whole archive."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from attnpipe.data.archives import UnsafeArchiveError, safe_extract_zip
from attnpipe.data.sources import FetchError


def _zip(path: Path, members: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # unix
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def test_plain_archive_is_extracted_with_folders_and_exclusions(tmp_path: Path):
    archive = _zip(
        tmp_path / "a.zip",
        [("train.csv", b"id\n"), ("train_images/x/1.jpg", b"1"), ("tfrec/a.tfrec", b"t")],
        symlinks={"train_images/latest.jpg": "x/1.jpg"},
    )
    target = tmp_path / "out"
    written, skipped = safe_extract_zip(archive, target, exclude=["tfrec/*"])
    assert sorted(written) == ["train.csv", "train_images/latest.jpg", "train_images/x/1.jpg"]
    assert skipped == 1 and not (target / "tfrec").exists()
    assert (target / "train_images/x/1.jpg").read_bytes() == b"1"
    assert (target / "train_images/latest.jpg").is_symlink()  # inside: kept as a link
    assert (target / "train_images/latest.jpg").read_bytes() == b"1"


@pytest.mark.parametrize(
    ("members", "symlinks", "reason"),
    [
        ([("../evil.txt", b"x")], None, "'..'"),
        ([("a/../../evil.txt", b"x")], None, "'..'"),
        ([("/tmp/evil.txt", b"x")], None, "absolute"),
        ([("C:\\evil.txt", b"x")], None, "absolute"),
        ([("a\\..\\..\\evil.txt", b"x")], None, "'..'"),
        ([], {"link": "../.."}, "symlink"),
        ([], {"link": "/etc"}, "symlink"),
        # A link that resolves inside its folder but leaves the target through `..`.
        ([], {"sub/link": "../../outside"}, "symlink"),
    ],
)
def test_hostile_members_reject_the_archive_before_writing(tmp_path, members, symlinks, reason):
    archive = _zip(tmp_path / "bad.zip", [("good.txt", b"ok"), *members], symlinks)
    target = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchiveError, match=reason):
        safe_extract_zip(archive, target)
    assert not (target / "good.txt").exists()  # nothing written, not even the good member
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.zip", "deep", "out"]


def test_a_file_written_through_an_earlier_link_is_refused(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "escape").symlink_to(outside)  # left behind by something else
    archive = _zip(tmp_path / "a.zip", [("escape/evil.txt", b"x")])
    with pytest.raises(UnsafeArchiveError, match="outside the target via a symlink"):
        safe_extract_zip(archive, target)
    assert list(outside.iterdir()) == []


def test_a_broken_zip_is_a_fetch_error(tmp_path: Path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(FetchError, match="not a valid zip"):
        safe_extract_zip(tmp_path / "broken.zip", tmp_path / "out")
