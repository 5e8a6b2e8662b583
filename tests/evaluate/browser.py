"""Headless Chromium for tests, driven over the DevTools protocol on a pipe (no extra packages).

`find_or_install_chromium()` finds a Chromium, or installs Debian's `chromium` with apt-get
when running as root (once per session); `open_page(binary, url)` loads a page and returns
what a person would see in the DevTools console and network panel, plus values read from the
page with JavaScript.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The flags that work in this project's containers (no sandbox as root, no GPU, no network).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def find_or_install_chromium() -> tuple[str | None, str]:
    """(path, why not): tries `apt-get install -y chromium` once when root and apt exist."""
    found = find_chromium()
    if found:
        return found, ""
    if os.name != "posix" or os.geteuid() != 0:
        return None, "no Chromium installed, and not root to apt-get install it"
    if not shutil.which("apt-get"):
        return None, "no Chromium installed, and no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"no Chromium: `{' '.join(command)}` failed ({error})"
        log.append((done.stdout + done.stderr)[-300:])
        if done.returncode != 0 and command[1] == "install":
            return None, f"no Chromium: apt-get install chromium failed: {' '.join(log)[-400:]}"
    found = find_chromium()
    return (found, "") if found else (None, "apt-get ran but no chromium binary appeared")


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)  # console.error/assert, exceptions
    console_warnings: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)  # browser log: failed loads, CSP...
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    failed_requests: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)  # expression -> result

    @property
    def errors(self) -> list[str]:
        return self.console_errors + self.log_errors + self.failed_requests


class _Pipe:
    """Chrome's --remote-debugging-pipe: it reads commands on fd 3 and answers on fd 4,
    JSON messages separated by NUL bytes."""

    def __init__(self, binary: str, user_dir: str, window: tuple[int, int]):
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: our pipe ends become fds 3 and 4
            read_end, write_end = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={user_dir}",
                f"--window-size={window[0]},{window[1]}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds,  # runs in the child between fork and exec
            pass_fds=(3, 4),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.write_fd, self.read_fd = to_chrome_w, from_chrome_r
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline)
            self.events.append(message)
            if message.get("method") == event:
                return message

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read(deadline))
        except TimeoutError:
            pass

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from Chromium in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, RuntimeError, TimeoutError):
            self.call("Browser.close")
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.write_fd)
        os.close(self.read_fd)


def open_page(
    binary: str,
    url: str,
    expressions: dict[str, str] | None = None,
    window: tuple[int, int] = (1280, 2000),
) -> PageReport:
    """Load `url` in a fresh headless Chromium; collect console output, log errors and requests,
    then evaluate each JavaScript expression of `expressions` (name -> expression)."""
    report = PageReport()
    with tempfile.TemporaryDirectory() as user_dir:
        pipe = _Pipe(binary, user_dir, window)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Runtime", "Log", "Network", "Page"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Page.navigate", {"url": url}, session=session)
            pipe.wait_for("Page.loadEventFired")
            pipe.drain(0.5)  # late console messages and failed loads
            for name, expression in (expressions or {}).items():
                result = pipe.call(
                    "Runtime.evaluate",
                    {"expression": expression, "returnByValue": True},
                    session=session,
                )
                if "exceptionDetails" in result:
                    raise RuntimeError(f"{name}: {result['exceptionDetails']}")
                report.values[name] = result["result"].get("value")
        finally:
            pipe.close()
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            if params["type"] in ("error", "assert"):
                report.console_errors.append(text)
            elif params["type"] == "warning":
                report.console_warnings.append(text)
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            report.console_errors.append(
                details.get("exception", {}).get("description") or details.get("text", "")
            )
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            report.log_errors.append(f"{entry['text']} ({entry.get('url', '')})")
        elif method == "Network.requestWillBeSent":
            report.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            report.failed_requests.append(params.get("errorText", "failed request"))
    return report
