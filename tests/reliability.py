"""What the failure tests share: a fleet's input, a paced feeder, daemons as child processes, and the reference.

The reference is the uninterrupted run: the same records through the same Daemon in this process, with an
in-memory source and sink. Streams are independent of one another (nothing here compares streams), so the
order in which Kafka interleaves partitions does not change any stream's windows, scores or alerts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

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
    """Produces items to a topic at about `rate` records per second; `done` is set when all are acknowledged."""

    def __init__(self, bootstrap: str, topic: str, items: list[tuple[bytes, bytes | None]], rate: float,
                 extra: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.items, self.rate = bootstrap, topic, items, rate
        self.extra = extra or {}
        self.done = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        """Send in slices of 1/20 s, pacing to the rate."""
        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                     linger_ms=5, **self.extra)
            t0 = time.monotonic()
            step = max(int(self.rate / 20), 1)
            for i in range(0, len(self.items), step):
                for key, value in self.items[i : i + step]:
                    producer.send(self.topic, key=key, value=value)
                self.sent = i + step
                ahead = t0 + (i + step) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            producer.flush()
            producer.close()
            self.sent = len(self.items)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.done.set()


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


def read_all(bootstrap: str, topic: str, isolation: str = "read_committed", idle_s: float = 3.0) -> list:
    """Every record of a topic, from the beginning, until it has been quiet for idle_s."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             isolation_level=isolation, consumer_timeout_ms=int(idle_s * 1000))
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in parts]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out = list(consumer)
    consumer.close()
    return out


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
    must keep both, as a real one does after a crash or a network outage.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kafka-restartable-"))
        self.port, self.controller_port = free_ports(2)
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        """Start (or start again) and wait until it accepts connections."""
        env = {**os.environ, "KAFKA_PORT": str(self.port), "KAFKA_CONTROLLER_PORT": str(self.controller_port),
               "KAFKA_DATA_DIR": str(self.dir / "data"), "KAFKA_PDEATHSIG": "TERM"}
        for name in ("KAFKA_EXTRA_LISTENERS", "KAFKA_EXTRA_PROPERTIES", "KAFKA_FORMAT_ARGS"):
            env.pop(name, None)
        log = self.dir / "server.log"
        log.unlink(missing_ok=True)
        with (self.dir / "kafka.out").open("ab") as out:
            self._proc = subprocess.Popen(["bash", str(KAFKA_SH), "run", str(self.dir)], env=env,
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not (log.exists() and READY_LINE in log.read_text(errors="replace")):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"broker did not start (exit {self._proc.poll()}); see {self.dir}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the broker: connections are refused until it starts again."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=30)

    def close(self) -> None:
        """Stop it for good and delete its data."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
