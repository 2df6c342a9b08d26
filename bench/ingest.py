"""Ingest through a real Kafka: the daemon against a bare consumer, batched payloads, and latency under load.

    python bench/ingest.py [--messages 500000] [--streams 1000] [--out docs/benchmarks.md]

Starts a local broker (deploy/kafka/kafka.sh) and measures, side by side in one run:
1. bare: a kafka-python poll loop that only counts the messages of a 4-partition topic (one JSON reading per
   message, `streams` streams, 8 features), with the daemon's fetch settings;
2. daemon: `detector run` over the same topic, scoring everything end to end (alerts produced, offsets
   committed), from its first commit to its last; the ratio daemon / bare is the figure;
3. batched: the same readings packed 100 per message (the batched JSON form, a list of readings), through
   `detector run`; once more in the columnar batched form (a list of times and one list per feature); and the
   columnar form again with `model.precision: bfloat16` (a fresh group), where the CPU runs it (not on a CPU
   whose oneDNN has no bfloat16 LSTM: the output says so);
4. latency: readings produced at half the daemon's measured rate for 30 s, twice: with the streams' hop
   boundaries staggered (the figure; streams started at different times) and all aligned (a burst of every
   window at once, the worst case); for every scored window, the time
   from the producer's timestamp of the window's newest reading to the broker's append time of the window's
   score record (`output.scores_topic`, LogAppendTime): what an alert raised by that window would take to be
   acknowledged.
The model has the issue's shape (8 features, window 64, hop 16, hidden 48) and is untrained: speed does not
depend on the weights. Results go to bench/results/ingest.json and, with --out, to the ingest section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from bench.report import machine, replace_section  # noqa: E402
from detector.artifact import Manifest, load_artifact, save_artifact  # noqa: E402
from detector.engine import Engine  # noqa: E402
from detector.errors import ModelError  # noqa: E402
from detector.loadgen import columnar  # noqa: E402
from detector.model import LSTMAutoencoder  # noqa: E402
from detector.train import CALIBRATION_LEVELS  # noqa: E402
from tests.kafka_broker import KafkaBroker, create_topic, free_ports  # noqa: E402
from tests.reliability import DaemonProc, total_committed  # noqa: E402

F, WINDOW, HOP, HIDDEN = 8, 64, 16, 48
FEATURES = [f"f{i}" for i in range(F)]
T0 = 1.7e9


def model(path: Path) -> Path:
    """An untrained model of the issue's shape, saved."""
    torch.manual_seed(0)
    n = len(CALIBRATION_LEVELS)
    manifest = Manifest(features=FEATURES, scaler_mean=[0.0] * F, scaler_std=[1.0] * F, window=WINDOW, hop=HOP,
                        hidden_size=HIDDEN, num_layers=1, error_mean=[0.0] * F, error_std=[1.0] * F,
                        calibration_levels=list(CALIBRATION_LEVELS),
                        calibration_scores=list(np.linspace(0.5, 1e6, n)), name="bench", model_version="bench-1")
    return save_artifact(path, LSTMAutoencoder(F, HIDDEN, 1, WINDOW).eval(), manifest)


def readings(streams: int, per_stream: int, start: int = 0) -> list[tuple[bytes, dict]]:
    """(key, reading) in time order: `per_stream` readings of every stream, from step `start`."""
    rng = np.random.default_rng(start)
    vals = rng.normal(size=(per_stream, streams, F)).round(3)
    return [(f"m{s}".encode(), {"stream": f"m{s}", "ts": T0 + 60.0 * (start + t),
                                "values": dict(zip(FEATURES, vals[t, s].tolist(), strict=True))})
            for t in range(per_stream) for s in range(streams)]


def produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    """Send everything as fast as the producer goes."""
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=256 * 1024)
    for k, v in items:
        p.send(topic, key=k, value=v)
    p.flush()
    p.close()


def bare(bootstrap: str, topic: str, total: int) -> float:
    """Messages per second of a poll loop that only counts, from its first record to its last."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      max_poll_records=5000, isolation_level="read_committed")
    tps = [TopicPartition(topic, p) for p in range(4)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    n, t_first = 0, None
    while n < total:
        got = c.poll(timeout_ms=1000)
        if got and t_first is None:
            t_first = time.monotonic()
        n += sum(len(v) for v in got.values())
    rate = n / (time.monotonic() - t_first)
    c.close()
    return rate


def config(work: Path, bootstrap: str, topic: str, model_dir: Path, extra: str = "",
           precision: str = "float32") -> tuple[Path, str]:
    """A daemon config with fresh output topics and group."""
    group = f"bench-{uuid.uuid4().hex[:8]}"
    alerts, dlq = (create_topic(bootstrap, f"{k}-{group}", 2) for k in ("alerts", "dlq"))
    cfg = work / f"{group}.yaml"
    cfg.write_text(f"""
