"""Test hosts on one machine: Linux network namespaces joined by one veth link.

Each host is a namespace with `lo` and one interface of the same name as every other host's
(as real nodes have, so a setting such as GLOO_SOCKET_IFNAME holds on every node), addressed
in a random 10.x.y.0/24 that exists only inside the namespaces. Names carry this process's
pid and a random tag, so that concurrent test runs on one machine never collide. Needs root
and iproute2's `ip`: without them `create_hosts` raises `NetnsUnavailable` saying so.

Only these hosts are ever addressed: the namespaces have no route anywhere else.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

IP_CANDIDATES = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
PREFIX = "attnpipe-t"  # namespace names: attnpipe-t<pid>-<tag>-<host index>
INTERFACE = "attn0"  # the one interface name every host has
COMMAND_TIMEOUT_S = 30
NETNS_DIR = Path("/run/netns")  # where `ip netns add` names a namespace
STALE_AFTER_S = 2 * 3600  # longer than any test run (their timeout is 20 minutes)


class NetnsUnavailable(RuntimeError):
    """This machine cannot make test hosts (no root, no `ip`, no namespace support)."""


def ip_binary() -> str:
    found = shutil.which("ip") or next((p for p in IP_CANDIDATES if os.access(p, os.X_OK)), None)
    if not found:
        raise NetnsUnavailable(
            "iproute2's `ip` is not installed (looked on PATH and in /usr/sbin, /sbin): "
            "install it (Debian/Ubuntu: apt-get install iproute2) to run the multi-host tests"
        )
    return found


def _ip(*args: str) -> str:
    done = subprocess.run(
        [ip_binary(), *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    if done.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    """One namespace: its name, its address on the shared link and the interface's name."""

    namespace: str
    address: str
    interface: str = INTERFACE

    def command(self, *argv: str) -> list[str]:
        """`argv` run inside this host (`ip netns exec` execs it: the pid is the command's)."""
        return [ip_binary(), "netns", "exec", self.namespace, *argv]

    def pids(self) -> list[int]:
        """Every live process in this host (zombies are not listed)."""
        done = subprocess.run(
            [ip_binary(), "netns", "pids", self.namespace],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        return [int(word) for word in done.stdout.split()] if done.returncode == 0 else []

    def kill_all(self, timeout: float = 30) -> list[int]:
        """SIGKILL every process of this host, again until none is left; the pids killed.

        Repeated because a dying parent (a raylet) may still be starting children.
        """
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {pids} in {self.namespace} survive SIGKILL")
            time.sleep(0.1)
        return killed


@dataclass
class Network:
    """Hosts on one link; `close()` kills their processes and removes them (idempotent)."""

    hosts: list[Host]
    subnet: str
    closed: bool = field(default=False)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        errors = []
        for host in self.hosts:
            try:
                host.kill_all()
            except (TimeoutError, OSError) as error:
                errors.append(str(error))
            # Deleting a namespace deletes its end of the veth pair, and with it the pair.
            subprocess.run(
                [ip_binary(), "netns", "delete", host.namespace],
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
            )
        if errors:
            raise RuntimeError("; ".join(errors))


def require_root() -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            "the multi-host tests make network namespaces, which needs root: run them as root "
            "(as `make test` does in CI), or in a container with CAP_SYS_ADMIN and CAP_NET_ADMIN"
        )


def missing_requirement() -> str | None:
    """Why this machine cannot make test hosts, or None: root and `ip`, checked without running
    anything (whether the kernel allows namespaces shows only when `create_hosts` tries)."""
    try:
        require_root()
        ip_binary()
    except NetnsUnavailable as missing:
        return str(missing)
    return None


def create_hosts(count: int = 2) -> Network:
    """Two hosts joined by a veth pair (a link has two ends; more would need a bridge)."""
    if count != 2:
        raise ValueError("one veth pair joins exactly two hosts")
    require_root()
    ip_binary()
    remove_stale_namespaces()
    tag = f"{os.getpid()}-{random.randrange(16**4):04x}"
    a, b = random.randrange(1, 255), random.randrange(0, 256)
    subnet = f"10.{a}.{b}.0/24"
    hosts = [Host(f"{PREFIX}{tag}-{i}", f"10.{a}.{b}.{i + 1}") for i in range(count)]
    network = Network(hosts, subnet)
    # Temporary names in the root namespace: short (15 characters at most) and unique.
    ends = [f"ap{tag.replace('-', '')[-9:]}{i}" for i in range(count)]
    try:
        for host in hosts:
            _ip("netns", "add", host.namespace)
        _ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        for host, end in zip(hosts, ends, strict=True):
            _ip("link", "set", end, "netns", host.namespace)
            _ip("-n", host.namespace, "link", "set", end, "name", host.interface)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
    except BaseException:
        for end in ends:  # still in the root namespace if moving it failed
            subprocess.run([ip_binary(), "link", "delete", end], capture_output=True)
        network.close()
        raise
    return network


def remove_stale_namespaces() -> None:
    """Delete test namespaces left by a run killed before its cleanup.

    Stale: its creating process is gone and it is older than any test run lasts (a run in
    another pid namespace, whose pid this one cannot see, is left alone while it may live).
    """
    try:
        listing = _ip("netns", "list")
    except NetnsUnavailable:
        return
    for line in listing.splitlines():
        match = re.match(rf"({re.escape(PREFIX)}(\d+)-\w+-\d+)", line)
        if not match or Path(f"/proc/{match.group(2)}").exists():
            continue
        try:
            age = time.time() - (NETNS_DIR / match.group(1)).stat().st_mtime
        except OSError:
            continue
        if age > STALE_AFTER_S:
            stale = Host(match.group(1), "")
            stale.kill_all()
            subprocess.run([ip_binary(), "netns", "delete", stale.namespace], capture_output=True)


def tcp_reachable(host: Host, address: str, port: int, timeout: float = 3) -> bool:
    """Whether a TCP connect from `host` to address:port gets an answer (accepted or refused)."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(float(sys.argv[3]))\n"
        "try: s.connect((sys.argv[1], int(sys.argv[2])))\n"
        "except ConnectionRefusedError: pass\n"
        "except OSError: sys.exit(1)\n"
    )
    done = subprocess.run(
        host.command(sys.executable, "-c", probe, address, str(port), str(timeout)),
        capture_output=True,
        timeout=timeout + COMMAND_TIMEOUT_S,
    )
    return done.returncode == 0
