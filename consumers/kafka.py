"""The Kafka edge: a consumer-group source and an acknowledged producer sink (kafka-python).

Every setting that matters is set here explicitly, since kafka-python's defaults are not ours: auto-commit
off (offsets are committed only after the work they cover is durable), acks=all with idempotence, and the
offset reset policy from the configuration.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from consumers.base import Offsets, Record, Sink, SinkError, Source

__all__ = ["KafkaSource", "KafkaSink", "RebalanceEvents"]

log = logging.getLogger(__name__)


class RebalanceEvents(ConsumerRebalanceListener):
    """Records assignment changes; kafka-python calls it on its own thread, so it only records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.assigned: set[tuple[str, int]] = set()
        self.generation = 0

    def on_partitions_revoked(self, revoked: Any) -> None:
        """Forget revoked partitions."""
        with self._lock:
            self.assigned -= {(tp.topic, tp.partition) for tp in revoked}
            self.generation += 1
        log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        """Remember newly assigned partitions."""
        with self._lock:
            self.assigned |= {(tp.topic, tp.partition) for tp in assigned}
            self.generation += 1
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class KafkaSource(Source):
    """A consumer-group member over the input topics, handing out poll batches as Records."""

    def __init__(self, bootstrap: str, topics: list[str], group_id: str, *, client: dict[str, Any],
                 auto_offset_reset: str = "earliest", max_poll_records: int = 5000,
                 session_timeout_ms: int = 10000) -> None:
        self.events = RebalanceEvents()
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_poll_records,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(session_timeout_ms // 3, 1000),
            isolation_level="read_committed",
            key_deserializer=None,
            value_deserializer=None,
            **client,
        )
        self._consumer.subscribe(topics=topics, listener=self.events)

    def poll_batch(self, timeout_s: float) -> list[Record]:
        """The records of one poll, in partition order."""
        got = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        return [
            Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
            for msgs in got.values()
            for m in msgs
        ]

    def commit(self, offsets: Offsets) -> None:
        """Commit the next offsets to read, synchronously."""
        if offsets:
            self._consumer.commit(
                {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
            )

    def lag(self) -> int:
        """Messages between the consumer's position and the end of its assigned partitions."""
        total = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                total += max(high - self._consumer.position(tp), 0)
        return total

    def close(self) -> None:
        """Leave the group and close the connection (no auto-commit: we commit ourselves)."""
        self._consumer.close(autocommit=False, timeout_ms=5000)


class KafkaSink(Sink):
    """An idempotent acks=all producer; flush() waits for every acknowledgement and reports failures."""

    def __init__(self, bootstrap: str, *, client: dict[str, Any], linger_ms: int = 5,
                 on_error: Callable[[str, Exception], None] | None = None) -> None:
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            retries=2147483647,
            max_in_flight_requests_per_connection=5,
            delivery_timeout_ms=120000,
            compression_type=None,
            max_block_ms=30000,
            **client,
        )
        self._futures: list[Any] = []

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Queue one record."""
        try:
            self._futures.append(self._producer.send(topic, key=key, value=value, headers=headers or []))
        except KafkaError as exc:  # e.g. no metadata for the topic within max_block_ms
            raise SinkError(f"cannot send to topic {topic!r}: {exc}") from exc

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued record is acknowledged by all in-sync replicas."""
        futures, self._futures = self._futures, []
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise SinkError(f"producer flush failed: {exc}") from exc
        for fut in futures:
            if not fut.is_done:
                raise SinkError("producer flush timed out before every record was acknowledged")
            if fut.failed():
                raise SinkError(f"record not acknowledged: {fut.exception}") from fut.exception

    def close(self) -> None:
        """Flush and close the producer."""
        self._producer.close(timeout=5)
