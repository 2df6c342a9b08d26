"""What each processing guarantee costs: `detector run` end to end through a real Kafka, side by side.

    python bench/delivery.py [--streams 50] [--readings 10000] [--out docs/benchmarks.md]

Starts a local broker (deploy/kafka/kafka.sh), trains a small model, produces streams x readings JSON readings
to a 4-partition topic, then runs the daemon over it once per setting (at_least_once and exactly_once, each
at two commit intervals), each with a fresh consumer group, and measures the readings per second from its
first commit to its last, and the bytes of checkpoints written. Results go to bench/results/delivery.json and,
with --out, to the delivery section of the markdown file.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kafka import KafkaProducer  # noqa: E402

from bench.ingest import commit_progress  # noqa: E402
from bench.report import machine, replace_section  # noqa: E402
from detector.artifact import save_artifact  # noqa: E402
from detector.train import Series, TrainParams, train_model  # noqa: E402
from tests.helpers import FEATURES, sine_values  # noqa: E402
from tests.kafka_broker import KafkaBroker, create_topic, free_ports  # noqa: E402
from tests.reliability import DaemonProc, fleet  # noqa: E402

SETTINGS = [("at_least_once", 1000), ("exactly_once", 1000), ("at_least_once", 100), ("exactly_once", 100)]


def run_one(bootstrap: str, topic: str, model: Path, guarantee: str, interval_ms: int, total: int,
            work: Path) -> dict:
    """One daemon over the whole topic: readings per second between its first and its last commit."""
    group = f"bench-{uuid.uuid4().hex[:8]}"
    alerts, dlq = (create_topic(bootstrap, f"{k}-{group}", 2) for k in ("alerts", "dlq"))
    cfg = work / f"{group}.yaml"
    cfg.write_text(f"""
kafka: {{bootstrap_servers: "{bootstrap}"}}
input: {{topics: [{topic}], group_id: {group}}}
output: {{alerts_topic: {alerts}, dead_letter_topic: {dlq}}}
delivery: {{guarantee: {guarantee}, commit_interval_ms: {interval_ms}, transactional_id: {group}-tx}}
model: {{path: "{model}", device: cpu}}
sensors: {{flatline_readings: 10}}
metrics: {{port: {free_ports(1)[0]}}}
runtime: {{log_level: WARNING}}
""")
    daemon = DaemonProc(cfg, work / f"{group}.log").start()
    c_first, seconds = commit_progress(daemon, bootstrap, group, topic, total, timeout_s=600)
    assert daemon.stop() == 0, daemon.text()
    if seconds <= 0:
        raise RuntimeError(f"no progress measured: {daemon.text()[-2000:]}")
    return {"guarantee": guarantee, "commit_interval_ms": interval_ms,
            "readings_per_s": round((total - c_first) / seconds), "seconds": round(seconds, 1)}


def main() -> int:
    """Run every setting and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--readings", type=int, default=10000, help="readings per stream")
    ap.add_argument("--out", help="markdown file whose delivery section is replaced by the results")
    args = ap.parse_args()
    work = ROOT / "bench" / "results" / "delivery-work"
    work.mkdir(parents=True, exist_ok=True)
    series = Series(FEATURES, [f"s{i}" for i in range(6)], [sine_values(700, seed=100 + i, phase=7 * i)
                                                             for i in range(6)])
    model, manifest = train_model(series, TrainParams(window=16, hop=4, hidden_size=24, epochs=6,
                                                      steps_per_epoch=25, batch_size=32, name="bench"),
                                  progress=False)
    model_dir = save_artifact(work / "model", model, manifest)
    items = fleet(args.streams, args.readings)
    rows = []
    with KafkaBroker() as broker:
        assert broker.bootstrap is not None
        topic = create_topic(broker.bootstrap, f"in-{uuid.uuid4().hex[:8]}", 4)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=20)
        for key, value in items:
            producer.send(topic, key=key, value=value)
        producer.flush()
        producer.close()
        for guarantee, interval in SETTINGS:
            rows.append(run_one(broker.bootstrap, topic, model_dir, guarantee, interval, len(items), work))
            print(rows[-1], flush=True)
    base = rows[0]["readings_per_s"]
    for r in rows:
        r["ratio_to_at_least_once_1s"] = round(r["readings_per_s"] / base, 2)
    result = {"machine": machine(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "readings": len(items), "streams": args.streams,
              "results": rows}
    out = ROOT / "bench" / "results" / "delivery.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        table = ["| guarantee | commit interval | readings/s | ratio to at_least_once, 1 s |", "|---|---|---|---|"]
        table += [f"| {r['guarantee']} | {r['commit_interval_ms']} ms | {r['readings_per_s']:,} | "
                  f"{r['ratio_to_at_least_once_1s']} |" for r in rows]
        note = (f"\n`python bench/delivery.py --out docs/benchmarks.md`, {result['date']}, {result['machine']}: "
                f"{len(items):,} readings of {args.streams} streams, one daemon, 4 partitions.\n\n")
        replace_section(args.out, "delivery", "Delivery guarantees", note + "\n".join(table) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
