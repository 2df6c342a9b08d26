"""In-memory source and sink behind the same interfaces: the embedded mode and unit tests use them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from consumers.base import Offsets, Record, Sink, Source

__all__ = ["IterSource", "ListSink", "SentRecord"]


class IterSource(Source):
    """A source over an iterable of records, handed out `batch_size` at a time; exhausted when it is empty.

    >>> src = IterSource([Record("t", 0, i, None, b"{}") for i in range(5)], batch_size=2)
    >>> [len(src.poll_batch(0)) for _ in range(4)], src.exhausted
    ([2, 2, 1, 0], True)
    """

    def __init__(self, records: Iterable[Record], batch_size: int = 1000) -> None:
        self._it: Iterator[Record] = iter(records)
        self._batch_size = batch_size
        self.exhausted = False
        self.committed: Offsets = {}

    def poll_batch(self, timeout_s: float) -> list[Record]:
        """The next up to batch_size records."""
        batch: list[Record] = []
        for rec in self._it:
            batch.append(rec)
            if len(batch) >= self._batch_size:
                return batch
        self.exhausted = True
        return batch

    def commit(self, offsets: Offsets) -> None:
        """Remember the committed offsets (they must never go backwards)."""
        for tp, off in offsets.items():
            if off < self.committed.get(tp, -1):
                raise ValueError(f"offset for {tp[0]}[{tp[1]}] went backwards: {off}")
            self.committed[tp] = off

    def close(self) -> None:
        """Nothing to release."""


@dataclass(slots=True, frozen=True)
class SentRecord:
    """A record a ListSink was given."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class ListSink(Sink):
    """A sink that keeps every flushed record in a list; it can also act as a transactional one."""

    records: list[SentRecord] = field(default_factory=list)
    pending: list[SentRecord] = field(default_factory=list)
    committed: Offsets = field(default_factory=dict)  # offsets committed through transactions
    in_transaction: bool = False
    transactional = True  # in memory, a transaction is the pending list

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None,
             partition: int | None = None) -> None:
        """Queue one record (the partition is not kept)."""
        self.pending.append(SentRecord(topic, key, value, tuple(headers or ())))

    def flush(self, timeout_s: float) -> None:
        """Move queued records to `records`."""
        self.records.extend(self.pending)
        self.pending.clear()

    def close(self) -> None:
        """Flush."""
        self.flush(0)

    def begin(self) -> None:
        """Start a transaction: what is sent until commit_transaction() or abort() stays pending."""
        self.in_transaction = True

    def commit_transaction(self, offsets: Offsets, group: object) -> None:
        """Make the pending records visible, and remember the offsets as committed with them."""
        self.flush(0)
        self.committed.update(offsets)
        self.in_transaction = False

    def abort(self) -> None:
        """Drop the pending records."""
        self.pending.clear()
        self.in_transaction = False

    def on(self, topic: str) -> list[SentRecord]:
        """The flushed records sent to `topic`."""
        return [r for r in self.records if r.topic == topic]
