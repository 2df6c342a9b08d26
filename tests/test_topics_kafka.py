"""`detector topics create` against a real Apache Kafka broker: the config's topics made where missing, the
partitions asked for, existing topics left as they are, and a clear error when the brokers cannot be reached."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from detector.cli import main
from tests.kafka_broker import free_ports

pytestmark = pytest.mark.kafka


def _partitions(bootstrap: str, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        found = {t["name"]: t for t in admin.describe_topics([topic])}[topic]
        return len(found["partitions"])
    finally:
        admin.close()


def test_topics_create_makes_the_configs_topics_once(kafka_bootstrap: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    tag = uuid.uuid4().hex[:8]
    readings, alerts, dlq, scores = (f"{n}-{tag}" for n in ("readings", "alerts", "dlq", "scores"))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
kafka: {{bootstrap_servers: "{kafka_bootstrap}"}}
input: {{topics: [{readings}]}}
output: {{alerts_topic: {alerts}, dead_letter_topic: {dlq}, scores_topic: {scores}}}
""")
    assert main(["topics", "create", "--config", str(cfg), "--partitions", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{t}: created, 3 partitions" for t in (readings, alerts, dlq, scores)]
    assert _partitions(kafka_bootstrap, readings) == 3 and _partitions(kafka_bootstrap, scores) == 3

    # again, asking for more: nothing is changed, each is reported as it is
    assert main(["topics", "create", "--config", str(cfg), "--partitions", "5"]) == 0
    again = capsys.readouterr().out.splitlines()
    assert again == [f"{t}: exists, 3 partitions" for t in (readings, alerts, dlq, scores)]

    # named topics instead of the config's, on the broker's default partitions
    extra = f"extra-{tag}"
    assert main(["topics", "create", extra, "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith(f"{extra}: created, ")


def test_topics_create_says_which_brokers_it_could_not_reach(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f'kafka: {{bootstrap_servers: "127.0.0.1:{port}", request_timeout_ms: 2000, '
                   f'connect_timeout_ms: 2000}}\n')
    assert main(["topics", "create", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"kafka.bootstrap_servers 127.0.0.1:{port}" in err and str(cfg) in err


def test_topics_create_refuses_zero_partitions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics", "create", "--config", str(tmp_path / "none.yaml"), "--partitions", "0"]) == 2
    assert "--partitions and --replication must be at least 1" in capsys.readouterr().err
