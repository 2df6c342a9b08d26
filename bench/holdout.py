"""Streams the model never saw: the demo fleet with half of its pumps left out of training.

    python bench/holdout.py [--seeds 0 1 2] [--learn 0 360] [--before 600] [--stream-scale] [--models DIR]

The demo's fleet (50 pumps, fleet seed 7, 25 faults) is split by a rule fixed before any run: the pumps whose
number is 1 or 2 mod 4 are held out (25 streams carrying 13 of the faults), the model trains on the normal
period of the other 25 (`detector train`'s defaults at each training seed; `--stream-scale` as the flag), and
all 50 streams go through the daemon's code path (`Daemon.process` over the fleet's records) from `--before`
readings before the normal period ends, once for each `scoring.learn_scale_readings` in `--learn`. Printed per
run: faults caught and false alerts, on the held-out streams and on the known ones (matched as the demo
does). Trained models are kept in `--models` (default: a folder under the system's temp dir) for the next run.
Figures and the rule they were judged by: docs/evaluation.md, "A new stream learns its own scale in warm-up".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLEET_SEED = 7


def held_out(streams: list[str]) -> list[str]:
    """The streams left out of training: those whose index is 1 or 2 mod 4."""
    return [s for i, s in enumerate(streams) if i % 4 in (1, 2)]


def run(seed: int, learn: int, before: int, stream_scale: bool, models: Path) -> dict:
    """One training seed and one learn_scale_readings: faults caught and false alerts, held-out and known."""
    import orjson

    from consumers.memory import IterSource, ListSink
    from detector.artifact import load_artifact, save_artifact
    from detector.config import parse_config
    from detector.daemon import Daemon
    from detector.demo import fleet_to_records, match_alerts, match_regimes
    from detector.pipeline import Pipeline
    from detector.simulate import simulate_fleet
    from detector.train import Series, TrainParams, train_model

    fleet = simulate_fleet(n_streams=50, n_features=8, n_readings=3600, normal_readings=1800, seed=FLEET_SEED,
                           n_regimes=2)
    streams = list(fleet.streams)
    held = set(held_out(streams))
    keep = [i for i, s in enumerate(streams) if s not in held]
    folder = models / f"{'ss' if stream_scale else 'base'}-s{seed}"
    if not (folder / "manifest.json").exists():
        series = Series(list(fleet.features), [streams[i] for i in keep],
                        [fleet.values[i, :fleet.normal_until] for i in keep])
        model, manifest = train_model(series, TrainParams(name="demo", seed=seed, stream_scale=stream_scale),
                                      progress=False)
        save_artifact(folder, model, manifest)
    art = load_artifact(folder)
    cfg = parse_config({"sensors": {"flatline_readings": 10}, "alerts": {"regime": {"enabled": True}},
                        "scoring": {"learn_scale_readings": learn}})
    daemon = Daemon(cfg, Pipeline(cfg, art, "cpu"))
    records = fleet_to_records(fleet, fleet.normal_until - before, 3600, cfg.input.topics[0])
    src, sink = IterSource(records, batch_size=50 * art.manifest.hop), ListSink()
    while not src.exhausted:
        batch = src.poll_batch(0)
        if batch:
            daemon.process(batch, src, sink)
    daemon.commit(src, sink)
    alerts = [orjson.loads(r.value) for r in sink.on(cfg.output.alerts_topic)]
    *_, rest = match_regimes(alerts, fleet.regimes, fleet.timestamps)
    caught, _, false = match_alerts(rest, fleet.faults, fleet.timestamps, grace_s=art.manifest.window * 60.0)
    out: dict = {"seed": seed, "stream_scale": stream_scale, "learn_scale_readings": learn, "before": before}
    for side, mine in (("held_out", lambda s: s in held), ("known", lambda s: s not in held)):
        out[side] = {"faults": sum(mine(f.stream) for f in fleet.faults),
                     "caught": sum(mine(f.stream) for f, *_ in caught),
                     "false_alerts": sum(mine(a["stream"]) for a in false)}
    return out


def main() -> int:
    """Run every seed and learning span asked for; print one JSON line each."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--learn", type=int, nargs="+", default=[0, 360])
    ap.add_argument("--before", type=int, default=600, help="readings streamed before the normal period ends")
    ap.add_argument("--stream-scale", action="store_true", help="train with --stream-scale")
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "detector-holdout-models")
    args = ap.parse_args()
    for seed in args.seeds:
        for learn in args.learn:
            print(json.dumps(run(seed, learn, args.before, args.stream_scale, args.models)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
