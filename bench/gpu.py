"""Engine throughput at large fleets on the GPU, against the same on the CPU in the same run.

    python bench/gpu.py [--streams 10000 100000 1000000] [--devices cuda cpu] [--precision float32 bfloat16]
                        [--cpu-precision float32] [--batches 3] [--profile] [--out docs/benchmarks.md]

For each fleet size S, device and model.precision it builds the untrained model of bench/throughput.py
(8 features, window 64, hop 16, hidden 48), restores every stream to 48 readings into its window through
`Engine.import_rows` (the checkpoint path: no warm-up batches to pay for), then times `Engine.score_batch`
over poll batches of S streams x 16 readings, so that every stream completes one window per batch. Stream
rows are resolved once (`Engine.rows_for`, timed on its own as "id lookup") and passed in, as a caller that
keeps its streams' rows would. Beside each engine figure it times the model alone on the same shapes
(encode 16 readings of S streams, decode S windows, in the engine's chunks of CHUNK streams per LSTM call):
the ceiling under which the engine's bookkeeping runs. One untimed batch first (allocator, cuDNN plans), then
--batches timed ones (one on the CPU at 1,000,000 streams); fleets above --cpu-max are left out on the CPU, and
so is a precision a device cannot run (the engine's test pass of the model fails), with why in the output.
Results go to bench/results/gpu.json (the CUDA rows under `results`, the CPU rows under `cpu_results`); with
--out the table replaces the section between the markers in that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import HIDDEN, HOP, WINDOW, F, artifact, runnable  # noqa: E402
from detector.decode import Readings  # noqa: E402
from detector.engine import PRECISIONS, Engine  # noqa: E402

BEGIN, END = "<!-- bench:gpu:begin -->", "<!-- bench:gpu:end -->"
START = 1.7e9


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def primed(engine: Engine, streams: int) -> tuple[np.ndarray, float]:
    """Rows for S streams, each restored with WINDOW - HOP readings; returns rows and the id lookup's seconds."""
    ids = np.array([f"m{s}" for s in range(streams)], dtype=object)
    t0 = time.perf_counter()
    rows = engine.rows_for(ids)
    lookup = time.perf_counter() - t0
    L, W = engine.model.num_layers, WINDOW
    n = W - HOP
    state = {
        "h": np.zeros((streams, L, HIDDEN), np.float32), "c": np.zeros((streams, L, HIDDEN), np.float32),
        "buf": np.zeros((streams, W, F), np.float32), "bmask": np.ones((streams, W, F), bool),
        "bts": np.broadcast_to(START + 60.0 * np.arange(-W, 0), (streams, W)).copy(),
        "count": np.full(streams, n, np.int64), "last_ts": np.full(streams, START - 60.0),
        "last_val": np.zeros((streams, F), np.float32), "level": np.ones((streams, F), np.float32),
    }
    misfit = engine.import_rows(rows, state)
    if misfit:
        raise RuntimeError(f"primed state did not fit: {misfit}")
    return rows, lookup


def one(streams: int, device: torch.device, precision: str, n_batches: int, profile: bool = False,
        with_model: bool = True) -> dict[str, float]:
    """Engine and model-only readings/s for one fleet size, device and precision (profile: print a profile)."""
    engine = Engine(artifact(), device=device, capacity=streams, precision=precision)
    rows, lookup = primed(engine, streams)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(streams * HOP, F)).astype(np.float32)
    rows_b = np.tile(rows, HOP)
    ids = np.tile(np.array(engine.streams, dtype=object), HOP)
    step = 60.0 * np.repeat(np.arange(HOP), streams)
    source = np.arange(streams * HOP)

    def batch(b: int) -> Readings:
        return Readings(ids, START + 60.0 * HOP * b + step, values, source)

    seconds = []
    for b in range(n_batches + 1):
        r = batch(b)
        sync(device)
        t0 = time.perf_counter()
        out = engine.score_batch(r, rows_b)
        sync(device)
        if b:
            seconds.append(time.perf_counter() - t0)
        if len(out.windows) != streams:
            raise RuntimeError(f"batch {b} scored {len(out.windows)} windows, not {streams}")

    if profile:
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            engine.score_batch(batch(n_batches + 1), rows_b)
            sync(device)
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    model_s = []
    if with_model:
        x = torch.as_tensor(values.reshape(HOP, streams, F).transpose(1, 0, 2).copy(), device=device)
        lengths = torch.full((streams,), HOP, device=device)
        u = torch.as_tensor(rows, device=device)
        with torch.inference_mode():
            for k in range(n_batches + 1):
                sync(device)
                t0 = time.perf_counter()
                out_t, _, _ = engine._encode(x, lengths, u)  # as the engine calls the model: in chunks
                engine._decode(out_t[:, -1])
                sync(device)
                if k:
                    model_s.append(time.perf_counter() - t0)
    readings = streams * HOP
    return {"engine": readings / min(seconds), "model": readings / min(model_s) if model_s else math.nan,
            "lookup_s": lookup,
            "batch_s": min(seconds)}


