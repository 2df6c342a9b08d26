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


def test_a_rewind_forgets_every_stream_it_does_not_restore_and_new_streams_take_their_rows() -> None:
    cfg = parse_config({"alerts": {"warmup_readings": 100}, "delivery": {"commit_interval_ms": 30000}})
    daemon = Daemon(cfg, Pipeline(cfg, random_artifact()))
    src, sink = IterSource([]), ListSink()
    daemon._last_commit = 1e18
    recs = [record({"stream": f"pump-{s}", "ts": 1_700_000_000 + 60 * i, "values": {"temp": 1.0 + i % 3}},
                   offset=3 * i + s) for i in range(10) for s in range(3)]
    daemon.process(recs, src, sink)
    engine = daemon.pipeline.engine
    assert engine.live_streams == 3 and daemon.metrics.active_streams._value.get() == 3
    capacity = engine.capacity
    daemon.rewind(src, sink, "rebalance")  # no state topic here: no stream is restored
    assert engine.live_streams == 0 and daemon.metrics.active_streams._value.get() == 0
    daemon.process([record({"stream": "fan-1", "ts": 1_700_000_000, "values": {"temp": 1.0}}, offset=99)], src, sink)
    # every stream went, so the table started afresh: the new stream has row 0 of a table of the first size
    assert engine.live_streams == 1 and engine.capacity == capacity and engine.rows_used == 1
    assert daemon.metrics.warming_streams._value.get() == 1, "the released rows are not streams warming up"


def test_a_rewind_hands_the_freed_heap_back(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({})
    daemon = Daemon(cfg, Pipeline(cfg, random_artifact()))
    calls = []
    monkeypatch.setattr("detector.daemon.release_free_heap", lambda: calls.append(1) or True)
    daemon.rewind(IterSource([]), ListSink(), "rebalance")
    assert calls == [1]
