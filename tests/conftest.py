"""Shared pytest fixtures."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping

import pytest

from tests.kafka_broker import KafkaBroker, create_topic, delete_topics

# ----------------------------------------------------------------------------------------------------------
# Kafka: a real Apache Kafka broker (see docs/kafka.md). Tests that use these are marked @pytest.mark.kafka.
#   kafka_bootstrap  (session)  "host:port": $KAFKA_BOOTSTRAP when set, else a broker started for the session
#   topic_factory    (function) make(partitions=4, config=None, prefix="t") -> a new, uniquely named topic
#   group_id         (function) a new, unique consumer group id
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_daemon_left_running() -> Iterator[None]:
    """A test that fails half-way must not leave `detector run` processes behind (they would load the machine)."""
    yield
    from tests.reliability import kill_leftovers  # imported late: most tests never start a daemon

    kill_leftovers()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    if external:
        yield external
        return
    with KafkaBroker() as broker:
        assert broker.bootstrap is not None
        yield broker.bootstrap


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    created: list[str] = []

    def make(partitions: int = 4, config: Mapping[str, object] | None = None, prefix: str = "t") -> str:
        name = create_topic(kafka_bootstrap, f"{prefix}-{uuid.uuid4().hex}", partitions, config)
        created.append(name)
        return name

    yield make
    delete_topics(kafka_bootstrap, created)


@pytest.fixture
def group_id() -> str:
    return f"g-{uuid.uuid4().hex}"


# --- end of Kafka fixtures --------------------------------------------------------------------------------
