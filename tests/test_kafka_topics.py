"""Describing a topic the daemon just created, and its cleanup policy, as pure logic (the real-Kafka set-up is in
the Kafka tests)."""

from __future__ import annotations

from typing import Any

import pytest

import consumers.kafka
from consumers.kafka import _compacted_topic, _describe


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


class FakeConfigs(FakeAdmin):
    """The topic exists; describe_configs has no cleanup.policy for it `blank` times (a broker that has not heard
    of the topic yet, in a cluster), then `policy`."""

    def __init__(self, blank: int, policy: str) -> None:
        super().__init__(errors=0)
        self.blank, self.policy, self.config_calls = blank, policy, 0

    def describe_configs(self, resources: list[Any], config_filter: str = "all") -> dict[str, Any]:
        self.config_calls += 1
        if self.config_calls <= self.blank:
            return {"topic": {}}
        return {"topic": {"t-control": {"cleanup.policy": {"value": self.policy}}}}


def test_a_new_topics_cleanup_policy_is_asked_for_again_until_a_broker_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeTime()
    monkeypatch.setattr(consumers.kafka, "time", clock)
    admin = FakeConfigs(blank=3, policy="compact")
    found, policy = _compacted_topic(admin, "t-control", 1, 3, "control")  # type: ignore[arg-type]
    assert found is not None and policy == "compact" and admin.config_calls == 4
    wrong = FakeConfigs(blank=0, policy="delete")  # a policy, right or wrong, is taken at once
    assert _compacted_topic(wrong, "t-control", 1, 3, "control")[1] == "delete" and wrong.config_calls == 1
    never = FakeConfigs(blank=10**6, policy="compact")
    clock.now = 0.0
    assert _compacted_topic(never, "t-control", 1, 3, "control")[1] == ""  # type: ignore[arg-type]
    assert clock.now >= consumers.kafka.CREATED_TOPIC_WAIT_S, "for as long as a new topic's metadata may take"


class FakeConsumer:
    """Two partitions assigned: the first one's position is known, the second one's needs a broker that is away."""

    def assignment(self) -> set:
        from kafka import TopicPartition

        return {TopicPartition("in", 0), TopicPartition("in", 1)}

    def highwater(self, tp: Any) -> int:
        return 100

    def position(self, tp: Any, timeout_ms: int | None = None) -> int:
        from kafka.errors import KafkaConnectionError

        assert timeout_ms == 0, "the lag gauge must never wait for the broker"
        if tp.partition == 1:
            raise KafkaConnectionError("111 ECONNREFUSED")  # what a broker restart gave the hour soak's daemon
        return 60


def test_the_lag_gauge_leaves_out_a_partition_whose_position_needs_a_broker_that_is_away() -> None:
    source = object.__new__(consumers.kafka.KafkaSource)
    source._consumer = FakeConsumer()
    assert source.lag() == {("in", 0): 40}
