"""How long a restore of many streams takes, and the memory it needs beyond the streams it restores.

    python bench/restore.py [--streams 10000 100000] [--out docs/benchmarks.md] [--results FILE]

For each fleet size S, a fresh process builds the daemon's pipeline around a model of the memory bench's
shape (8 features, window 64, hop 16, hidden 48; untrained), gives each of S streams one reading on one of 4
input partitions, and takes every stream's checkpoint. Then, side by side on the same records:

- **decode**: `checkpoint.restore` into a fresh pipeline (records of one layout decoded in bulk into one
  array per field), against the same records decoded one by one with safetensors and grouped by layout, as
  restores did before 2026-12-07 (`per_record_restore` below), in seconds;
- **through Kafka**: the records written to a compacted topic of a local broker (4 partitions), then restored
  from it two ways, each into a fresh pipeline and timed from the first fetch to the last row set: the topic
  read to its end and then decoded (`StateTopic.read`, `restore`: what the daemon did before 2026-12-07),
  and each fetch decoded as it comes (`StateTopic.read_chunks`, `restore_chunks`: what a member does on
  assignment now). RSS is sampled every 20 ms meanwhile: the peak, against the steady state after it (the
  restored pipeline alone: records let go, glibc's free heap handed back).

Results go to bench/results/restore.json and, with --out, to the restore section of the markdown file.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memory import HIDDEN, HOP, WINDOW, F, artifact, release_free_heap, rss_bytes  # noqa: E402
from bench.report import machine, replace_section  # noqa: E402

PARTITIONS = 4
COMPARE_MAX = 200_000
"""Above this many streams only the daemon's way is measured: the comparisons hold every record (6 GB at 1 M)."""


def per_record_restore(pipeline, values: list[bytes]) -> int:  # noqa: ANN001 (a Pipeline; imported late)
    """The restore before bulk decoding: each record through safetensors, then one import per layout."""
    import numpy as np

    from detector.checkpoint import decode

    groups: dict[tuple, list] = {}
    for value in values:
        meta, arrays = decode(value)
        if meta["topic"] not in pipeline.topics:
            pipeline.topics.append(meta["topic"])
        arrays["pipeline.in_topic"] = np.array([pipeline.topics.index(meta["topic"])], np.int64)
        sig = tuple(sorted((k, v.shape, v.dtype.str) for k, v in arrays.items()))
        groups.setdefault(sig, []).append((meta["stream"], arrays))
    for items in groups.values():
        rows = pipeline.engine.rows_for(np.array([s for s, _ in items], dtype=object))
        pipeline.import_rows(rows, {k: np.concatenate([a[k] for _, a in items]) for k in items[0][1]})
    return len(values)


