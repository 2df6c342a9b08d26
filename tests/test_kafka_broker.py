"""The test broker itself, with kafka-python: idempotent produce, group consume + commit, transactions."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

pytestmark = pytest.mark.kafka


def poll_until(consumer: KafkaConsumer, done, timeout_s: float = 30.0) -> list:
    """poll() until done(records so far) is true; fail after timeout_s."""
    out: list = []
    deadline = time.monotonic() + timeout_s
    while not done(out):
        assert time.monotonic() < deadline, f"gave up after {timeout_s}s with {len(out)} records"
        for batch in consumer.poll(timeout_ms=200).values():
            out.extend(batch)
    return out


def read_all(bootstrap: str, topic: str, partitions: int, isolation_level: str) -> list:
    """Every record of `topic` that `isolation_level` lets through (no group: assign + read to the end)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", isolation_level=isolation_level)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)  # read_committed: the last stable offset
        return poll_until(consumer, lambda _: all(consumer.position(tp) >= ends[tp] for tp in tps))
    finally:
        consumer.close()


def test_idempotent_produce_then_group_consume_and_commit(kafka_bootstrap: str, topic_factory,
                                                          group_id: str) -> None:
    topic = topic_factory(partitions=4)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=5)
    futures = [producer.send(topic, key=f"k{i % 10}".encode(), value=f"v{i}".encode()) for i in range(100)]
    producer.flush(timeout=30)
    sent = [f.get(timeout=30) for f in futures]
    producer.close(timeout=10)
    per_partition = {p: sum(m.partition == p for m in sent) for p in range(4)}
    assert sum(per_partition.values()) == 100
    assert len({m.partition for m in sent}) > 1, "10 keys all landed on one partition"

    # a group joined before this consumer has the new topic's partition metadata is assigned nothing ("No
    # partition metadata"), and rejoins only on the next metadata refresh (5 minutes by default): refresh often
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group_id,
                             enable_auto_commit=False, auto_offset_reset="earliest", metadata_max_age_ms=1000)
    try:
        records = poll_until(consumer, lambda got: len(got) >= 100)
        consumer.commit()
        tps = [TopicPartition(topic, p) for p in range(4)]
        assert {tp.partition: consumer.committed(tp) for tp in tps} == per_partition
    finally:
        consumer.close()
    assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(100))

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        committed = admin.list_group_offsets(group_id)[group_id]
    finally:
        admin.close()
    assert {tp.partition: om.offset for tp, om in committed.items() if tp.topic == topic} == per_partition


def test_transactional_producer_with_send_offsets_to_transaction(kafka_bootstrap: str, topic_factory,
                                                                 group_id: str) -> None:
    source, sink = topic_factory(partitions=4), topic_factory(partitions=4)
    with KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True) as plain:
        for i in range(20):
            plain.send(source, key=f"k{i}".encode(), value=f"in{i}".encode())
        plain.flush(timeout=30)

    consumer = KafkaConsumer(source, bootstrap_servers=kafka_bootstrap, group_id=group_id,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             isolation_level="read_committed")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex}",
                             acks="all", enable_idempotence=True)
    try:
        producer.init_transactions()
        # An aborted transaction first: a read_committed reader must never see it.
        producer.begin_transaction()
        for i in range(5):
            producer.send(sink, key=b"x", value=f"aborted{i}".encode())
        producer.flush(timeout=30)
        producer.abort_transaction()

        # Consume - transform - produce, with the consumed offsets committed in the same transaction.
        records = poll_until(consumer, lambda got: len(got) >= 20)
        producer.begin_transaction()
        for r in records:
            producer.send(sink, key=r.key, value=b"out-" + r.value)
        next_offset: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            next_offset[tp] = max(next_offset.get(tp, 0), r.offset + 1)
        offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in next_offset.items()}
        producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
        producer.commit_transaction()
    finally:
        producer.close(timeout=10)
        consumer.close(autocommit=False)

    committed_out = read_all(kafka_bootstrap, sink, 4, "read_committed")
    assert sorted(r.value for r in committed_out) == sorted(f"out-in{i}".encode() for i in range(20))
    everything = read_all(kafka_bootstrap, sink, 4, "read_uncommitted")
    assert sum(r.value.startswith(b"aborted") for r in everything) == 5  # really written, then aborted

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        committed = admin.list_group_offsets(group_id)[group_id]
    finally:
        admin.close()
    assert {tp: om.offset for tp, om in committed.items()} == {tp: om.offset for tp, om in offsets.items()}
    assert sum(om.offset for om in committed.values()) == 20
