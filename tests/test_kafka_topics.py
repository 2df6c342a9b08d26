"""Describing a topic the daemon just created, as pure logic (the real-Kafka set-up is in the Kafka tests)."""

from __future__ import annotations

from typing import Any

import pytest

import consumers.kafka
from consumers.kafka import _describe


class FakeAdmin:
    """describe_topics answers with an error `errors` times (metadata not yet on that broker), then the topic."""

    def __init__(self, errors: int) -> None:
        self.errors, self.calls = errors, 0

    def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        self.calls += 1
        if self.calls <= self.errors:
            return [{"name": topics[0], "error_code": 3, "partitions": []}]  # UNKNOWN_TOPIC_OR_PARTITION
        return [{"name": topics[0], "error_code": 0, "partitions": [{"partition": 0}]}]


class FakeTime:
    """consumers.kafka's clock: monotonic() moves only when it sleeps, so the wait is counted in steps, not timed."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_a_topic_just_created_is_asked_for_again_until_its_metadata_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumers.kafka, "time", FakeTime())
    admin = FakeAdmin(errors=2)
    found = _describe(admin, "t-control", wait_s=5.0)  # type: ignore[arg-type]
    assert found is not None and found["partitions"] == [{"partition": 0}] and admin.calls == 3


def test_a_topic_that_does_not_exist_is_none_at_once_or_after_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeTime()
    monkeypatch.setattr(consumers.kafka, "time", clock)
    admin = FakeAdmin(errors=10**6)
    assert _describe(admin, "t-state") is None and admin.calls == 1 and clock.now == 0  # type: ignore[arg-type]
    assert _describe(admin, "t-state", wait_s=0.3) is None  # type: ignore[arg-type]
    assert admin.calls > 2 and clock.now >= 0.3, "asked again until the wait was over"
