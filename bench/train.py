"""Training throughput: readings per second that `detector train` feeds its model, for the demo's model size.

    python bench/train.py [--epochs 3] [--out docs/benchmarks.md]

Trains the demo's model (8 sensors, window 32, hop 8, hidden 48, batch 64, 60 steps an epoch of 6-window
chunks) on the demo fleet's normal period (50 pumps x 1,800 readings), with early stopping off, for a few
epochs on the CPU (training has no GPU path yet), and reports each epoch's rate: readings fed to the model
per second of training steps and validation (batch x chunk length x steps / epoch time), the figure
`detector train` logs per epoch. The median epoch is the result. Results go to bench/results/train.json
and, with --out, to the training section of the markdown file; bench/summary.py takes
train_readings_per_s_cpu from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, replace_section  # noqa: E402


def measure(epochs: int, streams: int, readings: int) -> dict:
    """Train the demo's model for `epochs` epochs on the CPU; each epoch's readings per second."""
    import torch

    from detector.simulate import simulate_fleet
    from detector.train import Series, TrainParams, train_model

    fleet = simulate_fleet(n_streams=streams, n_features=8, n_readings=readings, normal_readings=readings, seed=7)
    series = Series(list(fleet.features), list(fleet.streams), [fleet.values[s] for s in range(streams)])
    params = TrainParams(name="bench", epochs=epochs, patience=epochs + 1, seed=0)
    _, manifest = train_model(series, params, progress=False)
    rates = [h["readings_per_s"] for h in manifest.training["history"]]
    chunk = params.window + params.hop * (params.chunk_windows - 1)
    return {"device": "cpu", "threads": torch.get_num_threads(), "epochs": len(rates),
            "readings_per_epoch": params.steps_per_epoch * params.batch_size * chunk,
            "readings_per_s_each_epoch": rates, "readings_per_s": round(statistics.median(rates))}


def main() -> int:
    """Measure, write bench/results/train.json and, with --out, the markdown section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--readings", type=int, default=1800)
    ap.add_argument("--out", help="markdown file whose training section is replaced by the results")
    args = ap.parse_args()
    rows = [measure(args.epochs, args.streams, args.readings)]
    for r in rows:
        print(json.dumps(r), flush=True)
    result = {"machine": machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "data": f"{args.streams} streams x {args.readings} readings x 8 sensors (the demo fleet's normal "
                      f"period)", "results": rows}
    (ROOT / "bench" / "results" / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        table = ["| device | torch threads | epochs | readings per epoch | readings/s, each epoch | median |",
                 "|---|---|---|---|---|---|"]
        table += [f"| {r['device']} | {r['threads']} | {r['epochs']} | {r['readings_per_epoch']:,} | "
                  f"{', '.join(f'{v:,}' for v in r['readings_per_s_each_epoch'])} | {r['readings_per_s']:,} |"
                  for r in rows]
        note = (f"\n`python bench/train.py --epochs {args.epochs} --out docs/benchmarks.md`, {result['date']}, "
                f"{result['machine']}; the demo's model (window 32, hop 8, hidden 48, batch 64, 60 steps an epoch) "
                f"on {result['data']}.\n\n")
        replace_section(args.out, "train", "Training throughput", note + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
