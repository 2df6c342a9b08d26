"""Operators' commands through a real Kafka broker: `detector control` mute, unmute and ack reach the daemon."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer

from tests.helpers import FEATURES, sine_values
from tests.kafka_broker import create_topic, delete_topics, free_ports
from tests.test_daemon_kafka import committed, drain, end_offsets, model_dir, start_daemon, write_config
from tests.test_pipeline import T0

pytestmark = pytest.mark.kafka
__all__ = ["model_dir"]  # the trained model fixture, shared with test_daemon_kafka

STREAMS = 4


def produce(bootstrap: str, topic: str, t0: int, t1: int) -> None:
    """Readings t0..t1 of m0..m3; m1's pressure is shifted by 2.5 from t=100 and by 10 from t=200 on."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    for t in range(t0, t1):
        for s in range(STREAMS):
            v = sine_values(600, seed=500 + s, phase=3 * s)[t].astype(float)
            if s == 1:
                v[2] += 10.0 if t >= 200 else 2.5 if t >= 100 else 0.0
            body = {"stream": f"m{s}", "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v.tolist(), strict=True))}
            producer.send(topic, key=f"m{s}".encode(), value=orjson.dumps(body))
    producer.flush()
    producer.close()


def wait_for(what: str, check: object, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-5000:]}")