kafka: {{bootstrap_servers: "{bootstrap}"}}
input: {{topics: [{topic}], group_id: {group}, max_message_bytes: 4194304}}
output: {{alerts_topic: {alerts}, dead_letter_topic: {dlq}}}
model: {{path: "{model_dir}", device: cpu, precision: {precision}}}
metrics: {{port: {free_ports(1)[0]}}}
runtime: {{log_level: WARNING}}
{extra}
""")
    return cfg, group


def commit_progress(d: DaemonProc, bootstrap: str, group: str, topic: str, total: int,
                    timeout_s: float = 900.0) -> tuple[int, float]:
    """Wait until the group has committed `total` offsets of the topic while the daemon runs.

    Returns the count at the first commit seen and the seconds from then to the last one; RuntimeError (with
    the daemon's log) if it dies or the time runs out.
    """
    t_first = c_first = None
    deadline = time.monotonic() + timeout_s
    while True:
        done = total_committed(bootstrap, group, topic)
        if done and t_first is None:
            t_first, c_first = time.monotonic(), done
        if done >= total:
            break
        if not d.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{done} of {total} committed: {d.text()[-3000:]}")
        time.sleep(0.05)
    assert t_first is not None and c_first is not None
    return c_first, time.monotonic() - t_first


def daemon_rate(cfg: Path, group: str, bootstrap: str, topic: str, total_msgs: int, readings_per_msg: int,
                work: Path) -> float:
    """Readings per second of `detector run`, from its first commit to the last."""
    d = DaemonProc(cfg, work / f"{group}.log").start()
    c_first, seconds = commit_progress(d, bootstrap, group, topic, total_msgs)
    assert d.stop() == 0, d.text()[-3000:]
    assert seconds > 0, "no progress measured"
    return (total_msgs - c_first) * readings_per_msg / seconds


def latency(bootstrap: str, model_dir: Path, work: Path, streams: int, rate: float, seconds: float,
            staggered: bool = False) -> dict:
    """Produce-to-acknowledged latency of window scores at `rate` readings per second.

    The readings go round robin over the streams, so every stream reaches its hop boundary at the same moment
    and all windows fall due at once. With `staggered`, stream s first gets `s % hop` more warm-up readings,
    which spreads the boundaries over the hop, as streams started at different times would have them.
    """
    topic = create_topic(bootstrap, f"lat-{uuid.uuid4().hex[:8]}", 4)
    scores = create_topic(bootstrap, f"scores-{uuid.uuid4().hex[:8]}", 4, {"message.timestamp.type": "LogAppendTime"})
    cfg, group = config(work, bootstrap, topic, model_dir, extra="")
    cfg.write_text(cfg.read_text().replace("output: {", f"output: {{scores_topic: {scores}, "))
    # warm every stream to a full window first, so that every later hop scores
    extra = [s % HOP if staggered else 0 for s in range(streams)]
    warm = [(k, v) for k, v in readings(streams, WINDOW + HOP) if v["ts"] < T0 + 60.0 * (WINDOW + extra[int(k[1:])])]
    produce(bootstrap, topic, [(k, orjson.dumps(v)) for k, v in warm])
    d = DaemonProc(cfg, work / f"{group}.log").start()
    commit_progress(d, bootstrap, group, topic, len(warm))
    steps = int(rate * seconds / streams)
    items = readings(streams, steps, start=WINDOW + HOP)
    sent: dict[tuple[str, float], float] = {}
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
    t0 = time.monotonic()
    slice_n = max(int(rate / 50), 1)
    for i in range(0, len(items), slice_n):
        for k, v in items[i : i + slice_n]:
            ts_ms = int(time.time() * 1000)
            p.send(topic, key=k, value=orjson.dumps(v), timestamp_ms=ts_ms)
            sent[(v["stream"], v["ts"])] = ts_ms
        ahead = t0 + (i + slice_n) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    p.flush()
    sent_in = time.monotonic() - t0  # above `seconds` when the load generator could not keep the rate
    p.close()
    commit_progress(d, bootstrap, group, topic, len(warm) + streams * steps)
    assert d.stop() == 0, d.text()[-3000:]
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, consumer_timeout_ms=3000)
    tps = [TopicPartition(scores, q) for q in range(4)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    lat = []
    for m in c:
        s = orjson.loads(m.value)
        t_in = sent.get((s["stream"], s["end"]))
        if t_in is not None:
            lat.append(m.timestamp - t_in)
    c.close()
    a = np.array(lat, dtype=float)
    return {"rate": round(rate), "sent_rate": round(len(items) / sent_in), "windows": len(a),
            "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def main() -> int:
    """Run the four measurements and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500_000)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--latency-seconds", type=float, default=30.0)
    ap.add_argument("--out", help="markdown file whose ingest section is replaced by the results")
    args = ap.parse_args()
    work = ROOT / "bench" / "results" / "ingest-work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model(work / "model")
    per_stream = args.messages // args.streams
    total = per_stream * args.streams
    with KafkaBroker(heap_opts="-Xms512m -Xmx1g") as broker:
        bs = broker.bootstrap
        assert bs is not None
        single = create_topic(bs, f"single-{uuid.uuid4().hex[:8]}", 4)
        produce(bs, single, [(k, orjson.dumps(v)) for k, v in readings(args.streams, per_stream)])
        rate_bare = bare(bs, single, total)
        print(f"bare consumer: {rate_bare:,.0f} messages/s", flush=True)
        cfg, group = config(work, bs, single, model_dir)
        rate_daemon = daemon_rate(cfg, group, bs, single, total, 1, work)
        print(f"daemon: {rate_daemon:,.0f} readings/s", flush=True)
        packed = create_topic(bs, f"packed-{uuid.uuid4().hex[:8]}", 4)
        rows = readings(args.streams, per_stream * 2)
        by_stream: dict[bytes, list] = {}
        for k, v in rows:
            by_stream.setdefault(k, []).append({"ts": v["ts"], "values": v["values"]})
        msgs = [(k, orjson.dumps({"stream": k.decode(), "readings": rs[i : i + 100]}))
                for i in range(0, per_stream * 2, 100) for k, rs in by_stream.items()]
        produce(bs, packed, msgs)
        cfg_b, group_b = config(work, bs, packed, model_dir)
        rate_batched = daemon_rate(cfg_b, group_b, bs, packed, len(msgs), 100, work)
        print(f"batched payloads: {rate_batched:,.0f} readings/s", flush=True)
        cols = create_topic(bs, f"columns-{uuid.uuid4().hex[:8]}", 4)
        produce(bs, cols, [(k, orjson.dumps({"stream": k.decode(), "readings": columnar(rs[i : i + 100], FEATURES)}))
                           for i in range(0, per_stream * 2, 100) for k, rs in by_stream.items()])
        cfg_c, group_c = config(work, bs, cols, model_dir)
        rate_columnar = daemon_rate(cfg_c, group_c, bs, cols, len(msgs), 100, work)
        print(f"batched payloads, columnar form: {rate_columnar:,.0f} readings/s", flush=True)
        try:
            Engine(load_artifact(model_dir), device="cpu", capacity=1, precision="bfloat16")  # as the daemon would
            cfg_m, group_m = config(work, bs, cols, model_dir, precision="bfloat16")
            rate_mixed: float | None = daemon_rate(cfg_m, group_m, bs, cols, len(msgs), 100, work)
            mixed = f"{rate_mixed:,.0f} readings/s"
        except ModelError as exc:
            rate_mixed, mixed = None, f"not run: {exc}"
        print(f"batched payloads, columnar form, model.precision bfloat16: {mixed}", flush=True)
        lat = latency(bs, model_dir, work, args.streams, rate_daemon / 2, args.latency_seconds, staggered=True)
        print(f"latency at {lat['rate']:,}/s, windows staggered: {lat}", flush=True)
        burst = latency(bs, model_dir, work, args.streams, rate_daemon / 2, args.latency_seconds)
        print(f"latency at {burst['rate']:,}/s, every window due at once: {burst}", flush=True)
    result = {"machine": machine(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "streams": args.streams, "messages": total,
              "bare_messages_per_s": round(rate_bare), "daemon_readings_per_s": round(rate_daemon),
              "ingest_ratio_vs_bare_consumer": round(rate_daemon / rate_bare, 3),
              "batched_payload_readings_per_s": round(rate_batched),
              "batched_columnar_readings_per_s": round(rate_columnar),
              "batched_columnar_bfloat16_readings_per_s": None if rate_mixed is None else round(rate_mixed),
              "latency": lat, "latency_aligned": burst}
    (ROOT / "bench" / "results" / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        body = (f"\n`python bench/ingest.py --out docs/benchmarks.md`, {result['date']}, {result['machine']}; "
                f"{total:,} messages of {args.streams:,} streams, 4 partitions, one daemon, default settings.\n\n"
                "| measurement | figure | target (issue 6) |\n|---|---|---|\n"
                f"| bare kafka-python poll loop | {rate_bare:,.0f} messages/s | |\n"
                f"| `detector run`, one reading per message | {rate_daemon:,.0f} readings/s, "
                f"{rate_daemon / rate_bare:.2f} of bare | 0.8 of bare |\n"
                f"| `detector run`, 100 readings per message | {rate_batched:,.0f} readings/s | 300,000 |\n"
                f"| the same readings in the columnar batched form | {rate_columnar:,.0f} readings/s | |\n"
                f"| the columnar form with `model.precision: bfloat16` | {mixed} | |\n"
                f"| latency, produce to score acknowledged, at {lat['rate']:,} readings/s (the load generator "
                f"sent {lat['sent_rate']:,}/s), streams' windows staggered over the hop | p50 {lat['p50_ms']} ms, "
                f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
                f"({lat['windows']:,} windows) | p99 250 ms |\n"
                f"| the same, every stream's window due at the same moment (sent {burst['sent_rate']:,}/s) | "
                f"p50 {burst['p50_ms']} ms, "
                f"p99 {burst['p99_ms']} ms, max {burst['max_ms']} ms ({burst['windows']:,} windows) | |\n")
        replace_section(args.out, "ingest", "Ingest and latency through Kafka", body)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