def main() -> int:
    """Run the benchmark, print the table, optionally write it into a markdown file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[10000, 100000, 1000000])
    ap.add_argument("--devices", nargs="+", help="devices to time, in order (default: cuda then cpu; cpu alone "
                                                 "where torch sees no GPU)")
    ap.add_argument("--precision", nargs="+", default=["float32", "bfloat16"], choices=[*PRECISIONS, "auto"])
    ap.add_argument("--batches", type=int, default=3, help="timed poll batches per case (best one counts)")
    ap.add_argument("--cpu-max", type=int, default=1_000_000, help="largest fleet timed on the CPU")
    ap.add_argument("--cpu-precision", nargs="+", choices=[*PRECISIONS, "auto"],
                    help="precisions timed on the CPU (default: those of --precision; float16 is CUDA only)")
    ap.add_argument("--engine-only", action="store_true", help="leave out the model-alone timing")
    ap.add_argument("--profile", action="store_true",
                    help="after the table, profile one batch of the largest fleet on the first device")
    ap.add_argument("--out", help="markdown file whose GPU section is replaced by the results")
    ap.add_argument("--results", help="JSON file for the results (default bench/results/gpu.json)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    rows, results, skipped = [], [], []
    plan = {}  # per device: the precisions it runs (float16 is never tried on a CPU)
    for dev in args.devices:
        device = torch.device(dev)
        wanted = [p for p in (args.cpu_precision or args.precision) if p != "float16"] if device.type == "cpu" \
            else args.precision
        plan[dev], refused = runnable(wanted, device)
        skipped += refused
    for s in args.streams:
        for dev in args.devices:
            device = torch.device(dev)
            for precision in plan[dev]:
                if device.type == "cpu" and s > args.cpu_max:
                    continue
                r = one(s, device, precision, args.batches if device.type == "cuda" or s < 1_000_000 else 1,
                        with_model=not args.engine_only)
                results.append({"streams": s, "device": dev, "precision": precision,
                                "engine_batched_readings_per_s": round(r["engine"]),
                                "model_only_readings_per_s": None if math.isnan(r["model"]) else round(r["model"]),
                                "batch_seconds": round(r["batch_s"], 4), "id_lookup_seconds": round(r["lookup_s"], 4)})
                rows.append(f"| {s:,} | {dev} | {precision} | {r['engine']:,.0f} | {r['model']:,.0f} | "
                            f"{r['batch_s'] * 1000:,.0f} | {r['lookup_s'] * 1000:,.0f} |")
                print(rows[-1], flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the next case starts from a clean pool
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, GPU {gpu}; torch {torch.__version__}, "
               f"Python {platform.python_version()}")
    table = "\n".join([
        BEGIN,
        f"Machine: {machine}; {datetime.now(UTC):%Y-%m-%d}. Command: `python bench/gpu.py --streams "
        f"{' '.join(map(str, args.streams))} --devices {' '.join(args.devices)} --precision "
        f"{' '.join(args.precision)}"
        + (f" --cpu-precision {' '.join(args.cpu_precision)}" if args.cpu_precision else "")
        + f" --batches {args.batches}`. Readings per second, best batch; each poll batch "
        f"holds {HOP} readings of every stream and completes one window per stream; untrained model of {F} "
        f"features, window {WINDOW}, hop {HOP}, hidden {HIDDEN}.",
        "",
        "| streams | device | model.precision | engine, batched | model alone (encode + decode) | ms per batch | "
        "id lookup, ms |",
        "|---|---|---|---|---|---|---|",
        *rows,
        *([""] if skipped else []),
        *(f"Not timed: `{k['precision']}` on {k['device']}: {k['reason']}." for k in skipped),
        END,
    ])
    print(table)
    if args.profile and plan[args.devices[0]]:
        one(max(args.streams), torch.device(args.devices[0]), plan[args.devices[0]][0], 1, profile=True)
    result = {"machine": machine, "date": datetime.now(UTC).strftime("%Y-%m-%d"), "devices": args.devices,
              "model": f"{F} features, window {WINDOW}, hop {HOP}, hidden {HIDDEN}, 1 layer",
              "results": [r for r in results if r["device"] == "cuda"], "cpu_results": [
                  r for r in results if r["device"] == "cpu"], "skipped": skipped}
    Path(args.results or Path(__file__).resolve().parent / "results" / "gpu.json").write_text(
        json.dumps(result, indent=2) + "\n")
    if args.out:
        path = Path(args.out)
        text = path.read_text()
        if BEGIN not in text:
            text += "\n" + BEGIN + "\n" + END + "\n"
        a, b = text.index(BEGIN), text.index(END) + len(END)
        path.write_text(text[:a] + table + text[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
