"""Scoring throughput: the batched engine against the same model run stream by stream, side by side.

    python bench/throughput.py [--streams 100 1000] [--batches 20] [--out docs/benchmarks.md]

For each fleet size S it builds a model of the demo's shape (8 features, window 32, hop 8, hidden 48,
untrained: speed does not depend on the weights), warms every stream up to a full window, then times:

- engine, batched: `Engine.score_batch` over poll batches of S streams x hop readings (one model call per
  batch, every stream scores one window);
- engine, stream by stream: the same readings, one `score_batch` call per stream (what a per-stream loop
  costs), on a smaller sample of streams when S is large;
- pipeline, batched: `Pipeline.process` on the same batches as JSON records (decode, engine, thresholds,
  alert state machine): what the daemon does per poll, minus Kafka.

Rates are readings per second, best of three repetitions; the ratio batched / stream by stream is measured in
the same run. With --out the table replaces the section between the markers in that file.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.base import Record  # noqa: E402
from detector.artifact import Artifact, Manifest  # noqa: E402
from detector.config import Config  # noqa: E402
from detector.decode import Readings  # noqa: E402
from detector.engine import Engine, pick_device  # noqa: E402
from detector.model import LSTMAutoencoder  # noqa: E402
from detector.pipeline import Pipeline  # noqa: E402
from detector.train import CALIBRATION_LEVELS  # noqa: E402

F, WINDOW, HOP, HIDDEN = 8, 32, 8, 48
FEATURES = [f"f{i}" for i in range(F)]
BEGIN, END = "<!-- bench:throughput:begin -->", "<!-- bench:throughput:end -->"


def artifact() -> Artifact:
    """An untrained model of the demo's shape with a complete manifest."""
    torch.manual_seed(0)
    n = len(CALIBRATION_LEVELS)
    manifest = Manifest(features=FEATURES, scaler_mean=[0.0] * F, scaler_std=[1.0] * F, window=WINDOW, hop=HOP,
                        hidden_size=HIDDEN, num_layers=1, error_mean=[0.0] * F, error_std=[1.0] * F,
                        calibration_levels=list(CALIBRATION_LEVELS),
                        calibration_scores=list(np.linspace(0.5, 50.0, n)), name="bench", model_version="bench-1")
    return Artifact(LSTMAutoencoder(F, HIDDEN, 1, WINDOW).eval(), manifest, Path("."))


def batches(streams: int, n: int, start: float = 1.7e9) -> list[Readings]:
    """n poll batches; each holds HOP readings of every stream, in time order."""
    rng = np.random.default_rng(0)
    ids = np.array([f"m{s}" for s in range(streams)], dtype=object)
    out = []
    for b in range(n):
        ts = start + 60.0 * (b * HOP + np.repeat(np.arange(HOP), streams))
        out.append(Readings(np.tile(ids, HOP), ts, rng.normal(size=(streams * HOP, F)).astype(np.float32),
                            np.arange(streams * HOP)))
    return out


def as_records(r: Readings) -> list[Record]:
    """The readings as the JSON records the daemon would poll."""
    out = []
    for i, (s, t, v) in enumerate(zip(r.streams.tolist(), r.ts.tolist(), r.values.tolist(), strict=True)):
        body = orjson.dumps({"stream": s, "ts": t, "values": dict(zip(FEATURES, v, strict=True))})
        out.append(Record("in", 0, i, s.encode(), body, 0))
    return out


def take(r: Readings, idx: np.ndarray) -> Readings:
    """The readings at positions idx."""
    return Readings(r.streams[idx], r.ts[idx], r.values[idx], r.source[idx])


def bench(streams: int, n_batches: int, device: torch.device) -> dict[str, float]:
    """The three rates for one fleet size."""
    art = artifact()
    warm = batches(streams, WINDOW // HOP)
    data = batches(streams, n_batches, start=1.7e9 + 60.0 * WINDOW)
    total = n_batches * streams * HOP

    def fresh_engine() -> Engine:
        e = Engine(art, device=device, capacity=streams)
        for w in warm:
            e.score_batch(w)
        return e

    def batched() -> None:
        e = fresh_engine()
        t0 = time.perf_counter()
        for b in data:
            e.score_batch(b)
        batched.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(3):
            fn()
            best = min(best, fn.seconds)
        return total / best

    sample = min(streams, 100)  # stream by stream is slow: time a sample of streams, scale per reading
    per_stream_data = [[take(b, np.flatnonzero(b.streams == f"m{s}")) for b in data] for s in range(sample)]

    def one_by_one() -> None:
        e = fresh_engine()
        t0 = time.perf_counter()
        for s in range(sample):
            for part in per_stream_data[s]:
                e.score_batch(part)
        one_by_one.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]

    cfg = Config()
    records = [as_records(b) for b in data]
    warm_records = [as_records(b) for b in warm]

    def pipeline() -> None:
        p = Pipeline(cfg, art, str(device))
        for w in warm_records:
            p.process(w, now=2e9)
        t0 = time.perf_counter()
        for rec in records:
            p.process(rec, now=2e9)
        pipeline.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]

    rate_batched = timed(batched)
    best = float("inf")
    for _ in range(3):
        one_by_one()
        best = min(best, one_by_one.seconds)
    rate_single = sample * n_batches * HOP / best
    return {"batched": rate_batched, "single": rate_single, "pipeline": timed(pipeline)}


def main() -> int:
    """Run the benchmark, print the table, optionally write it into a markdown file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="markdown file whose throughput section is replaced by the results")
    args = ap.parse_args()
    device = pick_device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for s in args.streams:
        r = bench(s, args.batches, device)
        rows.append(f"| {s} | {r['batched']:,.0f} | {r['single']:,.0f} | {r['batched'] / r['single']:.0f}x "
                    f"| {r['pipeline']:,.0f} |")
        print(rows[-1], flush=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, device {device}"
               + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "")
               + f"; torch {torch.__version__}, Python {platform.python_version()}")
    table = "\n".join([
        BEGIN,
        f"Machine: {machine}. Command: `python bench/throughput.py --streams {' '.join(map(str, args.streams))} "
        f"--batches {args.batches}`. Readings per second, best of three; model of the demo's shape (8 features, "
        f"window {WINDOW}, hop {HOP}, hidden {HIDDEN}); each poll batch holds {HOP} readings of every stream.",
        "",
        "| streams | engine, batched | engine, stream by stream | ratio | pipeline (decode to alerts), batched |",
        "|---|---|---|---|---|",
        *rows,
        END,
    ])
    print(table)
    if args.out:
        path = Path(args.out)
        text = path.read_text() if path.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
        a, b = text.index(BEGIN), text.index(END) + len(END)
        path.write_text(text[:a] + table + text[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
