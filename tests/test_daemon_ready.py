"""Readiness: /readyz is true only while the daemon is restored, in contact with Kafka, and its loop turns."""

from __future__ import annotations

import logging
import time

import pytest

from consumers.base import SinkError, SinkTimeout
from consumers.memory import IterSource, ListSink
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


class Blocked(ListSink):
    """A sink whose brokers are away for its next `waits` sends' limits."""

    waits = 0

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> None:
        while self.waits:
            self.waits -= 1
            assert self.on_blocked is not None
            self.on_blocked(SinkTimeout("no metadata for the topic"))
        super().send(topic, key, value, headers, partition)


def test_a_send_waiting_for_kafka_is_not_ready_waits_and_gives_up_only_when_stopping(
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config({})
    daemon = Daemon(cfg, Pipeline(cfg, random_artifact()))
    daemon._generation = 0
    daemon.ready.set()
    sink = Blocked()
    sink.on_blocked = daemon._send_blocked
    caplog.set_level(logging.INFO, logger="detector.daemon")
    sink.waits = 3
    sink.send("alerts", b"m1", b"{}")
    assert not daemon.is_ready() and caplog.text.count("Kafka does not take alerts and checkpoints") == 1
    assert len(sink.pending) == 1, "the record is queued once the brokers take it"
    daemon._flush(sink)
    assert daemon.is_ready() and "Kafka acknowledged again; ready" in caplog.text
    assert len(sink.records) == 1
    daemon.stop_event.set()
    sink.waits = 1
    with pytest.raises(SinkError, match="stopping while Kafka does not take records"):
        sink.send("alerts", b"m1", b"{}")
