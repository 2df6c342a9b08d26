"""Memory over time: `detector run` under a steady load through a real Kafka, resident memory sampled.

    python bench/soak.py [--minutes 10] [--streams 1000] [--rate 2000] [--out docs/benchmarks.md]

Starts a local broker (deploy/kafka/kafka.sh), a daemon with default settings and a model of issue 6's shape
(8 features, window 64, hop 16, hidden 48, untrained), and a producer that sends `rate` readings per second of
`streams` streams, one JSON reading per message, for the whole run. After one minute of warm-up (every stream
has a full window by then at the default rate) the daemon's resident set size (VmRSS) is read every 10 s.
The figure is the spread of the samples: (max - min) / first, which issue 6 wants within 5 %. It also reports
the lag at the end, so that a daemon that fell behind (and so held less) is seen. Results go to
bench/results/soak.json and, with --out, to the soak section of the markdown file.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from kafka import KafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import FEATURES, T0, config, model  # noqa: E402
from bench.report import machine, replace_section  # noqa: E402
from tests.kafka_broker import KafkaBroker, create_topic  # noqa: E402
from tests.reliability import DaemonProc, total_committed  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class SteadyProducer(threading.Thread):
    """Sends `rate` readings per second of `streams` streams (round robin, event time one minute apart)."""

    def __init__(self, bootstrap: str, topic: str, streams: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.streams, self.rate = bootstrap, topic, streams, rate
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        """Send until stopped, in slices of 1/20 s."""
        import numpy as np

        rng = np.random.default_rng(0)
        p = KafkaProducer(bootstrap_servers=self.bootstrap, acks=1, linger_ms=5)
        t0 = time.monotonic()
        per_slice = max(int(self.rate / 20), 1)
        while not self.stop.is_set():
            vals = rng.normal(size=(per_slice, len(FEATURES))).round(3).tolist()
            for v in vals:
                s, step = self.sent % self.streams, self.sent // self.streams
                body = {"stream": f"m{s}", "ts": T0 + 60.0 * step, "values": dict(zip(FEATURES, v, strict=True))}
                p.send(self.topic, key=f"m{s}".encode(), value=orjson.dumps(body))
                self.sent += 1
            ahead = t0 + self.sent / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        p.flush()
        p.close()


def main() -> int:
    """Run the soak and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=2000.0, help="readings per second sent")
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--out", help="markdown file whose soak section is replaced by the results")
    args = ap.parse_args()
    work = ROOT / "bench" / "results" / "soak-work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model(work / "model")
    with KafkaBroker(heap_opts="-Xms512m -Xmx1g") as broker:
        bs = broker.bootstrap
        assert bs is not None
        topic = create_topic(bs, f"soak-{uuid.uuid4().hex[:8]}", 4)
        cfg, group = config(work, bs, topic, model_dir)
        daemon = DaemonProc(cfg, work / f"{group}.log").start()
        assert daemon.proc is not None
        producer = SteadyProducer(bs, topic, args.streams, args.rate)
        producer.start()
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        try:
            while (elapsed := time.monotonic() - t0) < args.warmup_s + args.minutes * 60:
                if not daemon.alive():
                    raise RuntimeError(daemon.text()[-3000:])
                if elapsed >= args.warmup_s:
                    samples.append((round(elapsed), rss_mib(daemon.proc.pid)))
                    print(f"{elapsed:6.0f} s  RSS {samples[-1][1]:7.1f} MiB  sent {producer.sent:,}", flush=True)
                time.sleep(10)
        finally:
            producer.stop.set()
            producer.join(30)
        lag = producer.sent - total_committed(bs, group, topic)
        assert daemon.stop() == 0, daemon.text()[-3000:]
    rss = [r for _, r in samples]
    spread = (max(rss) - min(rss)) / rss[0]
    result = {"machine": machine(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "minutes": args.minutes, "streams": args.streams,
              "rate": args.rate, "sent": producer.sent, "uncommitted_at_end": lag,
              "rss_first_mib": rss[0], "rss_last_mib": rss[-1], "rss_min_mib": min(rss), "rss_max_mib": max(rss),
              "rss_spread": round(spread, 4), "samples": samples}
    (ROOT / "bench" / "results" / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        body = (f"\n`python bench/soak.py --minutes {args.minutes:g} --streams {args.streams} --rate {args.rate:g} "
                f"--out docs/benchmarks.md`, {result['date']}, {result['machine']}: one daemon, default settings, "
                f"{args.rate:,.0f} readings/s of {args.streams:,} streams for {args.minutes:g} minutes after "
                f"{args.warmup_s:.0f} s of warm-up; resident memory read every 10 s.\n\n"
                "| first | last | min | max | spread (max - min) / first | target (issue 6) | behind at the end |\n"
                "|---|---|---|---|---|---|---|\n"
                f"| {rss[0]:.1f} MiB | {rss[-1]:.1f} MiB | {min(rss):.1f} MiB | {max(rss):.1f} MiB | "
                f"{spread:.1%} | within 5 % | {lag:,} readings |\n")
        replace_section(args.out, "soak", "Memory over a steady run", body)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
