"""The daemon end to end against a real Apache Kafka broker: alerts, dead letters, commits, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError, NotCoordinatorError

from consumers.base import SinkError, SinkTimeout
from consumers.kafka import KafkaSink
from detector.artifact import save_artifact
from detector.config import config_hash, load_config, parse_config
from detector.daemon import producer_settings
from detector.train import Series, train_model
from tests.helpers import FEATURES, bfloat16_error, sine_values
from tests.kafka_broker import create_topic, delete_topics, free_ports
from tests.test_pipeline import PARAMS, T0

pytestmark = pytest.mark.kafka

STREAMS, READINGS = 20, 360
FAULTY = {3: 200, 8: 220, 15: 180}
STUCK = {11: (150, 260)}  # stream 11's first sensor repeats one value for readings [150, 260)
BAD = [b"{oops", b"", b'{"stream": "m0", "values": {"temp": 1}}', b'{"stream": "m0", "ts": 1, "values": {"x": 1}}',
       b'{"stream": "m0", "ts": 1700000000, "values": {"temp": "NaN"}}', b"\xff\xfe\x00"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    series = Series(FEATURES, [f"s{i}" for i in range(6)], [sine_values(700, seed=100 + i, phase=7 * i)
                                                             for i in range(6)])
    model, manifest = train_model(series, PARAMS, progress=False)
    return save_artifact(tmp_path_factory.mktemp("model") / "m", model, manifest)


def write_config(path: Path, bootstrap: str, topic: str, alerts: str, dlq: str, group: str, model: Path,
                 port: int, extra: str = "") -> Path:
    path.write_text(f"""
