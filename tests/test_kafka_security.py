"""The daemon against a real broker's SASL_SSL listener: TLS from a test CA, SCRAM-SHA-512 and PLAIN, bad passwords.

One broker for the module (tests/kafka_security.py): its SASL_SSL listener requires a client certificate and offers
PLAIN and SCRAM-SHA-512 for user alice, whose password is random per run and reaches the daemon only through the
environment variable KAFKA_PASSWORD, referenced in the YAML as ${KAFKA_PASSWORD}. Topics are created over the
broker's PLAINTEXT listener; everything the daemon and the test's producer and consumer do goes over SASL_SSL.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from detector.artifact import save_artifact
from detector.train import Series, train_model
from tests.helpers import FEATURES, sine_values
from tests.kafka_broker import KafkaBroker, create_topic, free_ports
from tests.kafka_security import TlsFiles, make_tls_files, sasl_ssl_client, sasl_ssl_properties, scram_format_args
from tests.test_daemon_kafka import committed, end_offsets
from tests.test_pipeline import PARAMS, T0

pytestmark = pytest.mark.kafka

USER = "alice"
LISTENER = "SASL_SSL"
STREAMS, READINGS = 6, 300
FAULTY = {1: 180, 4: 200}  # stream -> first reading whose pressure is off by +2.5
REFUSED = {"SCRAM-SHA-512": "invalid credentials with SASL mechanism SCRAM-SHA-512",  # the broker's log, per mechanism
           "PLAIN": "Authentication failed: Invalid username or password"}


@dataclass(frozen=True)
class SecureKafka:
    """The module's broker: `plain` (PLAINTEXT, for creating topics) and `secure` (SASL_SSL) addresses."""

    plain: str
    secure: str
    tls: TlsFiles
    password: str
    log: Path

    def client(self, mechanism: str) -> dict[str, Any]:
        """kafka-python settings for user alice over SASL_SSL, with the client certificate."""
        return sasl_ssl_client(self.secure, self.tls, mechanism, USER, self.password)


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    tls = make_tls_files(tmp_path_factory.mktemp("tls"))
    users = {USER: secrets.token_urlsafe(24)}
    with KafkaBroker(extra_listeners=[LISTENER], extra_properties=sasl_ssl_properties(tls, users, LISTENER),
                     format_args=scram_format_args(users)) as broker:
        assert broker.bootstrap is not None and broker.log_path is not None
        yield SecureKafka(broker.bootstrap, broker.listeners[LISTENER], tls, users[USER], broker.log_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    series = Series(FEATURES, [f"s{i}" for i in range(6)], [sine_values(700, seed=100 + i, phase=7 * i)
                                                             for i in range(6)])
    model, manifest = train_model(series, PARAMS, progress=False)
    return save_artifact(tmp_path_factory.mktemp("model") / "m", model, manifest)


def topics(kafka: SecureKafka) -> tuple[str, str, str]:
    """New input (2 partitions), alerts and dead-letter topics."""
    return tuple(create_topic(kafka.plain, f"{prefix}-{uuid.uuid4().hex}", n)  # type: ignore[return-value]
                 for prefix, n in (("in", 2), ("alerts", 1), ("dlq", 1)))


def write_config(path: Path, kafka: SecureKafka, mechanism: str, topic: str, alerts: str, dlq: str, group: str,
                 model: Path, port: int) -> Path:
    """A daemon config for the SASL_SSL listener; the password is only a ${KAFKA_PASSWORD} reference."""
    path.write_text(f"""
kafka:
  bootstrap_servers: "{kafka.secure}"
  security_protocol: SASL_SSL
  sasl_mechanism: {mechanism}
  sasl_username: {USER}
  sasl_password: "${{KAFKA_PASSWORD}}"
  ssl_cafile: "{kafka.tls.ca}"
  ssl_certfile: "{kafka.tls.client_cert}"
  ssl_keyfile: "{kafka.tls.client_key}"
  connect_retry_max_s: 2
  connect_timeout_ms: 2000
input: {{topics: [{topic}], group_id: {group}, max_poll_records: 500}}
output: {{alerts_topic: {alerts}, dead_letter_topic: {dlq}}}
model: {{path: "{model}", device: cpu}}
alerts: {{k: 2, n: 3}}
metrics: {{port: {port}}}
""")
    return path


def start_daemon(cfg: Path, log: Path, password: str) -> subprocess.Popen:
    """`detector run --config cfg` with KAFKA_PASSWORD set, its output in `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KAFKA_PASSWORD": password}
    return subprocess.Popen([sys.executable, "-m", "detector", "run", "--config", str(cfg)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def stop_daemon(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def produce(client: dict[str, Any], topic: str) -> None:
    """READINGS readings of STREAMS streams; the FAULTY ones drift off in pressure."""
    producer = KafkaProducer(**client, acks="all", enable_idempotence=True, linger_ms=5)
    for s in range(STREAMS):
        v = sine_values(READINGS, seed=500 + s, phase=3 * s).astype(float)
        if s in FAULTY:
            v[FAULTY[s]:, 2] += 2.5
        for t in range(READINGS):
            body = {"stream": f"m{s}", "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v[t].tolist(), strict=True))}
            producer.send(topic, key=f"m{s}".encode(), value=orjson.dumps(body))
    producer.flush(timeout=30)
    producer.close()


def read_alerts(client: dict[str, Any], topic: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    """Every alert on the (one-partition) topic up to its end offset, read over SASL_SSL."""
    consumer = KafkaConsumer(**client, enable_auto_commit=False, group_id=None, auto_offset_reset="earliest")
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end:
            assert time.monotonic() < deadline, f"read {len(out)} of {end} alerts in {timeout_s} s"
            for batch in consumer.poll(timeout_ms=200).values():
                out += [orjson.loads(m.value) for m in batch]
        return out
    finally:
        consumer.close()


def wait_until(predicate: Any, timeout_s: float, text: Any) -> None:
    """Poll until predicate() holds; fail with text() when time runs out."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"gave up after {timeout_s} s:\n{text()}"
        time.sleep(0.3)


def wait_for(predicate: Any, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    """Poll until predicate() holds; fail with the daemon's log when it exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the daemon exited ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"gave up after {timeout_s} s:\n{log.read_text()}"
        time.sleep(0.3)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_daemon_consumes_and_alerts_over_sasl_ssl(secure_kafka: SecureKafka, mechanism: str, model_dir: Path,
                                                  tmp_path: Path) -> None:
    topic, alerts, dlq = topics(secure_kafka)
    produce(secure_kafka.client(mechanism), topic)
    group = f"g-{uuid.uuid4().hex}"
    cfg = write_config(tmp_path / "c.yaml", secure_kafka, mechanism, topic, alerts, dlq, group, model_dir,
                       free_ports(1)[0])
    assert secure_kafka.password not in cfg.read_text()
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log, secure_kafka.password)
    try:
        ends = end_offsets(secure_kafka.plain, topic, 2)
        assert sum(ends.values()) == STREAMS * READINGS
        wait_for(lambda: committed(secure_kafka.plain, group, topic) == ends, 90, proc, log)
    finally:
        rc = stop_daemon(proc)
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text, text
    assert secure_kafka.password not in text, "the password reached the log"
    assert f"connected to Kafka at {secure_kafka.secure}" in text, text
    assert "stopping: last batch flushed and committed" in text, text

    got = read_alerts(secure_kafka.client(mechanism), alerts)
    raised = {a["stream"] for a in got if a["state"] == "raised" and a["kind"] == "anomaly"}
    assert {f"m{s}" for s in FAULTY} <= raised, got
    assert len(raised - {f"m{s}" for s in FAULTY}) <= 1, f"healthy streams raised: {raised}"
    assert {a["input"]["topic"] for a in got} == {topic}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_a_wrong_password_is_retried_without_a_traceback_or_the_password_in_the_log(
        secure_kafka: SecureKafka, mechanism: str, model_dir: Path, tmp_path: Path) -> None:
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    broker_log_before = len(secure_kafka.log.read_text(errors="replace"))
    port = free_ports(1)[0]
    cfg = write_config(tmp_path / "c.yaml", secure_kafka, mechanism, "in", "alerts", "dlq", "g", model_dir, port)
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log, wrong)
    where = f"Kafka at {secure_kafka.secure}"

    def retry_lines() -> list[str]:
        return [line for line in log.read_text().splitlines() if "detector.daemon" in line and where in line]

    try:
        wait_for(retry_lines, 60, proc, log)
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert not_ready.value.code == 503
        assert proc.poll() is None, "the daemon keeps retrying"
    finally:
        rc = stop_daemon(proc)
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text, text
    assert wrong not in text and secure_kafka.password not in text, "a password reached the log"
    assert "retrying in" in retry_lines()[0], text
    assert "kafka.sasl_username" in retry_lines()[0] and "kafka.sasl_password" in retry_lines()[0], text
    assert "stopped before connecting" in text, text
    # TLS and the client certificate were accepted; SASL refused the login (the broker's log may be written after
    # its answer reached the daemon: waited for).
    def broker_log() -> str:
        return secure_kafka.log.read_text(errors="replace")[broker_log_before:]

    wait_until(lambda: REFUSED[mechanism] in broker_log(), 30, broker_log)
    assert "Failed authentication with /127.0.0.1" in broker_log(), broker_log()
    assert "SSL handshake failed" not in broker_log()


def test_the_listener_requires_tls_and_the_client_certificate(secure_kafka: SecureKafka) -> None:
    no_cert = {k: v for k, v in secure_kafka.client("SCRAM-SHA-512").items()
               if k not in ("ssl_certfile", "ssl_keyfile")}
    for settings in (no_cert, {"bootstrap_servers": secure_kafka.secure}):  # no client certificate; no TLS at all
        before = len(secure_kafka.log.read_text(errors="replace"))
        with pytest.raises(KafkaError):
            KafkaProducer(**settings, bootstrap_timeout_ms=2000)
        wait_until(lambda: "SSL handshake failed" in secure_kafka.log.read_text(errors="replace")[before:],  # noqa: B023
                   30, lambda: secure_kafka.log.read_text(errors="replace")[before:])  # noqa: B023
