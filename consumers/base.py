"""The edge's interfaces: a source hands out batches of raw records; a sink takes bytes and flushes them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Record", "Source", "Sink", "SinkError", "SinkTimeout", "SinkFenced", "RebalanceError", "Stopped",
           "Offsets"]

Offsets = dict[tuple[str, int], int]
"""Next offset to read, per (topic, partition): what a commit stores."""


@dataclass(slots=True)
class Record:
    """One raw message as it came off a topic (or an embedded source); read-only by convention.

    Not a frozen dataclass: one is built per message on the hot path, and a frozen one takes four times as long
    to build.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0


class SinkError(Exception):
    """A sink could not make its records durable; nothing covered by them may be committed."""


class SinkTimeout(SinkError):
    """Records are still waiting for acknowledgement (the brokers are slow or away); they may yet succeed."""


class SinkFenced(SinkError):
    """The transactional producer was fenced (its transaction timed out, or another one took its id): it is dead."""


class RebalanceError(Exception):
    """The consumer group moved on (partitions reassigned) before a commit: the commit was refused."""


class Stopped(Exception):
    """A long wait (reading the state topic to its end, say) was given up because the stop flag was set."""


class Source(ABC):
    """Hands out batches of records, never single ones, and commits what downstream made durable."""

    grouped = False
    """True when other members of a consumer group share the topics (each holds some of their partitions)."""

    @abstractmethod
    def poll_batch(self, timeout_s: float) -> list[Record]:
        """The next batch of records (possibly empty), waiting at most timeout_s."""

    @abstractmethod
    def commit(self, offsets: Offsets) -> None:
        """Store the next offsets to read; called only after the work they cover is durable."""

    @abstractmethod
    def close(self) -> None:
        """Release the source (for Kafka: leave the consumer group)."""

    @property
    def generation(self) -> int:
        """Changes whenever the source's partition assignment changes (a fixed source: always 0)."""
        return 0

    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition)s this source reads now."""
        return set()

    def rewind(self, partitions: set[tuple[str, int]]) -> None:  # noqa: B027 (a fixed source has nothing to do)
        """Go back to the committed offsets of these partitions (after a rebalance or an aborted commit)."""

    def connected(self) -> bool:
        """Whether the source is in contact with what it reads from (a fixed source: always)."""
        return True

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind the end of each partition read (unknown: empty)."""
        return {}

    def group_metadata(self) -> object:
        """What a transactional commit of this source's offsets needs to name its consumer group."""
        return None

    def on_revoke(self, handover: Callable[[set[tuple[str, int]]], None] | None) -> None:  # noqa: B027
        """Call `handover(partitions)` before partitions are taken away, while they may still be committed."""


class Sink(ABC):
    """Takes records to publish; flush() returns only when all of them are durable, else raises SinkError."""

    transactional = False
    """True when records, and the source's offsets, commit atomically (begin, commit_transaction, abort)."""

    on_refused: Callable[[object, Exception], None] | None = None
    """Told of each record sent with `send_side` that Kafka refused for good: its tag and the error."""

    on_blocked: Callable[[Exception], None] | None = None
    """Told each time a send waited its limit for the brokers (they are away): it raises to give up, else the send
    tries again. Without it, such a send raises SinkError."""

    @abstractmethod
    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None,
             partition: int | None = None) -> None:
        """Queue one record for `topic` (to `partition`, else the partitioner's choice by key)."""

    def send_side(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
                  tag: object = None) -> None:
        """Queue a record that must not stop the work (a dead letter): a refusal goes to `on_refused`, not flush.

        In a transaction, a refused record still fails the commit (the transaction must be aborted), and is
        reported to `on_refused` first, so that the owner can leave it out when it does the work again.
        """
        self.send(topic, key, value, headers)

    @abstractmethod
    def flush(self, timeout_s: float) -> None:
        """Block until every queued record is acknowledged; raise SinkError if any failed."""

    @abstractmethod
    def close(self) -> None:
        """Flush what is pending and release the sink."""

    def begin(self) -> None:
        """Start a transaction (transactional sinks only)."""
        raise NotImplementedError(f"{type(self).__name__} is not transactional")

    def commit_transaction(self, offsets: Offsets, group: object) -> None:
        """Commit the records sent since begin() together with the source's offsets, or raise."""
        raise NotImplementedError(f"{type(self).__name__} is not transactional")

    def abort(self) -> None:
        """Drop the records sent since begin()."""
        raise NotImplementedError(f"{type(self).__name__} is not transactional")
