"""What the failure tests share: a fleet's input, a paced feeder, daemons as child processes, and the reference.

The reference is the uninterrupted run: the same records through the same Daemon in this process, with an
in-memory source and sink. Streams are independent of one another (nothing here compares streams), so the
order in which Kafka interleaves partitions does not change any stream's windows, scores or alerts.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from consumers.base import Record
from consumers.memory import IterSource, ListSink
from detector.artifact import load_artifact
from detector.config import load_config
from detector.daemon import Daemon
from detector.pipeline import Pipeline
from tests.helpers import FEATURES, sine_values
from tests.kafka_broker import KAFKA_SH, READY_LINE, free_ports
from tests.test_daemon_kafka import committed

T0 = 1_700_000_000.0
T = TypeVar("T")


def fleet(streams: int, readings: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) of every reading of `streams` machines in time order; about one in eight is faulty."""
    rng = np.random.default_rng(seed)
    faulty = {int(s): int(rng.integers(readings // 4, readings * 3 // 4)) for s in range(0, streams, 8)}
    stuck = {s + 3: int(rng.integers(readings // 4, readings // 2)) for s in range(0, streams, 16)}
    values = {}
    for s in range(streams):
        v = sine_values(readings, seed=1000 + s, phase=3 * s).astype(float)
        if s in faulty:
            v[faulty[s]:, 2] += 2.5
        if s in stuck:
            v[stuck[s]: stuck[s] + 80, 0] = 51.125
        values[s] = v
    out = []
    for t in range(readings):
        for s in range(streams):
            body = {"stream": f"m{s}", "ts": T0 + 60 * t, "values": dict(zip(FEATURES, values[s][t].tolist(),
                                                                             strict=True))}
            out.append((f"m{s}".encode(), orjson.dumps(body)))
    return out


class Feeder(threading.Thread):
    """Produces items to a topic at about `rate` records per second; `done` is set when all are acknowledged.

    `limit` holds it back, so that a test schedules its faults by how much of the input exists rather than by
    time: it sends items[:limit], flushes them, sets `held` and waits until allow() raises the limit (pacing
    starts again from there, without a burst to catch up). `sent` bounds what was produced: no item past it has
    been handed to the producer yet.
    """

    def __init__(self, bootstrap: str, topic: str, items: list[tuple[bytes, bytes | None]], rate: float,
                 extra: dict | None = None, limit: int | None = None, hold_timeout_s: float = 600.0) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.items, self.rate = bootstrap, topic, items, rate
        self.extra = extra or {}
        self.limit = len(items) if limit is None else min(limit, len(items))
        self.hold_timeout_s = hold_timeout_s
        self.done = threading.Event()
        self.held = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None
        self._raised = threading.Condition()

    def allow(self, n: int) -> None:
        """Let it send up to item n (never fewer than already allowed, never past the end)."""
        with self._raised:
            self.limit = max(self.limit, min(n, len(self.items)))
            self.held.clear()
            self._raised.notify_all()

    def run(self) -> None:
        """Send in slices of 1/20 s, pacing to the rate, holding at the limit."""
        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                     linger_ms=5, **self.extra)
            step = max(int(self.rate / 20), 1)
            i, t0, first = 0, time.monotonic(), 0
            while i < len(self.items):
                if i >= self.limit:
                    producer.flush()
                    with self._raised:
                        if i >= self.limit:  # allow() clears `held` under this lock
                            self.held.set()
                        if not self._raised.wait_for(lambda: i < self.limit, self.hold_timeout_s):  # noqa: B023
                            raise AssertionError(f"feeder held at {i} of {len(self.items)} for "
                                                 f"{self.hold_timeout_s:g} s")
                    t0, first = time.monotonic(), i
                end = self.sent = min(i + step, self.limit)
                for key, value in self.items[i:end]:
                    producer.send(self.topic, key=key, value=value)
                i = end
                ahead = t0 + (i - first) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            producer.flush()
            producer.close()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()


STARTED: list[DaemonProc] = []
"""Every DaemonProc started; a fixture (tests/conftest.py) kills those a failed test left running."""


def kill_leftovers() -> int:
    """SIGKILL every started daemon still running; how many there were."""
    alive = [d for d in STARTED if d.alive()]
    for d in alive:
        d.kill()
    STARTED.clear()
    return len(alive)


@dataclass
class DaemonProc:
    """`detector run` as a child process, its output in a log file."""

    config: Path
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    env: dict = field(default_factory=dict)

    def start(self) -> DaemonProc:
        """Start it (appending to the log)."""
        STARTED.append(self)
        self.starts += 1
        with self.log.open("a") as f:
            f.write(f"\n===== start {self.starts} =====\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "detector", "run", "--config", str(self.config)],
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to flush or commit anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, and its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        """Still running."""
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        """Everything it logged."""
        return self.log.read_text(errors="replace")


def read_all(bootstrap: str, topic: str, isolation: str = "read_committed", timeout_s: float = 120.0) -> list:
    """Every record of a topic, from the beginning up to its end offsets (read_committed: the last stable ones)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             isolation_level=isolation)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise AssertionError(f"read {len(out)} records of {topic} in {timeout_s:g} s, not up to {ends}")
            for batch in consumer.poll(timeout_ms=200).values():
                out.extend(batch)
        return out
    finally:
        consumer.close()


def total_committed(bootstrap: str, group: str, topic: str) -> int:
    """Sum of the group's committed offsets on a topic."""
    return sum(committed(bootstrap, group, topic).values())


def wait_until(cond, timeout_s: float, what: str, check=None) -> None:
    """Poll `cond` every 0.2 s until true; `check` runs each time (e.g. asserts a process is alive)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


def daemon_tracebacks(text: str) -> list[str]:
    """The tracebacks in a daemon log, less kafka-python's own report of a connection that went away mid-read.

    When a broker dies mid-read, kafka-python logs "Error receiving network data closing socket" at ERROR with
    the ConnectionResetError's traceback, then reconnects; when a client is closed while its I/O loop still has
    a read pending (the daemon force-closes a producer whose transactional request was lost), the same report
    carries an AttributeError from the socket already set to None; and when a connection drops while it is being
    set up (a broker coming back), kafka-python logs "Failed to build connection log_prefix" with the OSError of
    `getpeername()`, then goes on without the prefix (docs/kafka.md). None is a failure of the daemon. Anything
    else is.
    """
    lines, found = text.splitlines(), []
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last):"):
            continue
        end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")), len(lines) - 1)
        socket_reset = (i > 0 and " ERROR kafka.net." in lines[i - 1]
                        and (lines[end].startswith(("ConnectionResetError", "BrokenPipeError"))
                             or lines[end] == "AttributeError: 'NoneType' object has no attribute 'recv'"
                             or (lines[i - 1].endswith("Failed to build connection log_prefix")
                                 and lines[end].startswith("OSError: [Errno 107]"))))
        if not socket_reset:
            found.append("\n".join(lines[max(i - 1, 0): end + 1]))
    return found


@dataclass
class Outcome:
    """Alerts and window scores of a run."""

    alerts: list[dict]
    scores: dict[tuple[str, float], list[float]]

    @staticmethod
    def from_records(alert_values: list[bytes], score_values: list[bytes]) -> Outcome:
        """From the values read off the alerts and scores topics."""
        scores: dict[tuple[str, float], list[float]] = {}
        for v in score_values:
            s = orjson.loads(v)
            scores.setdefault((s["stream"], s["end"]), []).append(s["score"])
        return Outcome([orjson.loads(v) for v in alert_values], scores)


def reference(config: Path, items: list[tuple[bytes, bytes | None]]) -> Outcome:
    """The uninterrupted run of the same input through the same Daemon, in this process."""
    cfg = load_config(config)
    art = load_artifact(cfg.model.path, "cpu")
    daemon = Daemon(cfg, Pipeline(cfg, art, "cpu"))
    records = [Record("in", 0, i, k, v, 0) for i, (k, v) in enumerate(items)]
    src, sink = IterSource(records, batch_size=cfg.input.max_poll_records), ListSink()
    while not src.exhausted:
        batch = src.poll_batch(0)
        if batch:
            daemon.process(batch, src, sink)
    daemon.commit(src, sink)
    return Outcome.from_records([r.value for r in sink.on(cfg.output.alerts_topic)],
                                [r.value for r in sink.on(cfg.output.scores_topic or "")])


def identity(alert: dict) -> tuple:
    """What must be the same for an alert in two runs over the same input (offsets and float noise aside)."""
    return (alert["alert_id"], alert["kind"], alert["state"], alert["stream"], alert.get("window_end"),
            alert.get("severity"))


class RestartableBroker:
    """A single-node KRaft broker that can be killed and started again on the same ports and data.

    tests/kafka_broker.py's broker picks new ports and a new folder on every start; a broker that comes back
    must keep both, as a real one does after a crash or a network outage. `ports` (client, controller) and
    `env` (more kafka.sh variables: KAFKA_NODE_ID, KAFKA_QUORUM_VOTERS, ...) make it one node of a cluster.
    """

    def __init__(self, ports: tuple[int, int] | None = None, env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kafka-restartable-"))
        self.port, self.controller_port = ports or free_ports(2)
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.env = env or {}
        self._proc: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start (or start again) the broker process, without waiting for it."""
        env = {**os.environ, "KAFKA_PORT": str(self.port), "KAFKA_CONTROLLER_PORT": str(self.controller_port),
               "KAFKA_DATA_DIR": str(self.dir / "data"), "KAFKA_PDEATHSIG": "TERM"}
        for name in ("KAFKA_EXTRA_LISTENERS", "KAFKA_EXTRA_PROPERTIES", "KAFKA_FORMAT_ARGS", *CLUSTER_VARS):
            env.pop(name, None)
        env.update(self.env)
        (self.dir / "server.log").unlink(missing_ok=True)
        with (self.dir / "kafka.out").open("ab") as out:
            self._proc = subprocess.Popen(["bash", str(KAFKA_SH), "run", str(self.dir)], env=env,
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Wait for the broker's "Kafka Server started" line (AssertionError if it exits or takes too long)."""
        assert self._proc is not None, "launch() first"
        log = self.dir / "server.log"
        deadline = time.monotonic() + timeout_s
        while not (log.exists() and READY_LINE in log.read_text(errors="replace")):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"broker did not start (exit {self._proc.poll()}); see {self.dir}")
            time.sleep(0.2)

    def start(self, timeout_s: float = 90.0) -> None:
        """Start (or start again) and wait until it accepts connections."""
        self.launch()
        self.wait_ready(timeout_s)

    def alive(self) -> bool:
        """The broker process runs."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the broker: connections are refused until it starts again."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM the broker's process group, without waiting."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 60.0) -> None:
        """A clean shutdown, as in a rolling restart: SIGTERM and wait (SIGKILL if it takes longer)."""
        self.terminate()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """Stop it for good and delete its data."""
        if self._proc is not None and self._proc.poll() is None:
            self.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


CLUSTER_VARS = ("KAFKA_NODE_ID", "KAFKA_QUORUM_VOTERS", "KAFKA_CLUSTER_ID", "KAFKA_REPLICATION", "KAFKA_MIN_ISR")


class KafkaCluster:
    """A KRaft cluster of `size` nodes on 127.0.0.1, each broker and controller, each killable and restartable.

    Node ids are 1..size; every node has its own client and controller port and its own data folder, and keeps
    them across kill() and start_node(). Topics default to replication `size` with min.insync.replicas size-1.

        cluster = KafkaCluster(3)
        cluster.start()
        leader = partition_leader(cluster.bootstrap, "readings", 0)
        cluster.kill(leader)
        cluster.start_node(leader)
        cluster.close()
    """

    def __init__(self, size: int = 3, heap_opts: str = "-Xms128m -Xmx384m") -> None:
        ports = free_ports(2 * size)
        clients, controllers = ports[:size], ports[size:]
        voters = ",".join(f"{i + 1}@127.0.0.1:{p}" for i, p in enumerate(controllers))
        cluster_id = ""
        while not cluster_id or cluster_id.startswith("-"):  # as kafka.sh's cluster_id: no leading dash
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.nodes = {
            i + 1: RestartableBroker((clients[i], controllers[i]),
                                     {"KAFKA_NODE_ID": str(i + 1), "KAFKA_QUORUM_VOTERS": voters,
                                      "KAFKA_CLUSTER_ID": cluster_id, "KAFKA_REPLICATION": str(size),
                                      "KAFKA_HEAP_OPTS": heap_opts})
            for i in range(size)}
        self.bootstrap = ",".join(n.bootstrap for n in self.nodes.values())

    @property
    def live_bootstrap(self) -> str:
        """The addresses of the nodes whose process runs (for the tests' own clients while a node is down)."""
        return ",".join(n.bootstrap for n in self.nodes.values() if n.alive())

    def start(self, timeout_s: float = 120.0) -> None:
        """Start every node together (a node is ready only once a quorum of controllers is up), wait for all."""
        for node in self.nodes.values():
            node.launch()
        deadline = time.monotonic() + timeout_s
        for node in self.nodes.values():
            node.wait_ready(max(deadline - time.monotonic(), 1.0))

    def kill(self, node: int) -> None:
        """SIGKILL one node's process group."""
        self.nodes[node].kill()

    def start_node(self, node: int, timeout_s: float = 90.0) -> None:
        """Start a killed node again on its ports and data, and wait until it is ready."""
        self.nodes[node].start(timeout_s)

    def close(self) -> None:
        """Stop every node and delete their data (SIGTERM to all at once: a last node alone has no quorum)."""
        for node in self.nodes.values():
            node.terminate()
        for node in self.nodes.values():
            node.close()


def retrying(call: Callable[[], T], timeout_s: float = 30.0) -> T:
    """`call()`, tried again on Kafka errors for up to timeout_s.

    While a node is down, kafka-python's admin client sends a request to a node picked at random from the
    metadata, the dead one included until the controller fences it (broker.session.timeout.ms, 9 s), and
    raises KafkaConnectionError instead of trying another.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def partitions(bootstrap: str, topic: str) -> dict[int, dict]:
    """A topic's partitions as the cluster's metadata has them: index -> {"leader_id", "replica_nodes", "isr_nodes"}."""

    def describe() -> dict:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tests-admin")
        try:
            (described,) = admin.describe_topics([topic])
        finally:
            admin.close()
        return described

    return {p["partition_index"]: p for p in retrying(describe)["partitions"]}


def partition_leader(bootstrap: str, topic: str, partition: int) -> int:
    """The node id of a partition's leader (-1 while it has none)."""
    return int(partitions(bootstrap, topic)[partition]["leader_id"])
