"""The hand-over on revocation, as pure logic (the real-Kafka test is in tests/test_reliability_kafka.py)."""

from __future__ import annotations

import pytest

from consumers.base import SinkFenced
from consumers.memory import IterSource, ListSink
from detector.config import parse_config
from detector.daemon import Daemon
from detector.pipeline import Pipeline
from tests.helpers import random_artifact, record, sine_values


def _records(n: int) -> list:
    v = sine_values(n, seed=1)
    return [record({"stream": "pump-1", "ts": 1_700_000_000 + 60 * i,
                    "values": dict(zip(["temp", "vibration", "pressure"], v[i].tolist(), strict=True))}, offset=i)
            for i in range(n)]


def _daemon(guarantee: str) -> Daemon:
    cfg = parse_config({"delivery": {"guarantee": guarantee, "commit_interval_ms": 30000}})
    return Daemon(cfg, Pipeline(cfg, random_artifact()))


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_handover_commits_what_was_processed(guarantee: str) -> None:
    daemon = _daemon(guarantee)
    src, sink = IterSource([]), ListSink()
    daemon._last_commit = 1e18  # the commit interval never passes in this test
    daemon.process(_records(40), src, sink)
    assert daemon.pending == {("in", 0): 40} and not src.committed and not sink.committed
    daemon._io = (src, sink)
    daemon.handover({("in", 0)})
    committed = sink.committed if guarantee == "exactly_once" else src.committed
    assert committed == {("in", 0): 40} and daemon.pending == {}
    assert daemon.metrics.handovers.labels("committed")._value.get() == 1
    assert daemon.metrics.registry.get_sample_value("detector_commit_seconds_count") == 1
    daemon.handover({("in", 0)})  # a second revocation has nothing left to commit
    assert daemon.metrics.handovers.labels("nothing_pending")._value.get() == 1


class FencedSink(ListSink):
    """A transactional sink whose producer was fenced."""

    def commit_transaction(self, offsets: dict, group: object) -> None:
        raise SinkFenced("producer fenced")


def test_a_fenced_producer_found_by_the_handover_is_raised_on_the_loop() -> None:
    daemon = _daemon("exactly_once")
    src, sink = IterSource([]), FencedSink()
    daemon._last_commit = 1e18
    daemon.process(_records(20), src, sink)
    daemon._io = (src, sink)
    daemon.handover({("in", 0)})  # on kafka-python's worker thread: it must not raise there
    assert daemon.metrics.handovers.labels("failed")._value.get() == 1
    with pytest.raises(SinkFenced):  # the loop's next turn hands it to run_daemon, which replaces the producer
        daemon._turn([], src, sink)
