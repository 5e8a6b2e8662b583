"""The check that skips the `netns` tests on a machine without root or `ip` (tests/conftest.py)
instead of failing them. Runs nothing: the check only looks."""

from __future__ import annotations

import os
import shutil

import pytest

from tests import conftest, netns


@pytest.fixture
def root_with_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/sbin/ip" if name == "ip" else None)


def test_root_and_ip_are_all_it_asks_for(root_with_ip):
    assert netns.missing_requirement() is None


def test_without_root_the_reason_says_root(root_with_ip, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in netns.missing_requirement()


def test_without_ip_the_reason_says_how_to_install_it(root_with_ip, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(netns, "IP_CANDIDATES", ())
    assert "apt-get install iproute2" in netns.missing_requirement()


class _Item:
    """What the hook reads of a test item: its markers."""

    def __init__(self, *markers: str) -> None:
        self.markers = markers

    def get_closest_marker(self, name: str):
        return pytest.mark.netns if name in self.markers else None


def test_a_netns_test_is_skipped_with_the_reason_and_others_are_left_alone(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match=r"needs root and `ip`.*needs root"):
        conftest.pytest_runtest_setup(_Item("netns"))
    conftest.pytest_runtest_setup(_Item("ray"))  # not a test-host test: runs