def metrics(port: int) -> str:
    """The daemon's /metrics page."""
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def control(cfg: Path, *args: str) -> str:
    """Run `detector control ...`; return what it printed."""
    proc = subprocess.run([sys.executable, "-m", "detector", "control", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_operators_mute_unmute_and_ack_a_running_daemon(kafka_bootstrap: str, topic_factory, group_id: str,
                                                        model_dir: Path, tmp_path: Path) -> None:
    topic, alerts, dlq = topic_factory(partitions=2), topic_factory(partitions=1), topic_factory(partitions=1)
    port = free_ports(1)[0]
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, alerts, dlq, group_id, model_dir, port)
    log = tmp_path / "daemon.log"
    produce(kafka_bootstrap, topic, 0, 150)  # m1 raises a warning
    proc = start_daemon(cfg, log)

    def caught_up() -> bool:
        return committed(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic, 2)

    try:
        wait_for("the first readings", caught_up, proc, log, 90)
        assert f"creating control topic {group_id}-control: 1 partition, cleanup.policy=compact" in log.read_text()
        sent = control(cfg, "ack", "m1", "--by", "tester", "--reason", "pump crew on site")
        assert sent.startswith(f"sent to {group_id}-control[0]@0: key=ack:m1 ")
        wait_for("the ack", lambda: "control: ack m1 by tester" in log.read_text(), proc, log)
        produce(kafka_bootstrap, topic, 150, 250)  # m1 reaches critical: acknowledged, so not announced
        wait_for("the second readings", caught_up, proc, log)

        control(cfg, "mute", "m1", "--until", "1h", "--by", "tester")
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        producer.send(f"{group_id}-control", key=b"mute:m3", value=b'{"action": "mute", "streams": "m3", "x": 1}')
        producer.flush()
        producer.close()
        wait_for("the mute", lambda: "control: mute m1 by tester" in log.read_text(), proc, log)
        wait_for("the bad command", lambda: "rejected control command" in log.read_text(), proc, log)
        # the gauge is set just after the commands are logged, on the daemon's loop: waited for, not raced
        wait_for("m1 counted as muted", lambda: "detector_muted_streams 1.0" in metrics(port), proc, log)
        produce(kafka_bootstrap, topic, 250, 350)  # m1 still critical, muted: its episode is cleared, then silence
        wait_for("the muted readings", caught_up, proc, log)

        control(cfg, "unmute", "m*")
        wait_for("the unmute", lambda: "control: unmute m* by" in log.read_text(), proc, log)
        produce(kafka_bootstrap, topic, 350, 420)  # alerts come back
        wait_for("the last readings", caught_up, proc, log)
        text = metrics(port)
        for action, n in (("ack", 1), ("mute", 1), ("unmute", 1), ("invalid", 1)):
            assert f'detector_control_commands_total{{action="{action}"}} {n}.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        delete_topics(kafka_bootstrap, [f"{group_id}-control"])
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text

    records = [orjson.loads(m.value) for m in drain(kafka_bootstrap, alerts, 4)]
    m1 = [a for a in records if a["stream"] == "m1" and a["kind"] == "anomaly"]
    assert [(a["state"], a.get("reason")) for a in m1] == [
        ("raised", None), ("acknowledged", "pump crew on site"), ("cleared", "muted"), ("raised", None)], m1
    first, ack, clear, again = m1
    assert ack["alert_id"] == first["alert_id"] == clear["alert_id"] != again["alert_id"]
    assert ack["by"] == "tester" and clear["severity"] == "critical", "it escalated, silently"
    assert again["severity"] == "critical"
    dead = drain(kafka_bootstrap, dlq, 1)
    assert [(dict(m.headers)["reason"], m.value) for m in dead] == [
        (b"control_unknown_field", b'{"action": "mute", "streams": "m3", "x": 1}')]


def test_a_control_topic_that_is_not_compacted_is_refused(kafka_bootstrap: str, topic_factory, group_id: str,
                                                          model_dir: Path, tmp_path: Path) -> None:
    topic, alerts, dlq = topic_factory(partitions=1), topic_factory(partitions=1), topic_factory(partitions=1)
    wrong = topic_factory(partitions=1)  # cleanup.policy=delete
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, alerts, dlq, group_id, model_dir,
                       free_ports(1)[0], extra=f"control: {{topic: {wrong}}}")
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    assert proc.wait(timeout=90) == 2, log.read_text()
    lines = [x for x in log.read_text().splitlines() if "cannot use the control topic" in x]
    assert len(lines) == 1 and "has cleanup.policy=delete; it must be compact" in lines[0], log.read_text()
    cli = subprocess.run([sys.executable, "-m", "detector", "control", "mute", "m1", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "it must be compact" in cli.stderr and cli.stdout == ""


def test_a_false_alarm_label_raises_the_levels_of_exactly_that_stream(kafka_bootstrap: str, topic_factory,
                                                                       group_id: str, model_dir: Path,
                                                                       tmp_path: Path) -> None:
    topic, alerts, dlq = topic_factory(partitions=2), topic_factory(partitions=1), topic_factory(partitions=1)
    scores = topic_factory(partitions=1)  # every window's score and warning level
    port = free_ports(1)[0]
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, alerts, dlq, group_id, model_dir, port)
    cfg.write_text(cfg.read_text().replace(f"dead_letter_topic: {dlq}}}",
                                           f"dead_letter_topic: {dlq}, scores_topic: {scores}}}"))
    log = tmp_path / "daemon.log"
    produce(kafka_bootstrap, topic, 0, 120)
    proc = start_daemon(cfg, log)

    def caught_up() -> bool:
        return committed(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic, 2)

    try:
        wait_for("the first readings", caught_up, proc, log, 90)
        sent = control(cfg, "label", "m1", "--alert-id", "a-1", "--as", "false_alarm", "--note", "valve test")
        assert "key=label:a-1 " in sent
        wait_for("the label", lambda: "control: alert a-1 of m1 labelled false_alarm" in log.read_text(), proc, log)
        produce(kafka_bootstrap, topic, 120, 200)
        wait_for("the readings after it", caught_up, proc, log)
        assert 'detector_control_commands_total{action="label"} 1.0' in metrics(port)
        raised = [a for a in map(orjson.loads, (m.value for m in drain(kafka_bootstrap, alerts, 1)))
                  if a["stream"] == "m1" and a["kind"] == "anomaly" and a["state"] == "raised"]
        assert raised, log.read_text()
        control(cfg, "label", "m1", "--alert-id", raised[0]["alert_id"], "--as", "confirmed")
        report = subprocess.run([sys.executable, "-m", "detector", "evaluate", "--labels-from-topic", "--since",
                                 "1h", "--json", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        got = json.loads(report.stdout)  # a-1 names no alert; m1's real one is confirmed and was raised live
        assert (got["confirmed"], got["false_alarms"], got["not_found"]) == (1, 0, 1), got
        assert got["live"]["confirmed_caught"] == 1 and "shadow" not in got, got
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        delete_topics(kafka_bootstrap, [f"{group_id}-control"])
    assert rc == 0 and "Traceback" not in log.read_text()

    windows = [orjson.loads(m.value) for m in drain(kafka_bootstrap, scores, 4 * 190 // 8)]
    split = T0 + 60 * 120  # windows ending at or after it were scored after the label was applied

    def levels(stream: str, after: bool) -> list[float]:
        got = [w["warning"] for w in windows if w["stream"] == stream and (w["end"] >= split) == after]
        assert got, (stream, after)
        return got

    level = levels("m0", False)[0]  # the calibrated level, the same for every stream and window
    assert levels("m1", False) == pytest.approx([level] * len(levels("m1", False)))
    assert levels("m1", True) == pytest.approx([1.25 * level] * len(levels("m1", True))), "x 1.25 from the label on"
    for other in ("m0", "m2", "m3"):
        assert levels(other, True) == pytest.approx([level] * len(levels(other, True))), other


def committed_records(bootstrap: str, topic: str) -> list[dict]:
    """Every committed record of a one-partition topic, in order (what a read_committed consumer sees)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             enable_auto_commit=False, isolation_level="read_committed", consumer_timeout_ms=3000)
    try:
        return [orjson.loads(m.value) for m in consumer]
    finally:
        consumer.close()


@pytest.mark.parametrize("kill", ["before", "after"])
def test_promote_and_rollback_through_the_control_topic_survive_a_sigkill(
        kafka_bootstrap: str, topic_factory, group_id: str, model_dir: Path, tmp_path: Path, kill: str) -> None:
    topic, alerts, dlq = topic_factory(partitions=2), topic_factory(partitions=1), topic_factory(partitions=1)
    create_topic(kafka_bootstrap, f"{alerts}-shadow", 1)
    candidate = tmp_path / "candidate"  # the same weights, another version
    shutil.copytree(model_dir, candidate)
    manifest = json.loads((candidate / "manifest.json").read_text())
    old = manifest["model_version"]
    manifest.update(name="candidate", model_version="candidate-1")
    (candidate / "manifest.json").write_text(json.dumps(manifest))
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, alerts, dlq, group_id, model_dir,
                       free_ports(1)[0], extra="delivery: {guarantee: exactly_once}")
    cfg.write_text(cfg.read_text().replace("device: cpu}", f'device: cpu, shadow: "{candidate}"}}'))

    def caught_up() -> bool:
        return committed(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic, 2)

    produce(kafka_bootstrap, topic, 0, 150)  # m1 raises a warning under the live model, committed
    log = tmp_path / "first.log"
    proc = start_daemon(cfg, log)
    try:
        wait_for("the first readings", caught_up, proc, log, 120)
        if kill == "after":  # the switch committed (its clear visible), then the crash
            control(cfg, "promote")
            wait_for("the committed switch", lambda: any(a.get("reason") == "model_promoted" for a in
                                                         committed_records(kafka_bootstrap, alerts)), proc, log)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    if kill == "before":  # the command lands while the daemon is down: the restart switches before it restores
        assert control(cfg, "promote").startswith(f"sent to {group_id}-control[0]@0: key=model:* ")
    log = tmp_path / "second.log"
    proc = start_daemon(cfg, log)
    try:
        wait_for("the restart", lambda: "model candidate-1 is live" in log.read_text(), proc, log, 120)
        produce(kafka_bootstrap, topic, 150, 250)  # m1 reaches critical: raised by the candidate
        wait_for("the second readings", caught_up, proc, log, 120)
        control(cfg, "rollback")
        wait_for("the rollback", lambda: f"model {old} is live" in log.read_text(), proc, log)
        produce(kafka_bootstrap, topic, 250, 300)
        wait_for("the last readings", caught_up, proc, log, 120)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        delete_topics(kafka_bootstrap, [f"{group_id}-control", f"{alerts}-shadow"])
    assert rc == 0 and "Traceback" not in log.read_text(), log.read_text()
    restored = ("4 streams of model " + old + " restored from before the switch" if kill == "before" else
                "restored 4 streams")  # the old model's checkpoints, or already the candidate's
    assert restored in log.read_text(), log.read_text()

    m1 = [(a["model_version"], a["state"], a.get("reason")) for a in committed_records(kafka_bootstrap, alerts)
          if a["stream"] == "m1" and a["kind"] == "anomaly"]
    promoted = m1.index((old, "cleared", "model_promoted"))
    rolled = m1.index(("candidate-1", "cleared", "model_rolled_back"))
    assert m1.count((old, "cleared", "model_promoted")) == 1, f"cleared once, the crash or not: {m1}"
    assert {v for v, *_ in m1[:promoted + 1]} == {old} and (old, "raised", None) in m1[:promoted], m1
    assert {v for v, *_ in m1[promoted + 1:rolled + 1]} == {"candidate-1"}, f"no mix of the two models: {m1}"
    assert ("candidate-1", "raised", None) in m1[promoted + 1:rolled], "the lasting fault raised by the candidate"
    assert {v for v, *_ in m1[rolled + 1:]} == {old} and ("raised" in {s for _, s, _ in m1[rolled + 1:]}), m1
