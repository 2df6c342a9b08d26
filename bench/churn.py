"""Memory under stream churn: many distinct stream ids over time, a few thousand at once, through a real Kafka.

    python bench/churn.py [--distinct 100000] [--active 2000] [--life 10] [--forget 600 0] [--out docs/benchmarks.md]

Fills a topic of a local broker (4 partitions) with one reading a minute (event time) from each of `active`
streams at a time: every stream sends `life` readings and is then replaced by a new id, so that `distinct`
ids appear over the run. Then `detector run` (a model of the memory bench's shape, untrained;
`scoring.max_gap_s` 600) drains it once per `--forget` value, each time with a fresh group: by default with
`scoring.forget_after_s: 600` (a stream ten minutes silent is forgotten, its row reused) and with `0` (never
forgotten: every id ever seen stays, as before 2026-12-07; at a million ids that needs several GB, so
`--forget 600` alone there). While it drains, the daemon's resident memory (VmRSS) and `detector_active_streams` are
sampled every 0.5 s. After the first fifth of the input (warm-up), the figure is the largest distance of an
RSS sample from the samples' median, as a share of the median (issue 22 wants it within 10 %).
Results go to bench/results/churn.json and, with --out, to the churn section of the markdown file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import FEATURES, T0, config, model, produce  # noqa: E402
from bench.report import machine, replace_section  # noqa: E402
from bench.soak import rss_mib  # noqa: E402
from tests.kafka_broker import KafkaBroker, create_topic  # noqa: E402
from tests.reliability import DaemonProc, total_committed  # noqa: E402


def churn(distinct: int, active: int, life: int) -> Iterator[tuple[bytes, bytes]]:
    """(key, JSON reading) in time order: `active` streams at a time, each for `life` readings, `distinct` ids
    (made as sent: ten million readings would not fit in memory as a list)."""
    new = max(active // life, 1)  # ids that start (and retire) each minute
    ticks = max(distinct // new - life + 1, 1)
    rng = np.random.default_rng(0)
    for t in range(ticks):
        vals = rng.normal(size=(life * new, len(FEATURES))).round(3)
        for i, k in enumerate(range(t * new, (t + life) * new)):
            sid = f"c{k:07d}"
            yield sid.encode(), orjson.dumps({"stream": sid, "ts": T0 + 60.0 * t,
                                              "values": dict(zip(FEATURES, vals[i].tolist(), strict=True))})


def gauge(port: int, name: str) -> float:
    """One sample of the daemon's metrics (NaN when it cannot be read)."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return float("nan")
    found = re.search(rf"^{name} (\S+)$", body, re.M)
    return float(found.group(1)) if found else float("nan")


def drain(bootstrap: str, topic: str, total: int, model_dir: Path, work: Path, forget_after_s: float) -> dict:
    """One daemon draining the topic with this forget_after_s; RSS and held streams sampled meanwhile."""
    cfg, group = config(work, bootstrap, topic, model_dir,
                        extra=f"scoring: {{max_gap_s: 600, forget_after_s: {forget_after_s:g}}}")
    port = int(re.search(r"metrics: \{port: (\d+)\}", cfg.read_text()).group(1))  # type: ignore[union-attr]
    daemon = DaemonProc(cfg, work / f"{group}.log").start()
    assert daemon.proc is not None
    samples = []  # (share of the input committed, RSS MiB, streams held)
    t0 = time.monotonic()
    while (done := total_committed(bootstrap, group, topic)) < total:
        if not daemon.alive() or time.monotonic() - t0 > 1800:
            raise RuntimeError(f"{done} of {total} committed: {daemon.text()[-3000:]}")
        samples.append((done / total, rss_mib(daemon.proc.pid), gauge(port, "detector_active_streams")))
        time.sleep(0.5)
    seconds = time.monotonic() - t0
    time.sleep(1.0)  # the gauges are set after the commit that finished the input
    samples.append((1.0, rss_mib(daemon.proc.pid), gauge(port, "detector_active_streams")))
    forgotten = gauge(port, "detector_forgotten_streams_total")
    assert daemon.stop() == 0, daemon.text()[-3000:]
    after = [(s, r, n) for s, r, n in samples if s >= 0.2]
    rss = [r for _, r, _ in after]
    med = statistics.median(rss)
    held = [n for *_, n in after if n == n]
    return {"forget_after_s": forget_after_s, "seconds": round(seconds, 1), "samples": len(after),
            "rss_median_mib": round(med, 1), "rss_min_mib": round(min(rss), 1), "rss_max_mib": round(max(rss), 1),
            "rss_max_off_median": round(max(abs(r - med) for r in rss) / med, 4),
            "rss_first_last_mib": [round(rss[0], 1), round(rss[-1], 1)],
            "held_min": int(min(held)), "held_max": int(max(held)), "forgotten": forgotten}


def main() -> int:
    """Fill the topic, drain it with and without forgetting, write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distinct", type=int, default=100_000)
    ap.add_argument("--active", type=int, default=2000)
    ap.add_argument("--life", type=int, default=10, help="readings (minutes) each stream sends")
    ap.add_argument("--forget", type=float, nargs="+", default=[600.0, 0.0],
                    help="scoring.forget_after_s of each drain (0: never forgotten)")
    ap.add_argument("--out", help="markdown file whose churn section is replaced by the results")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "churn.json"), help="JSON results file")
    args = ap.parse_args()
    work = ROOT / "bench" / "results" / "churn-work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model(work / "model")
    runs, total = [], 0

    def counted() -> Iterator[tuple[bytes, bytes]]:
        nonlocal total
        for item in churn(args.distinct, args.active, args.life):
            total += 1
            yield item

    with KafkaBroker(heap_opts="-Xms512m -Xmx1g") as broker:
        bs = broker.bootstrap
        assert bs is not None
        topic = create_topic(bs, f"churn-{uuid.uuid4().hex[:8]}", 4)
        produce(bs, topic, counted())
        for forget in args.forget:
            runs.append(drain(bs, topic, total, model_dir, work, forget))
            print(runs[-1], flush=True)
    result = {"machine": machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d"), "distinct": args.distinct,
              "active": args.active, "life": args.life, "readings": total, "runs": runs}
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        table = ["| `scoring.forget_after_s` | drained in | RSS median (min to max), MiB | largest distance from the "
                 "median | RSS first / last after warm-up, MiB | streams held (min to max) | forgotten |",
                 "|---|---|---|---|---|---|---|"]
        table += [f"| {r['forget_after_s']:g} | {r['seconds']} s | {r['rss_median_mib']} ({r['rss_min_mib']} to "
                  f"{r['rss_max_mib']}) | {r['rss_max_off_median']:.1%} | {r['rss_first_last_mib'][0]} / "
                  f"{r['rss_first_last_mib'][1]} | {r['held_min']:,} to {r['held_max']:,} | {r['forgotten']:,.0f} |"
                  for r in runs]
        forget = " ".join(f"{f:g}" for f in args.forget)
        note = (f"\n`python bench/churn.py --distinct {args.distinct} --active {args.active} --life {args.life} "
                f"--forget {forget} --out docs/benchmarks.md`, {result['date']}, {result['machine']}: {total:,} "
                f"readings of {args.distinct:,} stream ids, {args.active:,} at a time, each for {args.life} minutes "
                "of event time; one daemon drains the filled topic (4 partitions) per row, samples after the first "
                "fifth of the input.\n\n")
        replace_section(args.out, "churn", "Memory under stream churn", note + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
