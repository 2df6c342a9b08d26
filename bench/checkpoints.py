"""What a commit costs with many streams: the producer's batch size, side by side through a real Kafka.

    python bench/checkpoints.py [--streams 20000] [--rate 4000] [--seconds 60] [--reps 2] [--out docs/benchmarks.md]

Starts a local broker and, for each `output.batch_bytes` in turn (16 KB, kafka-python's default, and 256 KiB,
ours), a daemon with otherwise default settings on a fresh topic, fed `rate` readings per second round robin
over `streams` streams. So each 1 s commit writes a checkpoint for thousands of streams. After `seconds` it
reads the daemon's `detector_commit_seconds` and `detector_checkpoint_bytes`, and how far it was behind.
The settings alternate, `reps` runs each. Results go to bench/results/checkpoints.json and, with --out, to
the checkpoints section of the markdown file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import config, model  # noqa: E402
from bench.report import machine, replace_section  # noqa: E402
from bench.soak import SteadyProducer  # noqa: E402
from tests.kafka_broker import KafkaBroker, create_topic  # noqa: E402
from tests.reliability import DaemonProc, total_committed  # noqa: E402

BATCH_BYTES = (16384, 262144)


def metric(body: str, name: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    found = re.search(rf"^{name} (\S+)$", body, re.M)
    return float(found.group(1)) if found else 0.0


def run(bootstrap: str, model_dir: Path, work: Path, batch_bytes: int, streams: int, rate: float,
        seconds: float) -> dict:
    """One daemon with `output.batch_bytes` under a steady load; its commits' cost and how far behind it was."""
    topic = create_topic(bootstrap, f"ckpt-{uuid.uuid4().hex[:8]}", 4)
    cfg, group = config(work, bootstrap, topic, model_dir)
    text = cfg.read_text()
    cfg.write_text(text.replace("dead_letter_topic: ", f"batch_bytes: {batch_bytes}, dead_letter_topic: "))
    port = re.search(r"port: (\d+)", text)
    assert port is not None
    daemon = DaemonProc(cfg, work / f"{group}.log").start()
    producer = SteadyProducer(bootstrap, topic, streams, rate)
    producer.start()
    try:
        time.sleep(seconds)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10).read().decode()
    finally:
        producer.stop.set()
        producer.join(30)
    behind = producer.sent - total_committed(bootstrap, group, topic)
    assert daemon.stop() == 0, daemon.text()[-3000:]
    commits = metric(body, "detector_commit_seconds_count")
    return {"batch_bytes": batch_bytes, "sent": producer.sent, "behind_at_end": behind, "commits": int(commits),
            "ms_per_commit": round(1000 * metric(body, "detector_commit_seconds_sum") / max(commits, 1), 1),
            "last_checkpoint_mb": round(metric(body, "detector_checkpoint_bytes") / 1e6, 1)}


def main() -> int:
    """Run every setting `reps` times, alternating, and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=4000.0, help="readings per second sent")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each run")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", help="markdown file whose checkpoints section is replaced by the results")
    args = ap.parse_args()
    work = ROOT / "bench" / "results" / "checkpoints-work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model(work / "model")
    runs = []
    with KafkaBroker(heap_opts="-Xms512m -Xmx1g") as broker:
        assert broker.bootstrap is not None
        for rep in range(args.reps):
            for bb in BATCH_BYTES if rep % 2 == 0 else BATCH_BYTES[::-1]:
                runs.append(run(broker.bootstrap, model_dir, work, bb, args.streams, args.rate, args.seconds))
                print(runs[-1], flush=True)
    result = {"machine": machine(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "streams": args.streams, "rate": args.rate,
              "seconds": args.seconds, "runs": runs}
    (ROOT / "bench" / "results" / "checkpoints.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        rows = "".join(f"| {r['batch_bytes']:,} | {r['commits']} | {r['ms_per_commit']:,.0f} ms | "
                       f"{r['last_checkpoint_mb']} MB | {r['behind_at_end']:,} |\n" for r in runs)
        body = (f"\n`python bench/checkpoints.py --streams {args.streams} --rate {args.rate:g} --seconds "
                f"{args.seconds:g} --reps {args.reps} --out docs/benchmarks.md`, {result['date']}, "
                f"{result['machine']}: one daemon per run, default settings but `output.batch_bytes`, "
                f"{args.rate:,.0f} readings/s round robin over {args.streams:,} streams for {args.seconds:g} s, "
                "in the order run.\n\n"
                "| output.batch_bytes | commits | time per commit | checkpoints of the last commit | behind at the "
                "end (readings) |\n|---|---|---|---|---|\n" + rows)
        replace_section(args.out, "checkpoints", "What a commit costs with many streams", body)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