class PeakRss:
    """The largest RSS seen while it runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(streams: int, fetch_bytes: int | None = None) -> dict:
    """One fleet size, in this process (call it in a fresh one); `fetch_bytes`: the state topic's fetch size per
    partition (default: the daemon's)."""
    import numpy as np
    import orjson
    import torch
    from kafka import KafkaProducer

    import consumers.kafka
    from consumers.base import Record
    from consumers.kafka import StateTopic
    from detector.checkpoint import restore, restore_chunks, snapshot
    from detector.config import Config
    from detector.pipeline import Pipeline
    from tests.kafka_broker import KafkaBroker, create_topic

    torch.set_num_threads(2)
    feats = [f"f{i}" for i in range(F)]
    art = artifact()
    source = Pipeline(Config(), art, "cpu")
    rng = np.random.default_rng(0)
    for s0 in range(0, streams, 20000):
        source.process([Record("in", s % PARTITIONS, s, f"pump-{s:07d}".encode(), orjson.dumps(
            {"stream": f"pump-{s:07d}", "ts": 1.7e9, "values": dict(zip(feats, rng.normal(size=F).round(3).tolist(),
                                                                            strict=True))}), 0)
            for s in range(s0, min(s0 + 20000, streams))], now=2e9)
    compare = streams <= COMPARE_MAX
    out: dict = {"streams": streams}
    values: list[bytes] = []  # every record, kept for the comparisons only
    with KafkaBroker(heap_opts="-Xms512m -Xmx1g") as broker:
        topic = "state"
        create_topic(broker.bootstrap, topic, partitions=PARTITIONS, config={"cleanup.policy": "compact"})
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=20,
                                 batch_size=1 << 20, max_request_size=1 << 20)
        rows, written = source.take_dirty(), 0
        for lo in range(0, len(rows), 50000):  # a slice at a time: a million records are 6 GB
            for c in snapshot(source, rows[lo:lo + 50000]):
                producer.send(topic, key=c.stream.encode(), value=c.value, partition=c.partition)
                written += len(c.value)
                if compare:
                    values.append(c.value)
        producer.flush()
        producer.close()
        out["record_bytes"] = round(written / len(rows))
        del source, rows
        took = {}
        for name, fn in (("bulk", restore), ("per_record", per_record_restore)) if compare else ():
            target = Pipeline(Config(), art, "cpu")
            t0 = time.perf_counter()
            fn(target, values)
            took[name] = time.perf_counter() - t0
            out[f"decode_{name}_s"] = round(took[name], 2)
            del target
            gc.collect()
        if compare:  # from the times as measured: a few hundred streams decode in under 5 ms
            out["decode_speedup"] = round(took["per_record"] / took["bulk"], 1)
        del values
        if fetch_bytes:
            consumers.kafka.STATE_FETCH_BYTES = fetch_bytes
        state = StateTopic(broker.bootstrap, topic, client={})
        for way in ("whole", "fetched") if compare else ("fetched",):
            gc.collect()
            release_free_heap()
            target = Pipeline(Config(), art, "cpu")
            gc.collect()
            release_free_heap()
            base = rss_bytes()  # the model, the runtime and an empty pipeline's worth
            with PeakRss() as peak:
                t0 = time.perf_counter()
                if way == "whole":  # the state topic read to its end, then every record decoded
                    report = restore(target, state.read(set(range(PARTITIONS)), 600))
                else:  # what the daemon does: each fetch decoded as it comes
                    report = restore_chunks(target, state.read_chunks(set(range(PARTITIONS)), 600,
                                                                      expect=target.engine.reserve))
                took = time.perf_counter() - t0
                gc.collect()
            release_free_heap()
            steady = rss_bytes()
            assert report.restored == streams, report
            out.update({f"{way}_s": round(took, 2), f"{way}_rss_base_mib": round(base / 2**20),
                        f"{way}_rss_peak_mib": round(peak.peak / 2**20), f"{way}_rss_steady_mib": round(steady / 2**20),
                        f"{way}_peak_over_steady": round(peak.peak / steady, 2)})
            del target, report
    return out


def main() -> int:
    """Measure each fleet size in its own process and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--out", help="markdown file whose restore section is replaced by the results")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "restore.json"), help="JSON results file")
    ap.add_argument("--fetch-bytes", type=int, help="state topic fetch size per partition (default: the daemon's)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.fetch_bytes)))
        return 0
    rows = []
    for s in args.streams:
        extra = ["--fetch-bytes", str(args.fetch_bytes)] if args.fetch_bytes else []
        done = subprocess.run([sys.executable, __file__, "--one", str(s), *extra], capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {"machine": machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "model": f"{F} features, window {WINDOW}, hop {HOP}, hidden {HIDDEN}, 1 layer", "results": rows}
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        table = ["| streams | record bytes | decode only: bulk / one by one (s), speed-up | through Kafka, read "
                 "whole then decoded: s, RSS base / peak / steady (MiB), peak / steady | decoded as fetched (the "
                 "daemon's way): s, RSS base / peak / steady (MiB), peak / steady |", "|---|---|---|---|---|"]
        table += [f"| {r['streams']:,} | {r['record_bytes']:,} | " + (
                      f"{r['decode_bulk_s']} / {r['decode_per_record_s']}, {r['decode_speedup']}x"
                      if "decode_bulk_s" in r else "not run") + " | " + " | ".join(
                      f"{r[w + '_s']} s, {r[w + '_rss_base_mib']} / {r[w + '_rss_peak_mib']} / "
                      f"{r[w + '_rss_steady_mib']}, {r[w + '_peak_over_steady']}" if w + "_s" in r else "not run"
                      for w in ("whole", "fetched")) + " |" for r in rows]
        sizes = " ".join(str(n) for n in args.streams)
        note = (f"\n`python bench/restore.py --streams {sizes} --out docs/benchmarks.md`, {result['date']}, "
                f"{result['machine']}; model: {result['model']}; {PARTITIONS} partitions, one checkpoint per stream; "
                f"above {COMPARE_MAX:,} streams only the daemon's way (the comparisons hold every record).\n\n")
        replace_section(args.out, "restore", "Restores", note + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
