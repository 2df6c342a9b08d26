"""Resident memory per stream, against the bytes its state needs.

    python bench/memory.py [--streams 10000 100000] [--out docs/benchmarks.md]

For each fleet size S, a fresh process builds the daemon's pipeline around a model of the issue's shape
(8 features, window 64, hop 16, hidden 48; untrained: memory does not depend on the weights). It then feeds
every stream a full window of readings through `Pipeline.process`, in batches as the daemon would get them.
The resident set size (VmRSS) is read after the model is loaded and again after the fleet is in (and the
last batch let go), so the difference per stream is what the streams cost beyond the model. Both readings
are taken after glibc's `malloc_trim`, which hands the heap's free pages back: without it RSS also counts
what the allocator keeps from the batches' working memory (decoded JSON, padded input, torch's
intermediates), which does not grow with the fleet. That untrimmed figure is reported beside it.
The need per stream is the bytes of that stream's whole state: `Pipeline.export_rows` for one stream, which
is exactly what a checkpoint holds (window buffer and mask, h and c per layer, counters, threshold and alert
state). The ratio of the two is the figure.
Results go to bench/results/memory.json and, with --out, to the memory section of the markdown file.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, replace_section  # noqa: E402
from detector.heap import release_free_heap  # noqa: E402,F401 (the benches take it from here)

F, WINDOW, HOP, HIDDEN = 8, 64, 16, 48


def rss_bytes() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def artifact():  # noqa: ANN201 (an Artifact; torch is imported late)
    """An untrained model of the benches' shape (8 features, window 64, hop 16, hidden 48), in memory."""
    import numpy as np

    from detector.artifact import Artifact, Manifest
    from detector.model import LSTMAutoencoder
    from detector.train import CALIBRATION_LEVELS

    n = len(CALIBRATION_LEVELS)
    manifest = Manifest(features=[f"f{i}" for i in range(F)], scaler_mean=[0.0] * F, scaler_std=[1.0] * F,
                        window=WINDOW, hop=HOP, hidden_size=HIDDEN, num_layers=1, error_mean=[0.0] * F,
                        error_std=[1.0] * F, calibration_levels=list(CALIBRATION_LEVELS),
                        calibration_scores=list(np.linspace(0.5, 50.0, n)), name="bench", model_version="bench-1")
    return Artifact(LSTMAutoencoder(F, HIDDEN, 1, WINDOW).eval(), manifest, Path("."))


def measure(streams: int) -> dict:
    """One fleet size, in this process (call it in a fresh one)."""
    import numpy as np
    import orjson
    import torch

    from consumers.base import Record
    from detector.config import Config
    from detector.pipeline import Pipeline

    torch.set_num_threads(2)
    feats = [f"f{i}" for i in range(F)]
    pipe = Pipeline(Config(), artifact(), "cpu")
    rng = np.random.default_rng(0)
    warm = [Record("in", 0, i, b"w", orjson.dumps({"stream": "w", "ts": 1.7e9 + i, "values": dict(
        zip(feats, rng.normal(size=F).tolist(), strict=True))}), 0) for i in range(WINDOW)]
    pipe.process(warm, now=2e9)  # the model's working memory, once
    gc.collect()
    before_kept = rss_bytes()
    release_free_heap()
    before = rss_bytes()
    offset = 0
    for t in range(WINDOW):
        for s0 in range(0, streams, 20000):
            recs = []
            for s in range(s0, min(s0 + 20000, streams)):
                body = {"stream": f"pump-{s:06d}", "ts": 1.7e9 + 60 * t,
                        "values": dict(zip(feats, rng.normal(size=F).round(3).tolist(), strict=True))}
                recs.append(Record("in", s % 4, offset, f"pump-{s:06d}".encode(), orjson.dumps(body), 0))
                offset += 1
            pipe.process(recs, now=2e9)
    del recs  # the last batch: not the streams' memory
    gc.collect()
    after_kept = rss_bytes()
    release_free_heap()
    after = rss_bytes()
    need = sum(v.nbytes for v in pipe.export_rows(np.array([0])).values())
    per_stream = (after - before) / streams
    return {"streams": streams, "rss_before_mib": round(before / 2**20, 1), "rss_after_mib": round(after / 2**20, 1),
            "bytes_per_stream": round(per_stream), "state_bytes_per_stream": need,
            "ratio_to_state_bytes": round(per_stream / need, 2), "capacity_rows": pipe.engine.capacity,
            "rss_after_untrimmed_mib": round(after_kept / 2**20, 1),
            "ratio_untrimmed": round((after_kept - before_kept) / streams / need, 2)}


def main() -> int:
    """Measure each fleet size in its own process and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--out", help="markdown file whose memory section is replaced by the results")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    rows = []
    for s in args.streams:
        out = subprocess.run([sys.executable, __file__, "--one", str(s)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {"machine": machine(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "model": f"{F} features, window {WINDOW}, hop {HOP}, "
              f"hidden {HIDDEN}, 1 layer", "results": rows}
    (ROOT / "bench" / "results" / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        table = ["| streams | RSS before / after (MiB) | bytes per stream | state bytes per stream | ratio | "
                 "untrimmed: RSS after (MiB), ratio |", "|---|---|---|---|---|---|"]
        table += [f"| {r['streams']:,} | {r['rss_before_mib']} / {r['rss_after_mib']} | {r['bytes_per_stream']:,} | "
                  f"{r['state_bytes_per_stream']:,} | {r['ratio_to_state_bytes']} | "
                  f"{r['rss_after_untrimmed_mib']}, {r['ratio_untrimmed']} |" for r in rows]
        note = (f"\n`python bench/memory.py --out docs/benchmarks.md`, {result['date']}, {result['machine']}; "
                f"model: {result['model']}; default config (calibrated thresholds).\n\n")
        replace_section(args.out, "memory", "Memory per stream", note + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
