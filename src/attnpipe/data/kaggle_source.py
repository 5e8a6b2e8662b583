"""Kaggle competitions and datasets through the official `kaggle` client (2.2.x, kagglesdk).

Traps this module works around (see docs/architecture.md):
- `import kaggle` authenticates at import time and, without credentials, prints a long help
  text and exits (the exit is swallowed). So credentials are checked here first and the
  client is imported only then, with its chatter captured.
- The client decides its config folder and its API host (`KAGGLE_API_ENVIRONMENT`) once, at
  import. A fresh `KaggleApi` object is built per fetch with both re-read from the current
  environment, so a process whose environment changed gets what it asks for.
- Errors come back as `requests.HTTPError`; they are turned into one-line `FetchError`s that
  say what to do (401: credentials; 403: accept the competition's rules; 404: the name).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from attnpipe.config import KaggleCompetitionSource, KaggleDatasetSource
from attnpipe.data.sources import DOWNLOAD_DIR_NAME, FetchError

CREDENTIALS_HELP = (
    "set KAGGLE_API_TOKEN (an API token from https://www.kaggle.com/settings, or the path of a "
    "file holding it), or KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json (from 'Create "
    "Legacy API Key') in ~/.kaggle/kaggle.json with mode 600"
)


class KaggleError(FetchError):
    """Kaggle refused or could not serve the download."""


@dataclass(frozen=True)
class Credentials:
    kind: str  # "token" | "legacy" | "oauth"
    origin: str  # where they were found, for messages


def config_dir() -> Path:
    """The client's config folder: KAGGLE_CONFIG_DIR, else ~/.kaggle, else ~/.config/kaggle."""
    explicit = os.environ.get("KAGGLE_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    home = Path(os.path.expanduser("~")) / ".kaggle"
    if sys.platform.startswith("linux") and not home.exists():
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return Path(xdg) / "kaggle"
    return home


def find_credentials() -> Credentials | None:
    """Credentials in the client's order, without importing it; None when there are none."""
    token = os.environ.get("KAGGLE_API_TOKEN")
    if token:
        if Path(token).exists() and not Path(token).read_text().strip():
            raise KaggleError(f"KAGGLE_API_TOKEN names the file {token}, which is empty")
        return Credentials("token", "KAGGLE_API_TOKEN")
    home = Path(os.path.expanduser("~")) / ".kaggle"
    for name in ("access_token", "access_token.txt"):
        path = home / name
        if path.is_file() and path.read_text().strip():
            return Credentials("token", str(path))
    values: dict[str, str] = {}
    json_path = config_dir() / "kaggle.json"
    if json_path.is_file():
        warn_if_readable_by_others(json_path)
        try:
            loaded = json.loads(json_path.read_text() or "{}")
        except ValueError as error:
            raise KaggleError(
                f"{json_path} is not valid JSON ({error}); {CREDENTIALS_HELP}"
            ) from None
        if isinstance(loaded, dict):
            values.update({k: str(v) for k, v in loaded.items() if k in ("username", "key")})
    for key in ("username", "key"):
        if os.environ.get(f"KAGGLE_{key.upper()}"):
            values[key] = os.environ[f"KAGGLE_{key.upper()}"]
    if values.get("username") and values.get("key"):
        from_env = os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
        return Credentials("legacy", "KAGGLE_USERNAME/KAGGLE_KEY" if from_env else str(json_path))
    oauth = home / "credentials.json"
    if oauth.is_file():
        return Credentials("oauth", str(oauth))
    return None


def warn_if_readable_by_others(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(
            f"attnpipe: warning: {path} (your Kaggle API key) is readable by other users; "
            f"run: chmod 600 {path}",
            file=sys.stderr,
        )


def _new_api():
    """Import the client (quietly) and build a `KaggleApi` for the current environment."""
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    folder = config_dir()
    api.config_dir = str(folder)
    api.config = str(folder / "kaggle.json")
    api.args = ["--local"] if os.environ.get("KAGGLE_API_ENVIRONMENT") == "LOCALHOST" else []
    return api


def authenticate() -> tuple[object, Credentials]:
    credentials = find_credentials()
    if credentials is None:
        raise KaggleError(f"no Kaggle credentials found: {CREDENTIALS_HELP}")
    from requests import RequestException

    api = _new_api()
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            api.authenticate()
    except SystemExit:
        raise KaggleError(
            f"Kaggle did not accept the credentials from {credentials.origin} (invalid or "
            f"expired token); create a new one at https://www.kaggle.com/settings"
        ) from None
    except RequestException as error:
        raise _translate(error, credentials, what="the Kaggle API") from None
    return api, credentials


def fetch_kaggle(
    source: KaggleCompetitionSource | KaggleDatasetSource,
    raw_dir: Path,
    progress: bool = True,
    root: Path | None = None,
) -> None:
    """Download the competition's or dataset's zip and extract it safely into `raw_dir`."""
    from requests import RequestException

    from attnpipe.data.archives import safe_extract_zip

    api, credentials = authenticate()
    download = raw_dir / DOWNLOAD_DIR_NAME
    download.mkdir(parents=True, exist_ok=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(sys.stderr if progress else chatter):
            if isinstance(source, KaggleCompetitionSource):
                what = f"competition '{source.competition}'"
                api.competition_download_files(
                    source.competition, path=str(download), quiet=not progress
                )
            else:
                what = f"dataset '{source.dataset}'"
                api.dataset_download_files(
                    source.dataset, path=str(download), quiet=not progress, unzip=False
                )
    except RequestException as error:
        raise _translate(error, credentials, what=what, source=source) from None
    # Named after the download URL's extension, normally .zip: trust the content instead.
    archives = sorted(p for p in download.iterdir() if p.is_file() and zipfile.is_zipfile(p))
    if not archives:
        raise KaggleError(f"Kaggle sent no zip archive for {what} (got: {_listing(download)})")
    for archive in archives:
        safe_extract_zip(archive, raw_dir, exclude=source.exclude, include=source.include)
    shutil.rmtree(download)


def _translate(error, credentials: Credentials, what: str, source=None) -> KaggleError:
    from requests import HTTPError

    if not isinstance(error, HTTPError) or error.response is None:
        return KaggleError(f"cannot reach Kaggle for {what}: {type(error).__name__}: {error}")
    status = error.response.status_code
    if status == 401:
        return KaggleError(
            f"Kaggle rejected the credentials from {credentials.origin} (HTTP 401 Unauthorized): "
            f"check the username and key or token, or create new ones at "
            f"https://www.kaggle.com/settings"
        )
    if status == 403 and isinstance(source, KaggleCompetitionSource):
        return KaggleError(
            f"Kaggle refused the download of {what} (HTTP 403): the account of "
            f"{credentials.origin} must accept the competition's rules first at "
            f"https://www.kaggle.com/competitions/{source.competition}/rules, then run fetch again"
        )
    if status == 403:
        return KaggleError(
            f"Kaggle refused access to {what} (HTTP 403): the dataset is private or needs its "
            f"terms accepted at https://www.kaggle.com/datasets/{getattr(source, 'dataset', '')}"
        )
    if status == 404:
        return KaggleError(f"Kaggle has no {what} (HTTP 404): check the name in the recipe")
    detail = str(error).splitlines()[0] if str(error) else error.response.reason
    return KaggleError(f"Kaggle download of {what} failed (HTTP {status}): {detail}")


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names) or "nothing"
