"""Scoring throughput: the batched engine against the same model run stream by stream, side by side.

    python bench/throughput.py [--streams 1000 10000 100000] [--window 64 --hop 16] [--device auto]
                               [--precision float32 bfloat16] [--relations off on] [--spikes off on]
                               [--out docs/benchmarks.md]

For each fleet size S it builds a model of issue 6's shape (8 features, window 64, hop 16, hidden 48,
untrained: speed does not depend on the weights), warms every stream up to a full window, then times:

- engine, batched: `Engine.score_batch` over poll batches of S streams x hop readings (one model call per
  batch, every stream scores one window);
- engine, stream by stream: the same readings, one `score_batch` call per stream (what a per-stream loop
  costs), on a smaller sample of streams when S is large;
- pipeline, batched: `Pipeline.process` on the same batches as JSON records (decode, engine, thresholds,
  alert state machine): what the daemon does per poll, minus Kafka. The records hold one reading each, or
  with --form columns each stream's readings of a batch in one message of the columnar batched form.

Rates are readings per second, best of three repetitions; the ratio batched / stream by stream is measured in
the same run. With several --precision values (model.precision: float32, bfloat16, float16 on CUDA, auto) each
fleet size is timed in each, one after the other in the same run; a precision the device cannot run (the
engine's test pass of the model fails: bfloat16 on a CPU without bfloat16 LSTM, float16 off CUDA) is not timed,
and the output says so and why. With --relations off on, each is timed without and with the cross-sensor
relation score (detector.relations; on in models `detector train` makes by default), and with --spikes off on
without and with the spike score (detector.spikes; on by default too). Large fleets time
fewer batches (about 2 million readings per repetition at most), and the pipeline is timed only up to
--pipeline-max streams (its JSON records of a 100,000-stream batch alone take gigabytes). Results go to
bench/results/throughput.json (throughput_cuda.json with --device cuda: bench/gpu.py writes gpu.json); with
--out the table replaces the section between the markers in that file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.base import Record  # noqa: E402
from detector.artifact import Artifact, Manifest  # noqa: E402
from detector.config import Config  # noqa: E402
from detector.decode import Readings  # noqa: E402
from detector.engine import PRECISIONS, Engine, pick_device  # noqa: E402
from detector.errors import ModelError  # noqa: E402
from detector.loadgen import columnar  # noqa: E402
from detector.model import LSTMAutoencoder  # noqa: E402
from detector.pipeline import Pipeline  # noqa: E402
from detector.train import CALIBRATION_LEVELS  # noqa: E402

F, HIDDEN = 8, 48
WINDOW, HOP = 64, 16  # set from --window and --hop
FEATURES = [f"f{i}" for i in range(F)]
BEGIN, END = "<!-- bench:throughput:begin -->", "<!-- bench:throughput:end -->"


def artifact(relation_streams: int = 0, spikes: bool = False) -> Artifact:
    """An untrained model of the demo's shape with a complete manifest; with `relation_streams`, a relation
    score (detector.relations, on by default in `detector train`) for streams m0, m1, ... of that many; with
    `spikes`, the spike score (detector.spikes)."""
    torch.manual_seed(0)
    n = len(CALIBRATION_LEVELS)
    rel: dict = {}
    if relation_streams:
        lin = np.full((F, F), 0.1) - 0.1 * np.eye(F)  # any fit costs the same: each sensor from the other seven
        rel = {"relation_streams": [f"m{s}" for s in range(relation_streams)],
               "relation_mean": [[0.0] * F] * relation_streams, "relation_std": [[1.0] * F] * relation_streams,
               "relation_lin": lin.tolist(), "relation_quad": (lin / 10).tolist(), "relation_bias": [0.0] * F,
               "relation_resid_std": [1.0] * F, "relation_use": [True] * F, "relation_weight": 1.0}
    manifest = Manifest(features=FEATURES, scaler_mean=[0.0] * F, scaler_std=[1.0] * F, window=WINDOW, hop=HOP,
                        hidden_size=HIDDEN, num_layers=1, error_mean=[0.0] * F, error_std=[1.0] * F,
                        calibration_levels=list(CALIBRATION_LEVELS),
                        calibration_scores=list(np.linspace(0.5, 50.0, n)), name="bench", model_version="bench-1",
                        spike_noise=[0.1] * F if spikes else [], spike_level=[5.0] * F if spikes else [], **rel)
    return Artifact(LSTMAutoencoder(F, HIDDEN, 1, WINDOW).eval(), manifest, Path("."))


def runnable(precisions: list[str], device: torch.device) -> tuple[list[str], list[dict[str, str]]]:
    """The precisions to time on `device` (auto resolved, each once), and those it cannot run, with why."""
    run: list[str] = []
    skipped = []
    for p in precisions:
        try:
            got = Engine(artifact(), device=device, capacity=1, precision=p).precision
        except ModelError as exc:
            skipped.append({"precision": p, "device": str(device), "reason": str(exc)})
            print(f"not timed: {p} on {device}: {exc}", flush=True)
            continue
        if got not in run:
            run.append(got)
    return run, skipped


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


def as_records(batches: list[Readings], first_offset: int = 0, form: str = "single") -> list[list[Record]]:
    """The batches as the JSON records the daemon would poll, at consecutive offsets of one partition.

    `single`: one reading per message; `columns`: one message per stream and batch holding its HOP readings in
    the columnar batched form. The offsets must grow from batch to batch: the pipeline skips a record at or
    below the offset its stream's state already holds, as a replay.
    """
    out, offset = [], first_offset
    for r in batches:
        recs = []
        if form == "columns":
            order = np.lexsort((r.ts, r.streams))
            for s, idx in zip(*np.unique(r.streams[order], return_index=True), strict=True):
                rows = order[idx : idx + HOP]
                held = [{"ts": t, "values": dict(zip(FEATURES, v, strict=True))}
                        for t, v in zip(r.ts[rows].tolist(), r.values[rows].tolist(), strict=True)]
                body = orjson.dumps({"stream": s, "readings": columnar(held, FEATURES)})
                recs.append(Record("in", 0, offset, s.encode(), body, 0))
                offset += 1
        else:
            for s, t, v in zip(r.streams.tolist(), r.ts.tolist(), r.values.tolist(), strict=True):
                body = orjson.dumps({"stream": s, "ts": t, "values": dict(zip(FEATURES, v, strict=True))})
                recs.append(Record("in", 0, offset, s.encode(), body, 0))
                offset += 1
        out.append(recs)
    return out


def take(r: Readings, idx: np.ndarray) -> Readings:
    """The readings at positions idx."""
    return Readings(r.streams[idx], r.ts[idx], r.values[idx], r.source[idx])


def bench(streams: int, n_batches: int, device: torch.device, with_pipeline: bool = True,
          precision: str = "float32", form: str = "single", relations: bool = False,
          spikes: bool = False) -> dict[str, float | None]:
    """The three rates for one fleet size in one model precision (pipeline None when left out)."""
    art = artifact(streams if relations else 0, spikes)
    warm = batches(streams, WINDOW // HOP)
    data = batches(streams, n_batches, start=1.7e9 + 60.0 * WINDOW)
    total = n_batches * streams * HOP

    def fresh_engine() -> Engine:
        e = Engine(art, device=device, capacity=streams, precision=precision)
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

    cfg = Config.model_validate({"model": {"precision": precision}})
    warm_records = as_records(warm, form=form) if with_pipeline else []
    records = as_records(data, first_offset=sum(len(r) for r in warm_records), form=form) if with_pipeline else []

    def pipeline() -> None:
        p = Pipeline(cfg, art, str(device))
        for w in warm_records:
            p.process(w, now=2e9)
        t0 = time.perf_counter()
        windows = sum(len(p.process(rec, now=2e9).windows or ()) for rec in records)
        pipeline.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
        if windows != n_batches * streams:  # every stream completes one window per batch: nothing was skipped
            raise RuntimeError(f"the pipeline scored {windows} windows, not {n_batches * streams}")

    rate_batched = timed(batched)
    best = float("inf")
    for _ in range(3):
        one_by_one()
        best = min(best, one_by_one.seconds)
    rate_single = sample * n_batches * HOP / best
    return {"batched": rate_batched, "single": rate_single, "pipeline": timed(pipeline) if with_pipeline else None}


def main() -> int:
    """Run the benchmark, print the table, optionally write it into a markdown file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--batches", type=int, default=20, help="poll batches per repetition (fewer for large fleets)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--hop", type=int, default=16)
    ap.add_argument("--pipeline-max", type=int, default=10000, help="largest fleet whose pipeline is timed")
    ap.add_argument("--form", choices=["single", "columns"], default="single",
                    help="the pipeline's records: one reading per message, or each stream's readings of a batch "
                         "in one message of the columnar batched form")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", nargs="+", default=["float32"], choices=[*PRECISIONS, "auto"],
                    help="model.precision values to time, side by side (float16 needs CUDA; one the device "
                         "cannot run is left out, with why)")
    ap.add_argument("--relations", nargs="+", default=["off"], choices=["off", "on"],
                    help="time the model without and/or with the cross-sensor relation score, side by side")
    ap.add_argument("--spikes", nargs="+", default=["off"], choices=["off", "on"],
                    help="time without and/or with the spike score (detector.spikes)")
    ap.add_argument("--out", help="markdown file whose throughput section is replaced by the results")
    ap.add_argument("--results", help="JSON file for the results (default bench/results/throughput.json, or "
                                      "throughput_cuda.json on CUDA)")
    args = ap.parse_args()
    global WINDOW, HOP
    WINDOW, HOP = args.window, args.hop
    device = pick_device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    rows, results = [], []
    precisions, skipped = runnable(args.precision, device)
    for s in args.streams:
        n = max(2, min(args.batches, 2_000_000 // (s * HOP)))
        for precision, rel, spk in ((p, r, k) for p in precisions for r in args.relations for k in args.spikes):
            r = bench(s, n, device, with_pipeline=s <= args.pipeline_max, precision=precision, form=args.form,
                      relations=rel == "on", spikes=spk == "on")
            results.append({"streams": s, "precision": precision, "relations": rel, "spikes": spk, "batches": n,
                            "engine_batched_readings_per_s": round(r["batched"]),
                            "engine_single_readings_per_s": round(r["single"]),
                            "speedup": round(r["batched"] / r["single"], 1),
                            "pipeline_readings_per_s": None if r["pipeline"] is None else round(r["pipeline"])})
            pipe = "not timed" if r["pipeline"] is None else f"{r['pipeline']:,.0f}"
            what = f"{precision}{', relations' if rel == 'on' else ''}{', spikes' if spk == 'on' else ''}"
            rows.append(f"| {s:,} | {what} | {r['batched']:,.0f} | "
                        f"{r['single']:,.0f} | "
                        f"{r['batched'] / r['single']:.0f}x | {pipe} |")
            print(rows[-1], flush=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, device {device}"
               + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "")
               + f"; torch {torch.__version__}, Python {platform.python_version()}")
    table = "\n".join([
        BEGIN,
        f"Machine: {machine}; {datetime.now(UTC):%Y-%m-%d}. Command: `python bench/throughput.py --streams "
        f"{' '.join(map(str, args.streams))} --window {WINDOW} --hop {HOP} --device {args.device} --precision "
        f"{' '.join(args.precision)}" + (f" --form {args.form}" if args.form != "single" else "")
        + (f" --relations {' '.join(args.relations)}" if args.relations != ["off"] else "")
        + (f" --spikes {' '.join(args.spikes)}" if args.spikes != ["off"] else "") + "`. Readings per "
        f"second, best of three; untrained model of 8 features, window {WINDOW}, hop {HOP}, hidden {HIDDEN}; each "
        f"poll batch holds {HOP} readings of every stream"
        + (", in one message per stream (columnar form) for the pipeline." if args.form == "columns" else "."),
        "",
        "| streams | model.precision | engine, batched | engine, stream by stream | ratio | pipeline (decode to "
        "alerts), batched |",
        "|---|---|---|---|---|---|",
        *rows,
        *([""] if skipped else []),
        *(f"Not timed: `{k['precision']}` on {k['device']}: {k['reason']}." for k in skipped),
        END,
    ])
    print(table)
    result = {"machine": machine, "date": datetime.now(UTC).strftime("%Y-%m-%d"), "device": str(device),
              "model": f"{F} features, window {WINDOW}, hop {HOP}, hidden {HIDDEN}, 1 layer", "form": args.form,
              "results": results, "skipped": skipped}
    name = "throughput_cuda.json" if device.type == "cuda" else "throughput.json"
    Path(args.results or Path(__file__).resolve().parent / "results" / name).write_text(
        json.dumps(result, indent=2) + "\n")
    if args.out:
        path = Path(args.out)
        text = path.read_text() if path.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
        a, b = text.index(BEGIN), text.index(END) + len(END)
        path.write_text(text[:a] + table + text[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
