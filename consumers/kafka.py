"""The Kafka edge: a consumer-group source, an acknowledged (optionally transactional) producer sink, and the
compacted topic of per-stream checkpoints (kafka-python).

Every setting that matters is set here explicitly, since kafka-python's defaults are not ours: auto-commit
off (offsets are committed only after the work they cover is durable), acks=all with idempotence,
read_committed, and the offset reset policy from the configuration.

kafka-python runs rebalance listeners on its own I/O loop, where a blocking call would stall the group. The
listener here is the async kind: on revocation it runs the daemon's hand-over (checkpoint, flush, commit) on a
worker thread and waits for it without blocking the loop, so heartbeats go on and the commit itself can use
the loop. Then it counts the generation; the daemon notices the change after the poll and rewinds (see
detector/daemon.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import (
    BrokerResponseError,
    CommitFailedError,
    IllegalGenerationError,
    InvalidProducerEpochError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata

from consumers.base import (
    Offsets,
    RebalanceError,
    Record,
    Sink,
    SinkError,
    SinkFenced,
    SinkTimeout,
    Source,
    Stopped,
)

__all__ = ["KafkaSource", "KafkaSink", "RebalanceEvents", "StateTopic", "StateTopicError", "ControlTopic", "read_span",
           "ControlTopicError", "max_message_bytes", "create_topics", "TopicError"]

_GROUP_MOVED = (CommitFailedError, IllegalGenerationError, RebalanceInProgressError, UnknownMemberIdError)
_FENCED = (ProducerFencedError, InvalidProducerEpochError)

log = logging.getLogger(__name__)


class RebalanceEvents(AsyncConsumerRebalanceListener):
    """Records assignment changes, and hands revoked partitions over first (see `handover`).

    kafka-python awaits these methods on its I/O thread, while the daemon's thread waits in poll().
    """

    def __init__(self, sleep: Callable[[float], Any] | None = None, handover_timeout_s: float = 35.0) -> None:
        self._lock = threading.Lock()
        self.assigned: set[tuple[str, int]] = set()
        self.generation = 0
        self.handover: Callable[[set[tuple[str, int]]], None] | None = None  # set by the daemon
        self.sleep = sleep  # an awaitable sleep on kafka-python's I/O loop
        self.handover_timeout_s = handover_timeout_s

    async def on_partitions_revoked(self, revoked: Any) -> None:
        """Hand the revoked partitions over (checkpoint and commit), then forget them."""
        parts = {(tp.topic, tp.partition) for tp in revoked}
        if parts and self.handover is not None and self.sleep is not None:
            await self._off_loop(self.handover, parts)
        self._forget(parts, "revoked")

    async def on_partitions_lost(self, lost: Any) -> None:
        """Forget partitions taken away without a revocation (this member was evicted): nothing may commit."""
        self._forget({(tp.topic, tp.partition) for tp in lost}, "lost")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        """Remember newly assigned partitions."""
        with self._lock:
            self.assigned |= {(tp.topic, tp.partition) for tp in assigned}
            self.generation += 1
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    def _forget(self, parts: set[tuple[str, int]], how: str) -> None:
        with self._lock:
            self.assigned -= parts
            self.generation += 1
        log.info("partitions %s: %s", how, sorted(f"{t}[{p}]" for t, p in parts))

    async def _off_loop(self, work: Callable[[set[tuple[str, int]]], None], parts: set[tuple[str, int]]) -> None:
        """Run `work(parts)` on a worker thread; wait for it (at most handover_timeout_s) without blocking the loop."""
        assert self.sleep is not None
        worker = threading.Thread(target=work, args=(parts,), name="detector-handover", daemon=True)
        worker.start()
        deadline = time.monotonic() + self.handover_timeout_s
        while worker.is_alive() and time.monotonic() < deadline:
            await self.sleep(0.02)
        if worker.is_alive():
            log.warning("hand-over of %d partitions still running after %.0f s; rebalancing without waiting (the "
                        "next owner reads from the last commit)", len(parts), self.handover_timeout_s)


class KafkaSource(Source):
    """A consumer-group member over the input topics, handing out poll batches as Records."""

    grouped = True

    def __init__(self, bootstrap: str, topics: list[str], group_id: str, *, client: dict[str, Any],
                 auto_offset_reset: str = "earliest", max_poll_records: int = 20000,
                 session_timeout_ms: int = 10000) -> None:
        # the hand-over waits for a commit, which may take a request timeout plus a retry
        self.events = RebalanceEvents(handover_timeout_s=client.get("request_timeout_ms", 30000) / 1000 + 5)
        self._reset = auto_offset_reset
        self._session_timeout_s = session_timeout_ms / 1000
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
        self.events.sleep = _loop_sleep(self._consumer)
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
        """Commit the next offsets to read, synchronously; RebalanceError when the group has moved on."""
        if offsets:
            try:
                self._consumer.commit(to_kafka_offsets(offsets))
            except _GROUP_MOVED as exc:
                raise RebalanceError(f"offset commit refused: {type(exc).__name__}") from exc

    @property
    def generation(self) -> int:
        """Changes with every revocation and assignment."""
        return self.events.generation

    def assignment(self) -> set[tuple[str, int]]:
        """The partitions assigned to this member now."""
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def rewind(self, partitions: set[tuple[str, int]]) -> None:
        """Seek each partition back to its committed offset (or per auto_offset_reset when it has none)."""
        for topic, p in sorted(partitions):
            tp = TopicPartition(topic, p)
            offset = self._consumer.committed(tp)
            if offset is not None:
                self._consumer.seek(tp, offset)
            elif self._reset == "earliest":
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek_to_end(tp)

    def group_metadata(self) -> object:
        """The member's group metadata, for a transactional offset commit (fencing per KIP-447)."""
        return self._consumer.group_metadata()

    def on_revoke(self, handover: Callable[[set[tuple[str, int]]], None] | None) -> None:
        """Call `handover(partitions)` on a worker thread before a rebalance takes them (see RebalanceEvents)."""
        self.events.handover = handover

    def connected(self) -> bool:
        """Whether the group coordinator answered a heartbeat within the session timeout."""
        coord = self._consumer.metrics().get("consumer-coordinator-metrics", {})
        ago = coord.get("last-heartbeat-seconds-ago")
        return ago is None or ago < self._session_timeout_s

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages between the consumer's position and the end of each assigned partition (as last fetched);
        partitions whose position is not known without asking the broker are left out this time."""
        out = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:  # kafka-python asks the broker for a position it must validate (after an assignment): no wait
                position = self._consumer.position(tp, timeout_ms=0)
            except KafkaError:  # the broker is away (a restart killed the daemon here once), or tp went meanwhile
                continue
            if position is not None:
                out[(tp.topic, tp.partition)] = max(high - position, 0)
        return out

    def close(self) -> None:
        """Leave the group and close the connection (no auto-commit: we commit ourselves)."""
        self._consumer.close(autocommit=False, timeout_ms=5000)


def _loop_sleep(consumer: KafkaConsumer) -> Callable[[float], Any] | None:
    """kafka-python 3.0's awaitable sleep on the consumer's I/O loop (a private attribute; None if it moved)."""
    net = getattr(getattr(consumer, "_coordinator", None), "_net", None)
    sleep = getattr(net, "sleep", None)
    if sleep is None:
        log.warning("this kafka-python has no I/O-loop sleep where 3.0 has it: revoked partitions are not handed "
                    "over (the next owner reads from the last commit)")
    return sleep


def to_kafka_offsets(offsets: Offsets) -> dict[TopicPartition, OffsetAndMetadata]:
    """kafka-python's form of a commit."""
    return {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


@dataclass(slots=True, frozen=True)
class _Side:
    """A record sent with send_side, kept until acknowledged: it may have to be sent again."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    tag: object


class KafkaSink(Sink):
    """An idempotent acks=all producer; flush() waits for every acknowledgement and reports failures.

    With a `transactional_id`, records sent between begin() and commit_transaction() commit atomically with
    the consumer's offsets; init_transactions() at start-up aborts whatever a previous process with the same
    id left open.
    """

    def __init__(self, bootstrap: str, *, client: dict[str, Any], linger_ms: int = 5, batch_bytes: int = 262144,
                 transactional_id: str | None = None, transaction_timeout_ms: int = 60000,
                 max_block_ms: int = 30000) -> None:
        tx = {"transactional_id": transactional_id, "transaction_timeout_ms": transaction_timeout_ms} \
            if transactional_id else {}
        self.transactional = bool(transactional_id)
        # a transactional request unanswered this long is lost: a request timeout, and a little more
        self.stuck_s = client.get("request_timeout_ms", 30000) / 1000 + 5
        self._side_sent: list[tuple[Any, _Side]] = []  # send_side's records not yet acknowledged or reported
        self._side: KafkaProducer | None = None
        self._settings = dict(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            batch_size=batch_bytes,  # a commit's thousands of checkpoints in few requests, not one per 16 KB
            retries=2147483647,
            max_in_flight_requests_per_connection=5,
            delivery_timeout_ms=120000,
            compression_type=None,
            max_block_ms=max_block_ms,  # how long a send waits for a topic's metadata before on_blocked
            **tx,
            **client,
        )
        self._producer = KafkaProducer(**self._settings)
        if self.transactional:
            self._producer.init_transactions()
        else:
            # outside a transaction, side records (dead letters) go through a producer of their own, without
            # idempotence: kafka-python's idempotent producer turns fatal when the broker refuses one record for
            # good (a compacted topic refuses a null key), and then fails every alert and checkpoint after it
            try:
                self._side = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
                                           linger_ms=linger_ms, batch_size=batch_bytes, retries=2147483647,
                                           max_in_flight_requests_per_connection=1, delivery_timeout_ms=120000,
                                           compression_type=None, max_block_ms=max_block_ms, **client)
            except Exception:
                self._producer.close(timeout=0)
                raise
        self.max_request_bytes = int(self._producer.config["max_request_size"])
        """The largest record this sink can send, framing included (kafka-python's max_request_size)."""
        self._futures: list[Any] = []
        self.in_transaction = False

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None,
             partition: int | None = None) -> None:
        """Queue one record."""
        self._futures.append(self._blocking(lambda: self._producer.send(
            topic, key=key, value=value, headers=headers or [], partition=partition), topic))

    def _blocking(self, send: Callable[[], Any], topic: str) -> Any:
        """send(), again after each max_block_ms spent waiting for the brokers, as long as `on_blocked` lets it."""
        while True:
            try:
                return send()
            except KafkaTimeoutError as exc:  # no metadata for the topic, or no buffer space, within max_block_ms
                self._raise_if_abortable(exc)
                if self.on_blocked is None:
                    raise SinkError(f"cannot send to topic {topic!r}: {exc}") from exc
                self.on_blocked(SinkTimeout(f"cannot send to topic {topic!r}: {exc}"))
            except KafkaError as exc:
                self._raise_if_abortable(exc)
                raise SinkError(f"cannot send to topic {topic!r}: {exc}") from exc

    def _raise_if_abortable(self, exc: KafkaError) -> None:
        """RebalanceError when the open transaction failed (a record refused, say) and can only be aborted."""
        if self.transactional and self._producer._transaction_manager.has_abortable_error():
            self._report_refused()
            raise RebalanceError(f"transaction must be aborted: {exc}") from exc

    def send_side(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
                  tag: object = None) -> None:
        """Queue a record that must not stop the work (a dead letter); Kafka's refusal goes to `on_refused`."""
        producer = self._side or self._producer
        try:
            future = self._blocking(lambda: producer.send(topic, key=key, value=value, headers=headers), topic)
        except SinkError as exc:
            if not isinstance(exc.__cause__, MessageSizeTooLargeError):
                raise
            self._refused(tag, exc.__cause__)  # above max_request_size: refused before it was sent
            return
        self._side_sent.append((future, _Side(topic, key, value, headers, tag)))

    def _refused(self, tag: object, exc: Exception) -> None:
        if self.on_refused is not None:
            self.on_refused(tag, exc)
        else:
            log.warning("record refused by Kafka and dropped: %s", exc)

    def _flush_side(self, deadline: float) -> None:
        """Wait for the side producer; report what Kafka refused, and send again what failed only beside it.

        The broker refuses a whole batch when one of its records is invalid; kafka-python then fails the others
        with a plain KafkaError. They are sent again (a few rounds: each one leaves the refused records out).
        """
        assert self._side is not None
        for last in (False, False, True):
            self._side.flush(timeout=max(deadline - time.monotonic(), 0.0))
            if not all(future.is_done for future, _ in self._side_sent):
                raise SinkTimeout("producer flush returned before every record was acknowledged")
            sent, self._side_sent = self._side_sent, []
            again: list[_Side] = []
            for future, side in sent:
                exc = future.exception if future.failed() else None
                if exc is None:
                    continue
                if getattr(exc, "retriable", False):  # e.g. not delivered within delivery_timeout_ms
                    raise SinkError(f"record not acknowledged: {exc}") from exc
                if isinstance(exc, BrokerResponseError) or last:
                    self._refused(side.tag, exc)
                else:
                    again.append(side)
            if not again:
                return
            for side in again:
                self.send_side(side.topic, side.key, side.value, side.headers, side.tag)

    def _report_refused(self) -> None:
        """In a failed transaction: report the side records the broker refused (not those aborted with them)."""
        sent, self._side_sent = self._side_sent, []
        for future, side in sent:
            exc = future.exception if future.is_done and future.failed() else None
            if isinstance(exc, BrokerResponseError) and not exc.retriable:
                self._refused(side.tag, exc)

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued record is acknowledged by all in-sync replicas.

        SinkTimeout when some are still in flight after timeout_s (call again to go on waiting), SinkError
        when one failed for good. A side record (send_side) refused for good is reported to `on_refused` instead.
        """
        deadline = time.monotonic() + timeout_s
        try:
            self._producer.flush(timeout=timeout_s)
            if self._side is not None:
                self._flush_side(deadline)
        except KafkaTimeoutError as exc:
            waiting = sum(not f.is_done for f in self._futures) + sum(not f.is_done for f, _ in self._side_sent)
            raise SinkTimeout(f"{waiting} records not yet acknowledged after {timeout_s:g} s") from exc
        except KafkaError as exc:
            raise SinkError(f"producer flush failed: {exc}") from exc
        futures, self._futures = self._futures, []
        for fut in futures:
            if not fut.is_done:
                self._futures = [f for f in futures if not f.is_done]
                raise SinkTimeout("producer flush returned before every record was acknowledged")
            if fut.failed():
                raise SinkError(f"record not acknowledged: {fut.exception}") from fut.exception

    def begin(self) -> None:
        """Start a transaction."""
        try:
            self._producer.begin_transaction()
        except _FENCED as exc:
            raise SinkFenced(f"producer fenced: {type(exc).__name__}") from exc
        except KafkaError as exc:
            raise SinkError(f"transaction not begun: {type(exc).__name__}: {exc}") from exc
        self.in_transaction = True

    def commit_transaction(self, offsets: Offsets, group: object) -> None:
        """Add the consumer's offsets to the transaction and commit it.

        RebalanceError when the group fenced the offsets or the transaction must be aborted; SinkFenced when the
        producer is dead (its transaction timed out on the broker, or another producer took its id). While the
        brokers are away it keeps waiting: the transaction commits when they are back.
        """
        tm = self._producer._transaction_manager  # kafka-python's public calls wait without a bound
        try:
            if offsets:
                self._await(tm.send_offsets_to_transaction(to_kafka_offsets(offsets), group))
            self._await(tm.begin_commit())
        except _GROUP_MOVED as exc:
            raise RebalanceError(f"transactional offset commit refused: {type(exc).__name__}") from exc
        except SinkFenced:
            raise
        except (KafkaError, SinkError) as exc:
            if isinstance(exc, _FENCED) or tm.has_fatal_error():
                raise SinkFenced(f"producer fenced: {exc}") from exc
            if tm.has_abortable_error():
                self._report_refused()  # a refused dead letter, say: the owner leaves it out when it goes again
                raise RebalanceError(f"transaction must be aborted: {exc}") from exc
            raise SinkError(f"transaction not committed: {type(exc).__name__}: {exc}") from exc
        self.in_transaction = False
        self._futures = []
        self._side_sent = []

    def _await(self, result: Any) -> None:
        """Wait for a transactional request, giving up when the producer turns fatal or the request is lost.

        kafka-python 3.0.12 can drop a transactional request when its coordinator dies (the wait then never
        ends, even once a new coordinator serves): after `stuck_s` without an answer the producer is declared
        dead, like a fenced one, and the daemon replaces it (its init_transactions aborts the stuck transaction).
        """
        self._producer._sender.wakeup()
        tm = self._producer._transaction_manager
        deadline = time.monotonic() + self.stuck_s
        while not result.wait(timeout_ms=500):
            if tm.has_fatal_error():
                raise SinkFenced(f"producer fenced while waiting: {tm._last_error}")
            if time.monotonic() > deadline:
                raise SinkFenced(f"transactional request unanswered for {self.stuck_s:g} s "
                                 "(its coordinator moved; kafka-python does not resend it)")

    def abort(self) -> None:
        """Abort the open transaction (its records are never seen by read_committed readers)."""
        failed = self._producer._transaction_manager.has_abortable_error()
        try:
            self._producer.abort_transaction()
        except _FENCED as exc:
            raise SinkFenced(f"producer fenced: {type(exc).__name__}") from exc
        except KafkaError as exc:
            raise SinkError(f"transaction not aborted: {type(exc).__name__}: {exc}") from exc
        finally:
            self.in_transaction = False
            self._futures = []
            self._side_sent = []
        if failed:
            self._renew()

    def _renew(self) -> None:
        """Replace the producer by a new one with the same transactional id, after a batch the broker refused.

        kafka-python 3.0.12 keeps counting sequence numbers past the refused batch: the next transaction's
        batch to that partition fails with OutOfOrderSequenceNumber, and the producer is lost. A new producer
        (init_transactions: a new epoch) starts its sequences afresh.
        """
        try:
            self._producer.close(timeout=5)
        except KafkaError as exc:
            log.warning("producer closed with records unacknowledged (%s); its transaction was aborted", exc)
        try:
            self._producer = KafkaProducer(**self._settings)
            self._producer.init_transactions()
        except KafkaError as exc:
            raise SinkError(f"no new producer after an aborted transaction: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Flush and close the producers (what is still unacknowledged after 5 s is given up: never committed)."""
        if self._side is not None:
            try:
                self._side.close(timeout=5)
            except KafkaError as exc:
                log.warning("dead-letter producer closed with records unacknowledged (%s)", exc)
        try:
            self._producer.close(timeout=5)
        except KafkaError as exc:
            log.warning("producer closed with records unacknowledged (%s); nothing they cover was committed", exc)
            # kafka-python's close() raised in its flush, before stopping the sender: stop it here, and mark the
            # producer closed so that a second close() and its __del__ do nothing (kafka-python internals, 3.0.x)
            sender = getattr(self._producer, "_sender", None)
            if sender is not None and sender.is_alive():
                sender.force_close()
            self._producer._closed = True


def max_message_bytes(bootstrap: str, topic: str, *, client: dict[str, Any]) -> int | None:
    """The largest record batch the topic takes (its max.message.bytes, or the broker's default); None: no topic."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client)
    try:
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, None)], config_filter="all")
    finally:
        admin.close()
    value = configs.get("topic", {}).get(topic, {}).get("max.message.bytes", {}).get("value")
    return int(value) if value else None


CREATED_TOPIC_WAIT_S = 10.0
"""How long a topic just created may take to be described without error by the broker asked (its metadata
reaches the other brokers of a cluster after the create returns)."""


def _describe(admin: KafkaAdminClient, topic: str, wait_s: float = 0.0) -> dict[str, Any] | None:
    """The topic's description, or None when it does not exist (or not yet, after `wait_s` seconds of asking)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = {t["name"]: t for t in admin.describe_topics([topic])}.get(topic)
        if found is not None and not found.get("error_code") and found.get("partitions"):
            return found
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _compacted_topic(admin: KafkaAdminClient, topic: str, partitions: int, replication: int,
                     what: str, configs: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, str]:
    """Describe the topic, creating it compacted (with `configs` besides) when it does not exist; return it (None:
    absent) and its policy."""
    found = _describe(admin, topic)
    if found is None:
        log.info("creating %s topic %s: %d partition%s, cleanup.policy=compact%s", what, topic, partitions,
                 "" if partitions == 1 else "s", "".join(f", {k}={v}" for k, v in (configs or {}).items()))
        admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": replication,
                                     "configs": {"cleanup.policy": "compact", **(configs or {})}}},
                            raise_errors=False, wait_for_metadata=True)
        found = _describe(admin, topic, CREATED_TOPIC_WAIT_S)
    if found is None:
        return None, ""
    # a broker that has not yet heard of a topic just created describes no cleanup.policy: ask again, as long
    # as a new topic's metadata may take to spread (an existing topic's policy, right or wrong, comes at once)
    deadline = time.monotonic() + CREATED_TOPIC_WAIT_S
    while True:
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, None)],
                                         config_filter="all")
        policy = configs.get("topic", {}).get(topic, {}).get("cleanup.policy", {}).get("value", "")
        if policy or time.monotonic() >= deadline:
            return found, policy
        time.sleep(0.2)


