"""Readiness: /readyz is true only while the daemon is restored, in contact with Kafka, and its loop turns."""

from __future__ import annotations

import logging
import time

import pytest

from consumers.memory import IterSource
from detector.config import parse_config
from detector.daemon import Daemon
from detector.pipeline import Pipeline
from tests.helpers import random_artifact


class Unreachable(IterSource):
    """A source whose coordinator stopped answering."""

    up = True

    def connected(self) -> bool:
        return self.up


def test_ready_follows_contact_and_a_stuck_loop(caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config({"input": {"session_timeout_ms": 6000}})
    daemon = Daemon(cfg, Pipeline(cfg, random_artifact()))
    src = Unreachable([])
    assert not daemon.is_ready(), "not ready before the first assignment is restored"
    daemon._generation = 0
    daemon.ready.set()
    assert daemon.is_ready()
    caplog.set_level(logging.INFO, logger="detector.daemon")
    src.up = False
    daemon._check_contact(src)
    assert not daemon.is_ready() and "lost contact with Kafka" in caplog.text
    daemon._contact_checked = 0.0
    src.up = True
    daemon._check_contact(src)
    assert daemon.is_ready() and "in contact with Kafka again; ready" in caplog.text
    daemon.beat = time.monotonic() - daemon.stall_s - 1  # the loop has not turned for longer than a session
    assert not daemon.is_ready()
