"""A real single-node Apache Kafka broker (KRaft) for the integration tests, run by deploy/kafka/kafka.sh.

    with KafkaBroker() as broker:
        create_topic(broker.bootstrap, "readings", partitions=4)

The broker is `kafka.sh run DIR` (it formats the storage, then execs java), a child of this process in a
process group of its own, on two free ports of 127.0.0.1, with its state, log and data in a temporary folder.

Extra client listeners (e.g. SASL_SSL, each on one more free port), server properties and StorageTool format
arguments pass through to kafka.sh (KAFKA_EXTRA_LISTENERS, KAFKA_EXTRA_PROPERTIES, KAFKA_FORMAT_ARGS); see
tests/kafka_security.py. Without them the broker is exactly the plain one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kafka import KafkaAdminClient

KAFKA_SH = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "kafka.sh"
READY_LINE = "Kafka Server started"


class KafkaBrokerError(RuntimeError):
    """The broker could not be fetched or did not start; the message carries the tail of its log."""


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (the sockets are held open together: no port comes twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    if not text:
        return ""
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


class KafkaBroker:
    """A broker for the duration of start() .. stop(); `bootstrap` is "127.0.0.1:PORT" while it runs.

    `extra_listeners` names more client listeners ("SASL_SSL", "SSL", ...; see kafka.sh KAFKA_EXTRA_LISTENERS), each
    on a free port of 127.0.0.1: `listeners[name]` is its "127.0.0.1:PORT" while the broker runs. `extra_properties`
    is appended to server.properties (a key there overrides the generated one); `format_args` go to StorageTool
    format (e.g. `--add-scram SCRAM-SHA-512=[name=alice,password=...]`; no whitespace inside an argument).
    """

    def __init__(self, start_timeout: float = 120.0, heap_opts: str = "-Xms256m -Xmx512m",
                 keep_dir: bool = False, *, extra_listeners: Sequence[str] = (), extra_properties: str = "",
                 format_args: Sequence[str] = ()) -> None:
        self.start_timeout = start_timeout
        self.heap_opts = heap_opts
        self.keep_dir = keep_dir or bool(os.environ.get("KAFKA_KEEP_DIR"))
        if any(not a or any(c.isspace() for c in a) for a in format_args):
            raise ValueError("format_args: an argument is empty or holds whitespace (kafka.sh splits on whitespace)")
        self.extra_listeners = list(extra_listeners)
        self.extra_properties = extra_properties
        self.format_args = list(format_args)
        self.bootstrap: str | None = None
        self.listeners: dict[str, str] = {}
        self.dir: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path | None:
        """The broker's server.log (None before start)."""
        return self.dir / "server.log" if self.dir else None

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def fetch() -> None:
        """The broker's jars (Maven; a no-op once deploy/kafka/lib/ is complete)."""
        done = subprocess.run(["bash", str(KAFKA_SH), "fetch"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise KafkaBrokerError(f"`{KAFKA_SH} fetch` failed (exit {done.returncode}):\n"
                                   f"{done.stdout}{done.stderr}")

    def start(self) -> KafkaBroker:
        if self._proc is not None:
            return self
        self.fetch()
        for attempt in range(2):
            try:
                self._start_once()
                break
            except KafkaBrokerError as e:
                # Another process may have taken a port between our probe and the broker's bind: once more.
                if attempt == 0 and ("Address already in use" in str(e) or "BindException" in str(e)):
                    continue
                raise
        atexit.register(self.stop)
        return self

    def _start_once(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kafka-broker-"))
        port, controller_port, *extra_ports = free_ports(2 + len(self.extra_listeners))
        env = {**os.environ, "KAFKA_PORT": str(port), "KAFKA_CONTROLLER_PORT": str(controller_port),
               "KAFKA_DATA_DIR": str(self.dir / "data"), "KAFKA_HEAP_OPTS": self.heap_opts,
               "KAFKA_PDEATHSIG": "TERM"}  # a killed test run takes its broker with it
        for name in ("KAFKA_EXTRA_LISTENERS", "KAFKA_EXTRA_PROPERTIES", "KAFKA_FORMAT_ARGS"):
            env.pop(name, None)  # only what this broker was given
        listeners = {name: f"127.0.0.1:{p}" for name, p in zip(self.extra_listeners, extra_ports, strict=True)}
        if listeners:
            env["KAFKA_EXTRA_LISTENERS"] = ",".join(f"{name}://{addr}" for name, addr in listeners.items())
        if self.extra_properties:
            extra = self.dir / "extra.properties"
            extra.write_text(self.extra_properties)
            extra.chmod(0o600)
            env["KAFKA_EXTRA_PROPERTIES"] = str(extra)
        if self.format_args:
            env["KAFKA_FORMAT_ARGS"] = " ".join(self.format_args)
        t0 = time.monotonic()
        with (self.dir / "kafka.out").open("wb") as out:
            self._proc = subprocess.Popen(["bash", str(KAFKA_SH), "run", str(self.dir)], env=env,
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        log = self.dir / "server.log"
        deadline = t0 + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                why = f"the broker exited during startup (exit {self._proc.returncode})"
                break
            if log.exists() and READY_LINE in log.read_text(errors="replace") and _accepts(port):
                self.bootstrap = f"127.0.0.1:{port}"
                self.listeners = listeners
                self.startup_seconds = time.monotonic() - t0
                return
            if time.monotonic() > deadline:
                why = (f"the broker did not accept connections on 127.0.0.1:{port} "
                       f"within {self.start_timeout:g}s")
                break
            time.sleep(0.1)
        details = "\n".join(t for t in (_tail(log), _tail(self.dir / "kafka.out")) if t)
        keep, self.keep_dir = self.keep_dir, True  # leave the logs for a look
        self.stop()
        self.keep_dir = keep
        raise KafkaBrokerError(f"{why}; state and logs in {self.dir}\n{details}")

    def stop(self, timeout: float = 20.0) -> None:
        """End the broker's process group (SIGTERM, then SIGKILL after `timeout` s) and delete its folder."""
        proc, self._proc = self._proc, None
        self.bootstrap = None
        self.listeners = {}
        if proc is not None:
            atexit.unregister(self.stop)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def create_topic(bootstrap: str, name: str, partitions: int, config: Mapping[str, object] | None = None,
                 timeout_s: float = 30.0, *, replicas: Sequence[Sequence[int]] | None = None) -> str:
    """Create `name` and wait until every partition has a leader; return the name.

    Replication factor 1, or `replicas`: each partition's replica node ids, its preferred leader first (a cluster).
    """
    spec: dict[str, object] = {"num_partitions": partitions, "replication_factor": 1,
                               "configs": {k: str(v) for k, v in (config or {}).items()}}
    if replicas is not None:
        if len(replicas) != partitions:
            raise ValueError(f"replicas names {len(replicas)} partitions, not {partitions}")
        spec.update(num_partitions=-1, replication_factor=-1,
                    assignments={p: list(nodes) for p, nodes in enumerate(replicas)})
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tests-admin")
    try:
        admin.create_topics({name: spec}, timeout_ms=int(timeout_s * 1000))
        admin.wait_for_topics([name], timeout_ms=int(timeout_s * 1000))
    finally:
        admin.close()
    return name


def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Delete topics, best effort (for tests that run against a long-lived broker)."""
    if not names:
        return
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tests-admin")
    try:
        with contextlib.suppress(Exception):
            admin.delete_topics(names)
    finally:
        admin.close()
