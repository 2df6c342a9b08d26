"""The edge's interfaces: a source hands out batches of raw records; a sink takes bytes and flushes them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["Record", "Source", "Sink", "SinkError", "Offsets"]

Offsets = dict[tuple[str, int], int]
"""Next offset to read, per (topic, partition): what a commit stores."""


@dataclass(slots=True, frozen=True)
class Record:
    """One raw message as it came off a topic (or an embedded source)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0


class SinkError(Exception):
    """A sink could not make its records durable; nothing covered by them may be committed."""


class Source(ABC):
    """Hands out batches of records, never single ones, and commits what downstream made durable."""

    @abstractmethod
    def poll_batch(self, timeout_s: float) -> list[Record]:
        """The next batch of records (possibly empty), waiting at most timeout_s."""

    @abstractmethod
    def commit(self, offsets: Offsets) -> None:
        """Store the next offsets to read; called only after the work they cover is durable."""

    @abstractmethod
    def close(self) -> None:
        """Release the source (for Kafka: leave the consumer group)."""


class Sink(ABC):
    """Takes records to publish; flush() returns only when all of them are durable, else raises SinkError."""

    @abstractmethod
    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Queue one record for `topic`."""

    @abstractmethod
    def flush(self, timeout_s: float) -> None:
        """Block until every queued record is acknowledged; raise SinkError if any failed."""

    @abstractmethod
    def close(self) -> None:
        """Flush what is pending and release the sink."""
