"""A fake Kaggle API on 127.0.0.1 for the real `kaggle` client (no internet, no account).

The client (kaggle 2.2.4 / kagglesdk) sends `POST http://localhost/api/v1/<Service>/<Method>`
when `KAGGLE_API_ENVIRONMENT=LOCALHOST`; `HTTP_PROXY` pointing here makes those requests reach
this server, with the absolute URL in the request line. `HTTPS_PROXY` points here too, so a
request meant for the real api.kaggle.com would arrive as a CONNECT, which is refused and
recorded (tests assert there were none).

Endpoints (as in kagglesdk's services):
- `security.OAuthService/IntrospectToken` {"token"}: who owns an access token.
- `competitions.CompetitionApiService/DownloadDataFiles` {"competitionName"}: 302 to the zip.
- `datasets.DatasetApiService/DownloadDataset` {"ownerSlug", "datasetSlug"}: 302 to the zip.
Errors are Kaggle's JSON bodies {"code": N, "message": ...}, which the client raises as
`requests.HTTPError` with the response attached.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

RULES_MESSAGE = "You must accept this competition's rules before you'll be able to download files."
LAST_MODIFIED = "Tue, 01 Dec 2020 00:00:00 GMT"


@dataclass
class FakeKaggle:
    users: dict[str, str] = field(default_factory=lambda: {"alice": "alice-key"})
    tokens: dict[str, str] = field(default_factory=lambda: {"token-alice": "alice"})
    competitions: dict[str, bytes] = field(default_factory=dict)
    datasets: dict[str, bytes] = field(default_factory=dict)  # "owner/slug" -> zip
    rules_not_accepted: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # method, path, body
    connects: list[str] = field(default_factory=list)
    port: int = 0

    def calls(self, suffix: str) -> list[dict]:
        return [body for _, path, body in self.requests if path.endswith(suffix)]

    def downloads(self) -> list[str]:
        return [path for method, path, _ in self.requests if path.startswith("/files/")]

    # ------------------------------------------------------------------ serving
    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_CONNECT(self) -> None:
                fake.connects.append(self.path)
                self.send_error(405, "only plain-HTTP loopback requests are served here")

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                fake.requests.append(("GET", path, {}))
                kind, _, name = path.removeprefix("/files/").partition("/")
                store = {"competitions": fake.competitions, "datasets": fake.datasets}.get(kind)
                name = name.removesuffix(".zip")
                if store is None or name not in store:
                    return self._json(404, {"code": 404, "message": "Not found"})
                body = store[name]
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", LAST_MODIFIED)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                fake.requests.append(("POST", path, body))
                user = fake.user_of(self.headers.get("Authorization", ""))
                if user is None:
                    return self._json(401, {"code": 401, "message": "Unauthenticated"})
                service = path.removeprefix("/api/v1/")
                if service == "security.OAuthService/IntrospectToken":
                    return self._json(200, {"active": True, "username": user})
                if service == "competitions.CompetitionApiService/DownloadDataFiles":
                    name = body.get("competitionName", "")
                    if name not in fake.competitions:
                        return self._json(404, {"code": 404, "message": "Competition not found"})
                    if name in fake.rules_not_accepted:
                        return self._json(403, {"code": 403, "message": RULES_MESSAGE})
                    return self._redirect(f"/files/competitions/{name}.zip")
                if service == "datasets.DatasetApiService/DownloadDataset":
                    name = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
                    if name not in fake.datasets:
                        return self._json(404, {"code": 404, "message": "Dataset not found"})
                    return self._redirect(f"/files/datasets/{name}.zip")
                return self._json(404, {"code": 404, "message": f"no such method {service}"})

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _redirect(self, path: str) -> None:
                self.send_response(302)
                self.send_header("Location", f"http://localhost{path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def user_of(self, authorization: str) -> str | None:
        scheme, _, value = authorization.partition(" ")
        if scheme == "Bearer":
            return self.tokens.get(value)
        if scheme == "Basic":
            try:
                username, _, key = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return None
            return username if self.users.get(username) == key else None
        return None


def point_client_at(server: FakeKaggle, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send the real client to `server`, with a throwaway home folder and no credentials."""
    (home / ".kaggle").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")  # http://localhost/api/v1/...
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = f"http://127.0.0.1:{server.port}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy)