kafka: {{bootstrap_servers: "{bootstrap}", connect_retry_max_s: 2, connect_timeout_ms: 2000}}
input: {{topics: [{topic}], group_id: {group}, max_poll_records: 500}}
output: {{alerts_topic: {alerts}, dead_letter_topic: {dlq}}}
model: {{path: "{model}", device: cpu}}
alerts: {{k: 2, n: 3, regime: {{enabled: true}}}}
sensors: {{flatline_readings: 10}}
metrics: {{port: {port}}}
{extra}
""")
    return path


def produce(bootstrap: str, topic: str) -> int:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    n = 0
    for t in range(READINGS):
        for s in range(STREAMS):
            v = sine_values(READINGS, seed=500 + s, phase=3 * s)[t].astype(float)
            if s in FAULTY and t >= FAULTY[s]:
                v[2] += 2.5
            if s in STUCK and STUCK[s][0] <= t < STUCK[s][1]:
                v[0] = 51.125
            body = {"stream": f"m{s}", "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v.tolist(), strict=True))}
            producer.send(topic, key=f"m{s}".encode(), value=orjson.dumps(body))
            n += 1
        if t % 60 == 30:
            for bad in BAD:
                producer.send(topic, key=b"bad", value=bad)
                n += 1
    producer.flush()
    producer.close()
    return n


def drain(bootstrap: str, topic: str, expect_at_least: int, timeout_s: float = 30) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=2000)
    out: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out.extend(consumer)
        if len(out) >= expect_at_least:
            break
    consumer.close()
    return out


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on `topic`; empty while its coordinator is still being elected."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        got = admin.list_group_offsets(group).get(group, {})
    except (CoordinatorLoadInProgressError, CoordinatorNotAvailableError, NotCoordinatorError):
        got = {}
    finally:
        admin.close()
    return {tp.partition: om.offset for tp, om in got.items() if tp.topic == topic}


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    ends = c.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    c.close()
    return {tp.partition: off for tp, off in ends.items()}


def start_daemon(cfg: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "detector", "run", "--config", str(cfg)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def test_daemon_scores_alerts_dead_letters_and_commits(kafka_bootstrap: str, topic_factory, group_id: str,
                                                       model_dir: Path, tmp_path: Path) -> None:
    topic, alerts, dlq = topic_factory(partitions=4), topic_factory(partitions=2), topic_factory(partitions=1)
    total = produce(kafka_bootstrap, topic)
    port = free_ports(1)[0]
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, alerts, dlq, group_id, model_dir, port)
    # auto: bfloat16 where this CPU runs it, float32 elsewhere; what the daemon does here depends on neither
    cfg.write_text(cfg.read_text().replace("device: cpu}", "device: cpu, threads: 2, precision: auto}"))
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    try:
        ends = end_offsets(kafka_bootstrap, topic, 4)
        assert sum(ends.values()) == total
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and committed(kafka_bootstrap, group_id, topic) != ends:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        assert committed(kafka_bootstrap, group_id, topic) == ends, log.read_text()
        ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "detector_readings_total" in metrics and 'detector_rejected_total{reason="bad_json"}' in metrics
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
    text = log.read_text()
    assert rc == 0, f"{text}\n(exit after {took:.1f} s)"  # bounded by the 30 s wait, not timed
    assert "Traceback" not in text
    assert "stopping: last batch flushed and committed" in text
    in_use = "float32" if bfloat16_error() else "bfloat16"
    assert f"on cpu (2 CPU threads, {in_use}, from model.precision auto)" in text  # model.threads, model.precision
    assert committed(kafka_bootstrap, group_id, topic) == ends, "SIGTERM left every scored record committed"

    alert_msgs = [orjson.loads(m.value) for m in drain(kafka_bootstrap, alerts, 3)]
    raised = {a["stream"] for a in alert_msgs if a["state"] == "raised" and a["kind"] == "anomaly"}
    sensor = [(a["stream"], a["state"], a["feature"], a["reason"]) for a in alert_msgs if a["kind"] == "sensor_fault"]
    assert sensor == [("m11", "raised", FEATURES[0], "flatline"), ("m11", "cleared", FEATURES[0], "flatline")]
    assert {f"m{s}" for s in FAULTY} <= raised
    healthy_raised = raised - {f"m{s}" for s in FAULTY}
    assert len(healthy_raised) <= 2, f"too many healthy streams raised: {healthy_raised}"
    for a in alert_msgs:
        assert a["input"]["topic"] == topic
    dead = drain(kafka_bootstrap, dlq, 6 * len(BAD))
    assert len(dead) == 6 * len(BAD)
    reasons = {dict(m.headers)["reason"].decode() for m in dead}
    assert reasons == {"bad_json", "empty_value", "missing_timestamp", "unknown_feature", "non_numeric_value"}
    assert {m.value or b"" for m in dead} == set(BAD)


def test_the_producer_packs_records_into_batches_of_output_batch_bytes(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory(partitions=1)
    settings = producer_settings(parse_config({"output": {"batch_bytes": 32768}}))
    sink = KafkaSink(kafka_bootstrap, client={}, **settings)
    try:
        assert sink._producer.config["batch_size"] == 32768
        for i in range(20):  # checkpoint-sized records, several to a batch
            sink.send(topic, b"m%d" % i, bytes(4000))
        sink.flush(30)
    finally:
        sink.close()
    assert sorted(m.key for m in drain(kafka_bootstrap, topic, 20)) == sorted(b"m%d" % i for i in range(20))


def test_a_send_waiting_for_a_topic_goes_on_while_on_blocked_lets_it(kafka_bootstrap: str) -> None:
    topic = f"late-{uuid.uuid4().hex[:8]}"  # not there yet: no metadata, as while the brokers are away
    sink = KafkaSink(kafka_bootstrap, client={}, max_block_ms=1000)
    blocked: list[Exception] = []

    def on_blocked(exc: Exception) -> None:
        blocked.append(exc)
        if len(blocked) == 2:
            create_topic(kafka_bootstrap, topic, 1)

    try:
        with pytest.raises(SinkError, match=f"cannot send to topic '{topic}'"):
            sink.send(topic, b"k", b"v")  # without on_blocked, one wait and it fails
        sink.on_blocked = on_blocked
        sink.send(topic, b"k", b"v")
        sink.flush(30)
    finally:
        sink.close()
    assert len(blocked) >= 2 and all(isinstance(e, SinkTimeout) for e in blocked)
    assert [m.value for m in drain(kafka_bootstrap, topic, 1)] == [b"v"]
    delete_topics(kafka_bootstrap, [topic])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_unreachable_broker_retries_then_stops_cleanly(model_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    dead, port = free_ports(2)
    cfg = write_config(tmp_path / "c.yaml", f"127.0.0.1:{dead}", "t", "a", "d", "g", model_dir, port)
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "cannot reach Kafka" not in log.read_text():
            time.sleep(0.2)
        assert "cannot reach Kafka at 127.0.0.1" in log.read_text()
    finally:
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    assert rc == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_a_level_shift_through_kafka_is_one_regime_change_not_a_storm(kafka_bootstrap: str, topic_factory,
                                                                      group_id: str, model_dir: Path,
                                                                      tmp_path: Path) -> None:
    topic, alerts, dlq = topic_factory(partitions=2), topic_factory(partitions=1), topic_factory(partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    n, shifted = 800, 200
    for s in range(4):
        v = sine_values(n, seed=500 + s, phase=3 * s).astype(float)
        if s == 1:
            v[shifted:, 2] += 2.5  # m1's pressure moves to a new level for good
        for t in range(n):
            body = {"stream": f"m{s}", "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v[t].tolist(), strict=True))}
            producer.send(topic, key=f"m{s}".encode(), value=orjson.dumps(body))
    producer.flush()
    producer.close()
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, alerts, dlq, group_id, model_dir,
                       free_ports(1)[0], extra="thresholds: {policy: rolling}")
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    try:
        ends = end_offsets(kafka_bootstrap, topic, 2)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and committed(kafka_bootstrap, group_id, topic) != ends:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        assert committed(kafka_bootstrap, group_id, topic) == ends, log.read_text()
        cfg.write_text(cfg.read_text().replace("thresholds: {policy: rolling}",
                                               "thresholds: {policy: rolling, rolling: {warning_k: 9}}"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "config reloaded" not in log.read_text():
            time.sleep(0.2)
        assert "config reloaded from" in log.read_text() and "thresholds" in log.read_text(), log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    events = [orjson.loads(m.value) for m in drain(kafka_bootstrap, alerts, 3)]
    assert [(a["stream"], a["state"]) for a in events if a["kind"] == "regime_change"] == [("m1", "detected")]
    m1 = [a["state"] for a in events if a["stream"] == "m1" and a["kind"] == "anomaly"]
    assert m1 == ["raised", "cleared"], f"one alert that settles, not a storm: {m1}"


def test_a_stream_silent_past_forget_after_s_leaves_a_tombstone_in_the_state_topic(
        kafka_bootstrap: str, topic_factory, group_id: str, model_dir: Path, tmp_path: Path) -> None:
    from consumers.kafka import StateTopic
    from detector.checkpoint import decode

    topic, alerts, dlq = topic_factory(partitions=2), topic_factory(partitions=1), topic_factory(partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    v = sine_values(60, seed=9)
    for t in range(60):  # "gone" stops after 10 readings; "stays" sends for an hour of event time
        for s in ("gone", "stays")[0 if t < 10 else 1:]:
            body = {"stream": s, "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v[t].tolist(), strict=True))}
            producer.send(topic, key=s.encode(), value=orjson.dumps(body))
    producer.flush()
    producer.close()
    port = free_ports(1)[0]
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, alerts, dlq, group_id, model_dir, port,
                       extra="scoring: {max_gap_s: 600, forget_after_s: 900}\ndelivery: {commit_interval_ms: 200}")
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    try:
        ends = {p: o for p, o in end_offsets(kafka_bootstrap, topic, 2).items() if o}
        # both keys hash to one partition (murmur2): its own newest reading is what ages "gone"
        assert len(ends) == 1, ends
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and committed(kafka_bootstrap, group_id, topic) != ends:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        assert committed(kafka_bootstrap, group_id, topic) == ends, log.read_text()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0, log.read_text()
    assert "detector_forgotten_streams_total 1.0" in metrics and "detector_active_streams 1.0" in metrics, metrics
    values = StateTopic(kafka_bootstrap, f"{group_id}-state", client={}).read({0, 1}, 30)
    assert sorted(decode(x)[0]["stream"] for x in values) == ["stays"], "gone's checkpoint was deleted (a tombstone)"
    told: list[int] = []  # what a restore sizes the state table by: the records it may read, told before the first
    state = StateTopic(kafka_bootstrap, f"{group_id}-state", client={})
    chunks = list(state.read_chunks({0, 1}, 30, expect=told.append))
    assert len(told) == 1 and told[0] >= sum(map(len, chunks)) >= 2, (told, [len(c) for c in chunks])
    # the daemon created the state topic with segments that roll every minute (delivery.state_segment_ms), so
    # compaction, which cleans only closed segments, keeps what a restore reads near one record per stream
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, f"{group_id}-state", None)],
                                         config_filter="all")
    finally:
        admin.close()
    topic_cfg = configs["topic"][f"{group_id}-state"]
    assert (topic_cfg["segment.ms"]["value"], topic_cfg["cleanup.policy"]["value"]) == ("60000", "compact"), topic_cfg
    assert "cleanup.policy=compact, segment.ms=60000" in log.read_text()


def test_a_shadow_model_publishes_to_its_own_topic_and_leaves_the_live_alerts_as_they_were(
        kafka_bootstrap: str, topic_factory, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json
    import shutil

    topic, alerts, dlq = topic_factory(partitions=4), topic_factory(partitions=2), topic_factory(partitions=1)
    total = produce(kafka_bootstrap, topic)
    candidate = tmp_path / "candidate"  # the same weights, levels at half the live model's: it alerts more
    shutil.copytree(model_dir, candidate)
    manifest = json.loads((candidate / "manifest.json").read_text())
    manifest.update(name="candidate", model_version="candidate-1",
                    calibration_scores=[0.5 * s for s in manifest["calibration_scores"]])
    (candidate / "manifest.json").write_text(json.dumps(manifest))
    ends = end_offsets(kafka_bootstrap, topic, 4)
    assert sum(ends.values()) == total

    def run(group: str, out: str, shadow: bool) -> None:
        cfg = write_config(tmp_path / f"{group}.yaml", kafka_bootstrap, topic, out, dlq, group, model_dir,
                           free_ports(1)[0])
        if shadow:
            cfg.write_text(cfg.read_text().replace("device: cpu}", f'device: cpu, shadow: "{candidate}"}}'))
        log = tmp_path / f"{group}.log"
        proc = start_daemon(cfg, log)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and committed(kafka_bootstrap, group, topic) != ends:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.5)
            assert committed(kafka_bootstrap, group, topic) == ends, log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()
        if shadow:
            assert f"shadow model candidate (candidate-1) from {candidate}" in log.read_text()

    plain_alerts = topic_factory(partitions=2)
    create_topic(kafka_bootstrap, f"{alerts}-shadow", 2)  # as the alerts topic, it must exist (no auto-creation)
    run(f"plain-{topic}", plain_alerts, shadow=False)
    run(f"shadowed-{topic}", alerts, shadow=True)
    def split(values: list[bytes]) -> tuple[list[bytes], list[float]]:
        """Alerts without config_hash (the two configs name other groups and topics) and their numbers apart:
        two runs poll other batches, and a batch's shape moves a score's last digits (the in-memory shadow test
        in test_pipeline compares the same batches byte for byte)."""
        rest, numbers = [], []
        for b in sorted(values, key=lambda b: (orjson.loads(b)["alert_id"], orjson.loads(b)["state"])):
            a = {k: v for k, v in orjson.loads(b).items() if k != "config_hash"}
            numbers.append(a.pop("score", 0.0))
            for f in a.get("top_features", []):
                numbers.append(f.pop("share"))
            rest.append(orjson.dumps(a, option=orjson.OPT_SORT_KEYS))
        return rest, numbers

    plain = [m.value for m in drain(kafka_bootstrap, plain_alerts, 3)]
    live = [m.value for m in drain(kafka_bootstrap, alerts, len(plain))]
    (a, x), (b, y) = split(live), split(plain)
    assert plain and a == b and x == pytest.approx(y, rel=1e-4, abs=1e-3), "the live alerts, as without a shadow"
    cfg = load_config(tmp_path / f"shadowed-{topic}.yaml")
    unshadowed = cfg.model_copy(update={"model": cfg.model.model_copy(update={"shadow": None})})
    assert {orjson.loads(b)["config_hash"] for b in live} == {config_hash(unshadowed)}, "a shadow is not in it"
    shadow = [orjson.loads(m.value) for m in drain(kafka_bootstrap, f"{alerts}-shadow", len(plain))]
    assert shadow and {a["model_version"] for a in shadow} == {"candidate-1"}
    raised = {a["stream"] for a in shadow if a["state"] == "raised" and a["kind"] == "anomaly"}
    assert {f"m{s}" for s in FAULTY} <= raised

    from detector.cli import main  # the operator's report of the two topics
    assert main(["compare", "--config", str(tmp_path / f"shadowed-{topic}.yaml"), "--since", "1h", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    live_raised = {orjson.loads(b)["stream"] for b in live if orjson.loads(b)["state"] == "raised"
                   and orjson.loads(b)["kind"] == "anomaly"}
    assert set(report["shadow"]["streams"]) == raised and set(report["live"]["streams"]) == live_raised
    assert report["shadow"]["models"] == ["candidate-1"] and set(report["only_shadow"]) == raised - live_raised
    delete_topics(kafka_bootstrap, [f"{alerts}-shadow"])
