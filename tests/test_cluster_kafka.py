"""Failure test 3: a broker of a 3-node KRaft cluster dies mid-run and comes back; nothing is lost.

The killed node leads input partition 0 and alerts partition 0 (and the other topics' partition 0). In two of
the cases it also coordinates the daemon's consumer group and its transactional id, so every role the daemon
depends on fails over at once. Replication 3, min.insync.replicas 2, so acks=all writes go on with the two nodes
left. Slow (a cluster of three JVMs): `make test-cluster` runs it, `make test` does not (pyproject's addopts
deselect the `cluster` marker). docs/reliability.md has the figures.
"""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaError

from tests.kafka_broker import create_topic
from tests.reliability import (
    DaemonProc,
    Feeder,
    KafkaCluster,
    Outcome,
    daemon_tracebacks,
    fleet,
    partition_leader,
    partitions,
    reference,
    retrying,
    total_committed,
    wait_until,
)
from tests.test_daemon_kafka import model_dir  # noqa: F401 (fixture)
from tests.test_reliability_kafka import compare, outcome, write_config

pytestmark = [pytest.mark.kafka, pytest.mark.cluster]

NODES = 3
TOPICS = {"input": 4, "alerts": 2, "dlq": 1, "scores": 4}
OUTAGE_S = 15.0  # the node stays down at least this long ...
OUTAGE_MAX_S = 90.0  # ... and longer, up to this, until the daemon has shown what the case expects of it


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    """Three nodes, each broker and controller, for the module's tests."""
    c = KafkaCluster(NODES)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def references() -> dict[str, Outcome]:
    """The uninterrupted run of the tests' fleet, per guarantee, computed once for the module (about 20 s each)."""
    return {}


def java_hash(s: str) -> int:
    """Java's String.hashCode (UTF-16 code units), as Kafka hashes group and transactional ids."""
    h = 0
    for unit in range(0, len(b := s.encode("utf-16-be")), 2):
        h = (31 * h + int.from_bytes(b[unit : unit + 2], "big")) & 0xFFFFFFFF
    return h - (1 << 32) if h & 0x80000000 else h


def leaders(bootstrap: str, topic: str) -> list[int]:
    """The leader node of each partition of a topic, by partition."""
    parts = partitions(bootstrap, topic)
    return [int(parts[p]["leader_id"]) for p in sorted(parts)]


def coordinator(key: str, internal_leaders: list[int]) -> int:
    """The node that coordinates `key`: the leader of its partition of __consumer_offsets or __transaction_state."""
    h = java_hash(key)
    return internal_leaders[(0 if h == -(1 << 31) else abs(h)) % len(internal_leaders)]


def internal_topics(bootstrap: str) -> tuple[list[int], list[int]]:
    """The leaders of __consumer_offsets and __transaction_state, which the cluster creates on their first use."""
    total_committed(bootstrap, f"warm-{uuid.uuid4().hex}", "none")
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"warm-{uuid.uuid4().hex}")
    producer.init_transactions()
    producer.close()
    for topic in ("__consumer_offsets", "__transaction_state"):
        wait_until(lambda: (ls := leaders(bootstrap, topic)) and min(ls) >= 0, 60, f"{topic} to have leaders")  # noqa: B023
    return leaders(bootstrap, "__consumer_offsets"), leaders(bootstrap, "__transaction_state")


def victim_and_group(groups: list[int], transactions: list[int], pick: int,
                     coordinating: bool) -> tuple[int, str, str]:
    """The node to kill, a new group id and a member suffix: the node coordinates both, or neither.

    The transactional id is "<group>-tx<member>", as write_config makes it. Nodes are tried from the `pick`-th
    on; a node that leads no partition of __consumer_offsets or __transaction_state (one killed and started
    again earlier) cannot coordinate.
    """
    nodes = list(range(1, NODES + 1))
    for node in nodes[pick % NODES:] + nodes[: pick % NODES]:
        for _ in range(200):
            group = f"g-{uuid.uuid4().hex}"
            if (coordinator(group, groups) == node) != coordinating:
                continue
            for member in map(str, range(100)):
                if (coordinator(f"{group}-tx{member}", transactions) == node) == coordinating:
                    return node, group, member
    raise AssertionError(f"no node to kill (coordinating: {coordinating}); leaders {groups}, {transactions}")


def replicas_led_by(node: int, count: int) -> list[list[int]]:
    """Replica lists (leader first) for `count` partitions: partition 0 led by `node`, the others in turn."""
    nodes = [node, *(n for n in range(1, NODES + 1) if n != node)]
    return [nodes[p % NODES:] + nodes[: p % NODES] for p in range(count)]


