"""The demo with a scoring component on and off, on the same trained models.

    python bench/demo_ablation.py [--seeds 0 1 2] [--set '{"spikes": false}'] [--models DIR] [--out FILE]

Trains the demo's model once per training seed (the demo's fleet: 50 pumps, fleet seed 7, 25 faults; one torch
thread, so every machine computes the same model) and keeps it in `--models` (default: a folder under the system's
temp dir) for the next run. Each model is then recalibrated twice without more training (`train_model(...,
epochs=0, init=model)`): with the defaults, and with the TrainParams fields in `--set` (JSON). Both are streamed
through `run_demo`'s daemon path. A field that changes training itself (forecast, stream_scale, holdout_blocks)
needs a model trained with it, which this bench does not do. Printed per seed and setting, as one JSON line:
faults caught, false alerts, caught and median delay by kind, and what was missed.
Figures: docs/evaluation.md, issue 19 section ("Spikes judged from both sides").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLEET = {"streams": 50, "features": 8, "readings": 3600, "normal": 1800, "seed": 7, "regimes": 2}


def model_for(seed: int, models: Path) -> tuple:
    """The demo's model at training seed `seed`, trained once and kept under `models`."""
    from detector.artifact import load_artifact, save_artifact
    from detector.simulate import simulate_fleet
    from detector.train import Series, TrainParams, train_model

    folder = models / f"demo-seed-{seed}"
    fleet = simulate_fleet(n_streams=FLEET["streams"], n_features=FLEET["features"], n_readings=FLEET["readings"],
                           normal_readings=FLEET["normal"], seed=FLEET["seed"], n_regimes=FLEET["regimes"])
    series = Series(list(fleet.features), list(fleet.streams),
                    [fleet.values[s, : fleet.normal_until] for s in range(len(fleet.streams))])
    if not (folder / "manifest.json").is_file():
        model, manifest = train_model(series, TrainParams(name="demo", seed=seed), progress=False)
        save_artifact(folder, model, manifest)
    return load_artifact(folder).model, series


def run(seed: int, fields: dict, models: Path) -> dict:
    """Caught, false alerts and delays of the demo with the model of `seed` recalibrated with `fields`."""
    import numpy as np

    from detector.demo import run_demo
    from detector.train import TrainParams, train_model

    model, series = model_for(seed, models)
    params = TrainParams(name="demo", seed=seed, epochs=0, **fields)
    trained = train_model(series, params, progress=False, init=model)
    res = run_demo(**FLEET, progress=False, trained=trained)
    delays: dict[str, list[float]] = {}
    for fault, delay, _ in res.caught:
        delays.setdefault(fault.kind, []).append(delay / 60)
    return {"seed": seed, "set": fields, "caught": len(res.caught), "false_alerts": len(res.false_alerts),
            "by_kind": dict(Counter(f.kind for f, _, _ in res.caught)),
            "median_delay_min": {k: float(np.median(v)) for k, v in sorted(delays.items())},
            "median_delay_all_min": float(np.median([d / 60 for _, d, _ in res.caught])) if res.caught else None,
            "missed": [[f.kind, f.stream, list(f.features)] for f in res.missed]}


def main(argv: list[str] | None = None) -> int:
    """Run the ablation and print one JSON line per seed and setting."""
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", default='{"spikes": false}', help="TrainParams fields to compare with the defaults (JSON)")
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "detector-demo-models")
    ap.add_argument("--out", type=Path, help="also write the lines to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = []
    for seed in args.seeds:
        for fields in ({}, json.loads(args.set)):
            line = json.dumps(run(seed, fields, args.models))
            print(line, flush=True)
            lines.append(line)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
