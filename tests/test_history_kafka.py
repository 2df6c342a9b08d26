"""`detector train --from-topic`: training from what the input topic holds, against a real Apache Kafka broker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from kafka import KafkaProducer

from detector.cli import main

pytestmark = pytest.mark.kafka

# a day ago, to the day: the record times below (up to four days before it) stay inside the broker's default
# retention of seven days, which deletes older segments whenever its check runs (every five minutes)
T0 = (int(time.time()) // 86_400 - 1) * 86_400
FEATURES = ("speed", "flow", "temp")
TRAIN = ["--window", "8", "--hop", "4", "--hidden", "8", "--epochs", "2", "--seed", "0", "--quiet"]


def fleet(n: int = 240) -> pd.DataFrame:
    """Three pumps, readings a minute apart, values with three decimals (the same float32 from JSON and CSV)."""
    rng = np.random.default_rng(4)
    rows = []
    for s in range(3):
        speed = 0.8 + 0.1 * np.sin(np.arange(n) / 15 + s)
        for t in range(n):
            rows.append({"timestamp": T0 + 60 * t, "stream": f"pump-{s}",
                         "speed": round(1500 * speed[t] + rng.normal(0, 2), 3),
                         "flow": round(90 * speed[t] + rng.normal(0, 0.5), 3),
                         "temp": round(40 + 5 * speed[t] + rng.normal(0, 0.2), 3)})
    return pd.DataFrame(rows)


def messages(df: pd.DataFrame) -> list[tuple[bytes, bytes]]:
    """The fleet as the three reading forms, in turn: one reading, a list of readings, columns."""
    out = []
    for stream, g in df.groupby("stream", sort=False):
        recs = g.to_dict("records")
        for i in range(0, len(recs), 6):
            part = recs[i:i + 6]
            vals = [{f: r[f] for f in FEATURES} for r in part]
            stamps = [r["timestamp"] for r in part]
            form = (i // 6) % 3
            if form == 0:
                bodies = [{"stream": stream, "ts": t, "values": v} for t, v in zip(stamps, vals, strict=True)]
            elif form == 1:
                bodies = [{"stream": stream, "readings": [{"ts": t, "values": v}
                                                          for t, v in zip(stamps, vals, strict=True)]}]
            else:
                bodies = [{"stream": stream, "readings": {"ts": stamps,
                                                          "values": {f: [v[f] for v in vals] for f in FEATURES}}}]
            out += [(stream.encode(), orjson.dumps(b)) for b in bodies]
    return out


def produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes]], at_ms: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for key, value in items:
        producer.send(topic, key=key, value=value, timestamp_ms=at_ms)
    producer.flush()
    producer.close()


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_training_from_a_topic_equals_training_from_the_same_rows_in_a_file(
        kafka_bootstrap: str, topic_factory, tmp_path: Path) -> None:
    df = fleet()
    topic, alerts = topic_factory(partitions=3), topic_factory(partitions=1)
    produce(kafka_bootstrap, topic, messages(df), at_ms=(T0 - 3 * 86_400) * 1000)  # "three days before T0"
    late = fleet(8).assign(timestamp=lambda d: d.timestamp - 10**6)  # other event times (in the past: not future)
    produce(kafka_bootstrap, topic, messages(late) + [(b"pump-0", b"not json")], at_ms=(T0 - 86_400) * 1000)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'kafka: {{bootstrap_servers: "{kafka_bootstrap}"}}\n')
    csv = tmp_path / "rows.csv"
    df.to_csv(csv, index=False)

    assert main(["train", "--data", str(csv), "--out", str(tmp_path / "file"), *TRAIN]) == 0
    span = ["--since", str(T0 - 4 * 86_400), "--until", str(T0 - 2 * 86_400)]  # by record time: the first batch
    assert main(["train", "--from-topic", topic, *span, "--config", str(cfg), "--out", str(tmp_path / "topic"),
                 *TRAIN]) == 0
    a, b = manifest(tmp_path / "file"), manifest(tmp_path / "topic")
    for key in ("features", "scaler_mean", "scaler_std", "error_mean", "error_std", "calibration_scores",
                "relation_streams", "relation_mean", "relation_std", "relation_weight"):
        assert a[key] == b[key], key
    assert a["training"]["readings"] == b["training"]["readings"] == len(df)
    src = b["training"]["source"]
    assert src["topic"] == topic and src["readings"] == len(df) and src["rejected"] == {}
    assert a["training"]["source"] == {"file": str(csv)}

    everything = ["--since", str(T0 - 4 * 86_400), "--config", str(cfg)]  # to now: the late batch too
    assert main(["train", "--from-topic", topic, *everything, "--out", str(tmp_path / "all"), *TRAIN]) == 0
    src = manifest(tmp_path / "all")["training"]["source"]
    assert src["readings"] == len(df) + len(late) and src["rejected"] == {"bad_json": 1}

    # an anomaly episode of pump-1 over readings 100..139 (raised, then cleared) is left out; a regime is not
    def alert(state: str, kind: str, end: int, aid: str = "a1") -> tuple[bytes, bytes]:
        return b"pump-1", orjson.dumps({"alert_id": aid, "kind": kind, "stream": "pump-1", "state": state,
                                         "first_seen": T0 + 60 * 100, "window_end": T0 + 60 * end})
    produce(kafka_bootstrap, alerts, [alert("raised", "anomaly", 100), alert("escalated", "anomaly", 110),
                                      alert("cleared", "anomaly", 139), alert("detected", "regime_change", 200, "r1")],
            at_ms=(T0 - 3 * 86_400) * 1000)
    assert main(["train", "--from-topic", topic, *span, "--config", str(cfg), "--exclude-alerted", alerts,
                 "--out", str(tmp_path / "clean"), *TRAIN]) == 0
    src = manifest(tmp_path / "clean")["training"]["source"]
    assert src["alerted_readings_left_out"] == 40 and src["readings"] == len(df) - 40
    assert manifest(tmp_path / "clean")["training"]["readings"] == len(df) - 40

    # operators muted pump-2 from reading 50 until reading 80, and pump-0 from reading 200 on (no end)
    ctl = topic_factory(partitions=1)
    cfg.write_text(f'kafka: {{bootstrap_servers: "{kafka_bootstrap}"}}\ncontrol: {{topic: {ctl}}}\n')
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for at, cmd in ((T0 + 60 * 50, {"action": "mute", "streams": "pump-2", "until": T0 + 60 * 80}),
                    (T0 + 60 * 200, {"action": "mute", "streams": "pump-0"}), (T0, b"not a command")):
        value = cmd if isinstance(cmd, bytes) else orjson.dumps(cmd)
        producer.send(ctl, key=b"mute:x", value=value, timestamp_ms=at * 1000)
    producer.flush()
    producer.close()
    assert main(["train", "--from-topic", topic, *span, "--config", str(cfg), "--exclude-alerted", alerts,
                 "--exclude-muted", "--out", str(tmp_path / "quiet"), *TRAIN]) == 0
    src = manifest(tmp_path / "quiet")["training"]["source"]
    assert src["control_topic"] == ctl and src["muted_spans"] == 2
    assert src["alerted_readings_left_out"] == 40 + 31 + 40 and src["readings"] == len(df) - 111


def test_a_missing_topic_or_an_empty_span_is_one_clear_line(kafka_bootstrap: str, topic_factory, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'kafka: {{bootstrap_servers: "{kafka_bootstrap}"}}\n')
    assert main(["train", "--from-topic", "no-such-topic", "--config", str(cfg), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "topic no-such-topic not found" in err and "kafka.bootstrap_servers" in err
    empty = topic_factory(partitions=1)
    assert main(["train", "--from-topic", empty, "--config", str(cfg), "--out", str(tmp_path / "m")]) == 2
    assert f"topic {empty}: no readings between 14d and now (0 records)" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "m")]) == 2
    assert "--data FILE or --from-topic TOPIC" in capsys.readouterr().err