def commits(port: int) -> float | None:
    """The daemon's detector_commits_total, read off its metrics endpoint (None when it does not answer)."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    found = re.search(r"^detector_commits_total (\S+)$", body, re.M)
    return float(found.group(1)) if found else None


def tail(text: str, n: int = 40) -> str:
    """The last n lines of a daemon log, less kafka-python's per-connection noise."""
    noise = (" kafka.net.", "Marking the coordinator dead", "No node available", "Metadata refresh")
    kept = [x for x in text.splitlines() if x.startswith(("20", "=====")) and not any(w in x for w in noise)]
    return "\n".join(kept[-n:])


CASES = [
    # the case: the node leads input[0] and alerts[0]; the group and transaction coordinators are elsewhere
    pytest.param("exactly_once", False, 0, id="exactly_once-leader"),
    # the worst case: the node also coordinates the daemon's consumer group and its transactional id
    pytest.param("exactly_once", True, 1, id="exactly_once-leader-and-coordinators"),
    pytest.param("at_least_once", True, 2, id="at_least_once-leader-and-coordinator"),
]


@pytest.mark.parametrize(("guarantee", "coordinating", "pick"), CASES)  # pick: another node to kill in each case
def test_leader_of_input_and_alerts_killed_and_back_loses_nothing(cluster: KafkaCluster, model_dir: Path,  # noqa: F811
                                                                  tmp_path: Path, guarantee: str, coordinating: bool,
                                                                  pick: int, references: dict[str, Outcome],
                                                                  record_property) -> None:
    t_start = time.monotonic()
    groups, transactions = internal_topics(cluster.bootstrap)
    victim, group, member = victim_and_group(groups, transactions, pick, coordinating)
    names = {k: f"{k}-{uuid.uuid4().hex[:8]}" for k in TOPICS}
    for key, count in TOPICS.items():
        create_topic(cluster.bootstrap, names[key], count, {"min.insync.replicas": 2},
                     replicas=replicas_led_by(victim, count))
    cfg = write_config(tmp_path / "c.yaml", cluster.bootstrap, names, group, model_dir, guarantee, member=member,
                       delivery="state_replication: 3")
    # The daemon's default transaction timeout (60 s), not the other tests' 10 s: a transaction open at the kill waits
    # for the ~10 s failover, and 10 s would race it (the broker aborting it is test 5's subject, not this one's).
    cfg.write_text(cfg.read_text().replace("transaction_timeout_ms: 10000", "transaction_timeout_ms: 60000"))
    items = fleet(50, 1200, seed=6)  # 60,000 readings, fed at 2,000/s: 30 s
    if guarantee not in references:
        references[guarantee] = reference(cfg, items)
    ref = references[guarantee]
    port = int(re.search(r"metrics: \{port: (\d+)\}", cfg.read_text()).group(1))  # type: ignore[union-attr]
    daemon = DaemonProc(cfg, tmp_path / "daemon.log").start()
    try:
        # feed only once the daemon owns the input, so that the kill lands mid-feed however slow its start-up
        wait_until(lambda: "rebalance: 4 partitions assigned" in daemon.text(), 120, "the daemon to own the input",
                   lambda: None if daemon.alive() else pytest.fail(daemon.text()))
        # and held at half the input until the kill, so that readings are still to come when the node dies
        feeder = Feeder(cluster.bootstrap, names["input"], items, rate=2000, limit=len(items) // 2)
        feeder.start()

        def alive() -> None:
            assert daemon.alive(), daemon.text()
            assert feeder.error is None, feeder.error

        def committed_now() -> int | None:
            """Committed input offsets; None while they cannot be read (a dead node in the admin's metadata)."""
            try:
                return total_committed(cluster.live_bootstrap, group, names["input"]) or None
            except KafkaError:
                return None

        def progress() -> int:
            """Committed input offsets; 0 while they cannot be read."""
            return committed_now() or 0

        wait_until(lambda: progress() > len(items) // 4, 180, "a quarter committed", alive)
        state = partitions(cluster.bootstrap, f"{group}-state")
        assert all(len(p["replica_nodes"]) == NODES for p in state.values()), state
        roles = {"input[0]": partition_leader(cluster.bootstrap, names["input"], 0),
                 "alerts[0]": partition_leader(cluster.bootstrap, names["alerts"], 0),
                 "group": coordinator(group, leaders(cluster.bootstrap, "__consumer_offsets")),
                 "transactions": coordinator(f"{group}-tx{member}", leaders(cluster.bootstrap, "__transaction_state"))}
        held = {role for role, node in roles.items() if node == victim}
        assert held == ({"input[0]", "alerts[0]", "group", "transactions"} if coordinating
                        else {"input[0]", "alerts[0]"}), f"node {victim} before the kill: {roles}"

        # 1. SIGKILL the node; the daemon goes on with the other two. Offsets committed past every reading sent
        # before the kill were committed after it: a commit in flight at the kill cannot count.
        at_kill, commits_at_kill = committed_now(), commits(port)
        assert at_kill, "the committed offsets are readable before the kill"
        assert commits_at_kill is not None, daemon.text()
        cluster.kill(victim)
        killed_at, sent_at_kill = time.monotonic(), feeder.sent
        feeder.allow(len(items))
        stalls = guarantee == "exactly_once" and coordinating  # it cannot commit while its coordinator is away
        failover_s, samples, commit_counts = None, [], []
        most = at_kill

        def shown() -> bool:
            return failover_s is not None and feeder.sent > sent_at_kill and (stalls or most > sent_at_kill)

        while (down := time.monotonic() - killed_at) < OUTAGE_S or (not shown() and down < OUTAGE_MAX_S):
            alive()
            samples.append((round(down, 1), committed_now()))
            most = max(most, samples[-1][1] or 0)
            commit_counts.append(commits(port) or 0.0)
            if failover_s is None and partition_leader(cluster.live_bootstrap, names["input"], 0) not in (victim, -1):
                failover_s = time.monotonic() - killed_at
            time.sleep(0.5)
        resumed_s = next((t for t, n in samples if n is not None and n > sent_at_kill), None)
        assert failover_s is not None, f"input[0] got no new leader within {OUTAGE_MAX_S:g} s"
        # With its transaction coordinator gone, an exactly_once daemon cannot commit until a new coordinator
        # serves its transactional id, and kafka-python 3.0.12 drops the request that was in flight: the daemon
        # replaces its producer after a request timeout (35 s here) and resumes from its last commit, after
        # the outage. Every other case commits while the node is down.
        assert stalls or (max(commit_counts) > commits_at_kill and most > sent_at_kill), (
            f"no commit in the {down:.0f} s node {victim} was down ({roles}): {commits_at_kill:g} commits before "
            f"the kill, {max(commit_counts):g} at most after; input offsets committed {at_kill} before the kill, "
            f"{sent_at_kill} readings sent at it, then (s, committed; None: unreadable) {samples}\n"
            f"{tail(daemon.text())}")
        assert sent_at_kill < len(items) and feeder.sent > sent_at_kill, "readings kept arriving during the outage"

        # 2. the node comes back on its ports and data and catches up
        back_at = time.monotonic()
        cluster.start_node(victim)
        restart_s = time.monotonic() - back_at
        wait_until(lambda: all(victim in partitions(cluster.bootstrap, names[k])[0]["isr_nodes"]
                               for k in ("input", "alerts")), 120, f"node {victim} back in sync", alive)
        in_sync_s = time.monotonic() - back_at

        feeder.join(180)
        assert feeder.error is None, feeder.error
        wait_until(lambda: progress() == len(items), 180, "everything committed", alive)
        assert daemon.stop() == 0, daemon.text()
    finally:
        if daemon.alive():  # a daemon stuck on Kafka does not outlive the test
            daemon.kill()
        if not cluster.nodes[victim].alive():  # the next test gets the whole cluster
            cluster.start_node(victim)
    text = daemon.text()
    dups = compare(retrying(lambda: outcome(cluster.bootstrap, names)), ref, guarantee == "exactly_once",
                   restarts=1)
    assert not daemon_tracebacks(text), "\n\n".join(daemon_tracebacks(text))
    figures = {"failover_s": round(failover_s, 1), "commits_resumed_s": resumed_s, "committed_at_kill": at_kill,
               "committed_while_down": most - at_kill, "commits_while_down": max(commit_counts) - commits_at_kill,
               "restart_s": round(restart_s, 1),
               "back_in_sync_s": round(in_sync_s, 1), "producers_replaced": text.count("starting a new producer"),
               "rebalances": len(re.findall(r"rebalance: \d+ partitions assigned", text)),
               "socket_reset_tracebacks": text.count("Traceback"), "total_s": round(time.monotonic() - t_start),
               **dups}
    record_property("figures", figures)
    print(f"\n{guarantee}: killed node {victim} ({roles}) at {sent_at_kill} of {len(items)} sent; {figures}")