class TopicError(Exception):
    """A topic could not be created or described (the message names it and why)."""


def create_topics(bootstrap: str, names: list[str], partitions: int = -1, replication: int = -1, *,
                  client: dict[str, Any]) -> dict[str, tuple[bool, int]]:
    """Create each topic of `names` that does not exist (-1: the broker's default partitions or replication);
    return per topic whether this call created it and its partition count. Existing topics are left as they are."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client)
    out: dict[str, tuple[bool, int]] = {}
    try:
        for topic in names:
            found = _describe(admin, topic)
            created = found is None
            if created:
                result = admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": replication}},
                                             raise_errors=False, wait_for_metadata=True)
                found = _describe(admin, topic, CREATED_TOPIC_WAIT_S)
                if found is None:
                    raise TopicError(f"topic {topic}: not created ({_create_error(result, topic)})")
            out[topic] = (created, len(found["partitions"]))
    finally:
        admin.close()
    return out


def _create_error(result: dict[str, Any], topic: str) -> str:
    """The broker's error for `topic` in a CreateTopics result (kafka-python's dict of it), as one phrase."""
    for t in result.get("topics", []):
        if t.get("name") == topic:
            return str(t.get("error_message") or f"error code {t.get('error_code')}")
    return "the broker did not say why"


STATE_FETCH_BYTES = 1 << 20
"""Bytes fetched per partition and request when the state topic is read (restores)."""


class StateTopicError(Exception):
    """The checkpoint topic cannot serve (partitions or cleanup policy wrong); the message says why.

    `retriable` when the input topics do not exist yet: they may be created after the daemon starts.
    """

    def __init__(self, message: str, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class StateTopic:
    """The compacted topic of per-stream checkpoints: one partition per input partition, keyed by stream id."""

    def __init__(self, bootstrap: str, topic: str, *, client: dict[str, Any]) -> None:
        self.bootstrap, self.topic, self.client = bootstrap, topic, client

    def ensure(self, input_topics: list[str], replication: int = -1, segment_ms: int = 0) -> int:
        """Create the topic (compacted, as many partitions as the input; segments rolled after `segment_ms` when
        above 0) or check it; return its partitions.

        Compaction cleans only closed segments, so a restore reads every checkpoint written since the newest
        segment began: with the broker's default (7 days, or 1 GiB) that grows with the daemon's uptime.
        """
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, **self.client)
        try:
            described = {t["name"]: t for t in admin.describe_topics(list(input_topics))}
            counts = {t: (0 if d.get("error_code") else len(d["partitions"])) for t, d in described.items()}
            if 0 in counts.values():
                raise StateTopicError("input topics not found (input.topics): " + ", ".join(
                    t for t, n in counts.items() if not n), retriable=True)
            if len(set(counts.values())) != 1:
                raise StateTopicError(
                    "the input topics must all have the same number of partitions to share a state topic "
                    "(input.topics); found " + ", ".join(f"{t}: {n}" for t, n in counts.items()))
            want = next(iter(counts.values()))
            found, policy = _compacted_topic(admin, self.topic, want, replication, "state",
                                             {"segment.ms": str(segment_ms)} if segment_ms > 0 else None)
            have = len(found["partitions"]) if found else 0
        finally:
            admin.close()
        if have != want:
            raise StateTopicError(f"state topic {self.topic} has {have} partitions but the input has {want}: it "
                                  f"must be co-partitioned (delete it, or set delivery.state_topic to a new name)")
        if "compact" not in policy.split(","):
            raise StateTopicError(f"state topic {self.topic} has cleanup.policy={policy or '?'}; it must be compact "
                                  f"(kafka-configs --alter --add-config cleanup.policy=compact)")
        return have

    def read(self, partitions: set[int], timeout_s: float, stop: threading.Event | None = None) -> list[bytes]:
        """The newest committed checkpoint of every stream on these partitions (read to their end).

        Stopped when `stop` is set before the end is reached (checked between fetches).
        """
        latest: dict[bytes | None, bytes] = {}
        for chunk in self.read_chunks(partitions, timeout_s, stop):
            for key, value in chunk:
                if value is None:
                    latest.pop(key, None)  # a tombstone
                else:
                    latest[key] = value
        return list(latest.values())

    def read_chunks(self, partitions: set[int], timeout_s: float, stop: threading.Event | None = None,
                    expect: Callable[[int], None] | None = None,
                    ) -> Iterator[list[tuple[bytes | None, bytes | None]]]:
        """Every committed record on these partitions, oldest first, one fetch at a time: (key, value), the value
        None for a tombstone. A key's newest record is its stream's state (compaction may not have run yet).
        `expect` is told, before the first fetch, how many records at most will come (more than the streams
        where compaction has not run).

        Stopped when `stop` is set before the end is reached, KafkaTimeoutError past `timeout_s` (both checked
        between fetches).
        """
        if not partitions:
            return
        # fetches of 1 MiB a partition: with 8 MiB, reading 50,000 checkpoints alone peaked 256 MB above the start
        # against 51 MB, and a 100,000-stream restore peaked 160 MB higher and took 15 % longer (docs/benchmarks.md)
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                 isolation_level="read_committed", key_deserializer=None, value_deserializer=None,
                                 max_partition_fetch_bytes=STATE_FETCH_BYTES, max_poll_records=8192, **self.client)
        try:
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            ends = consumer.end_offsets(tps)
            deadline = time.monotonic() + timeout_s
            todo = {tp for tp in tps if ends[tp] > 0}
            if expect is not None and todo:
                starts = consumer.beginning_offsets(list(todo))
                expect(sum(ends[tp] - starts[tp] for tp in todo))
            n = 0
            while todo:
                if stop is not None and stop.is_set():
                    raise Stopped(f"reading the state topic {self.topic} ({n} records read)")
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"state topic {self.topic}: not read to its end within {timeout_s:g} s "
                                            f"(delivery.restore_timeout_s)")
                chunk = [(m.key, m.value) for msgs in consumer.poll(timeout_ms=200).values() for m in msgs]
                if chunk:
                    n += len(chunk)
                    yield chunk
                todo = {tp for tp in todo if consumer.position(tp) < ends[tp]}
        finally:
            consumer.close(autocommit=False)


def read_span(bootstrap: str, topic: str, since_ms: int, until_ms: int | None, *, client: dict[str, Any],
              timeout_s: float = 600.0) -> Iterator[list[Record]]:
    """Every committed record of `topic` with a record timestamp in [since_ms, until_ms) (None: up to the end as
    it was when called), one fetch at a time; found by the partitions' time index, read without a group.

    LookupError when the topic does not exist; KafkaTimeoutError when the span is not read within `timeout_s`.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             isolation_level="read_committed", key_deserializer=None, value_deserializer=None,
                             max_partition_fetch_bytes=8 << 20, max_poll_records=8192, **client)
    try:
        if topic not in consumer.topics():  # fetches the cluster's metadata
            raise LookupError(f"topic {topic} not found at {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        if until_ms is not None:  # the first record at or after `until` ends the span (none there: the partition's end)
            found = consumer.offsets_for_times({tp: until_ms for tp in tps})
            ends = {tp: found[tp].offset if found.get(tp) is not None else ends[tp] for tp in tps}
        starts = consumer.offsets_for_times({tp: since_ms for tp in tps})
        todo = set()
        for tp in tps:
            start = starts.get(tp)
            if start is not None and start.offset < ends[tp]:
                consumer.seek(tp, start.offset)
                todo.add(tp)
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"topic {topic}: the span was not read within {timeout_s:g} s")
            got = consumer.poll(timeout_ms=200)
            chunk = [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                     for tp, msgs in got.items() for m in msgs
                     if m.offset < ends[tp] and since_ms <= m.timestamp
                     and (until_ms is None or m.timestamp < until_ms)]
            if chunk:
                yield chunk
            todo = {tp for tp in todo if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close(autocommit=False)


class ControlTopicError(Exception):
    """The control topic cannot serve (it is not compacted); the message says why and what to do."""


class ControlTopic(Source):
    """The compacted topic of operators' commands, read whole by every daemon: no group, every partition.

    The stream a command names may be owned by any member of the group, now or after a rebalance, so each
    member reads every partition from the beginning at start-up (`open`) and then follows it (`poll_batch`).
    Nothing is committed: the next start reads it whole again, and compaction keeps it small.
    """

    def __init__(self, bootstrap: str, topic: str, *, client: dict[str, Any]) -> None:
        self.bootstrap, self.topic, self.client = bootstrap, topic, client
        self._consumer: KafkaConsumer | None = None

    def ensure(self, replication: int = -1) -> int:
        """Create the topic (one partition, compacted) or check its cleanup policy; return its partitions."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, **self.client)
        try:
            found, policy = _compacted_topic(admin, self.topic, 1, replication, "control")
            if found is None:
                raise ControlTopicError(f"control topic {self.topic} does not exist and could not be created "
                                        "(create it: 1 partition, cleanup.policy=compact; or set control.topic)")
        finally:
            admin.close()
        if "compact" not in policy.split(","):
            raise ControlTopicError(f"control topic {self.topic} has cleanup.policy={policy or '?'}; it must be "
                                    f"compact, or operators' mutes are deleted with old segments "
                                    f"(kafka-configs --alter --add-config cleanup.policy=compact, or set "
                                    f"control.topic to a new name)")
        return len(found["partitions"])

    def open(self, partitions: int, timeout_s: float, stop: threading.Event | None = None
             ) -> tuple[list[Record], bool]:
        """Start reading every partition (as `ensure` counted them) from the beginning; return what is there now.

        The flag is False when the end was not reached within `timeout_s`, or before `stop` was set (the rest
        comes with poll_batch).
        """
        if self._consumer is None:
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                           auto_offset_reset="earliest", isolation_level="read_committed",
                                           key_deserializer=None, value_deserializer=None, **self.client)
        consumer = self._consumer
        tps = [TopicPartition(self.topic, p) for p in range(partitions)]
        consumer.assign(tps)
        if tps:
            consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps) if tps else {}
        out: list[Record] = []
        deadline = time.monotonic() + timeout_s
        todo = {tp for tp in tps if ends[tp] > 0}
        while todo and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            out += self.poll_batch(0.2)
            todo = {tp for tp in todo if consumer.position(tp) < ends[tp]}
        return out, not todo

    def poll_batch(self, timeout_s: float) -> list[Record]:
        """Commands that arrived since the last call (0: do not wait), oldest first per partition."""
        if self._consumer is None:
            return []
        got = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        return [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                for tp in sorted(got, key=lambda tp: tp.partition) for m in got[tp]]

    def send(self, key: bytes, value: bytes, timeout_s: float = 30.0) -> tuple[int, int]:
        """Write one command (acks=all) and wait for it; return its partition and offset."""
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                 **self.client)
        try:
            meta = producer.send(self.topic, key=key, value=value).get(timeout=timeout_s)
        finally:
            producer.close(timeout=5)
        return meta.partition, meta.offset

    def commit(self, offsets: Offsets) -> None:
        """Nothing to commit: every start reads the whole topic again."""

    def close(self) -> None:
        """Stop reading."""
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
