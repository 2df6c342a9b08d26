"""The demo: a simulated fleet with injected faults, trained and streamed through the daemon's own code path.

It trains a small model on the fleet's normal period, then streams the rest as JSON records through the
same Daemon.process (decode, engine, thresholds, alert logic, sinks) that `detector run` uses, with an
in-memory source and sink instead of Kafka, and scores the alerts against the injected faults.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from consumers.base import Record
from consumers.memory import IterSource, ListSink
from detector.artifact import Artifact, save_artifact
from detector.config import Config, parse_config
from detector.daemon import Daemon
from detector.pipeline import Pipeline
from detector.simulate import Fault, Fleet, fleet_records, simulate_fleet
from detector.train import Series, TrainParams, train_model

__all__ = ["DemoResult", "run_demo", "match_alerts", "fleet_to_records", "DEMO_CONFIG"]

log = logging.getLogger(__name__)

DEMO_CONFIG = parse_config({"sensors": {"flatline_readings": 10}})
"""The defaults, plus the stuck-sensor check: the simulated sensors are noisy, so ten equal values are a fault."""


@dataclass(frozen=True)
class DemoResult:
    """What the demo caught, missed and falsely raised."""

    caught: list[tuple[Fault, float, str]]  # fault, detection delay in seconds, kind of the alert that caught it
    missed: list[Fault]
    false_alerts: list[dict[str, Any]]
    streams: int
    readings: int
    alerts: list[dict[str, Any]]
    seconds: float

    def summary_line(self) -> str:
        """The machine-readable last line of the demo."""
        return (f"demo: caught={len(self.caught)} missed={len(self.missed)} false_alerts={len(self.false_alerts)} "
                f"streams={self.streams} readings={self.readings}")


def fleet_to_records(fleet: Fleet, start: int, end: int, topic: str = "sensor-readings",
                     partitions: int = 4) -> list[Record]:
    """Readings [start, end) of every stream as JSON records keyed by stream, in time order.

    Missing values are left out of a reading, and a whole-reading gap sends nothing, as a machine would.
    """
    out: list[Record] = []
    index = {s: i for i, s in enumerate(fleet.streams)}
    for offset, body in enumerate(fleet_records(fleet, start, end)):
        stream = body["stream"]
        out.append(Record(topic, index[stream] % partitions, offset, stream.encode(), orjson.dumps(body),
                          int(body["ts"] * 1000)))
    return out


def match_alerts(alerts: list[dict[str, Any]], faults: list[Fault], timestamps: np.ndarray,
                 grace_s: float) -> tuple[list[tuple[Fault, float, str]], list[Fault], list[dict[str, Any]]]:
    """Match raised alerts to faults: caught (with delay), missed, and alerts that match no fault."""
    raised = [a for a in alerts if a["state"] == "raised"]
    by_stream: dict[str, list[Fault]] = {}
    for f in faults:
        by_stream.setdefault(f.stream, []).append(f)
    caught: dict[Fault, tuple[float, str]] = {}
    false_alerts = []
    for a in raised:
        t = _epoch(a["first_seen"])
        hit = None
        for f in by_stream.get(a["stream"], []):
            if timestamps[f.start] <= t <= timestamps[min(f.end, len(timestamps)) - 1] + grace_s:
                hit = f
                break
        if hit is None:
            false_alerts.append(a)
        elif hit not in caught:
            caught[hit] = (t - float(timestamps[hit.start]), a["kind"])
    missed = [f for f in faults if f not in caught]
    return [(f, *caught[f]) for f in faults if f in caught], missed, false_alerts


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_demo(streams: int = 50, features: int = 8, readings: int = 3600, normal: int = 1800, seed: int = 7,
             out_dir: str | None = None, progress: bool = True, params: TrainParams | None = None,
             cfg: Config | None = None) -> DemoResult:
    """Simulate, train, stream and score; return what was caught."""
    t0 = time.monotonic()
    fleet = simulate_fleet(n_streams=streams, n_features=features, n_readings=readings,
                           normal_readings=normal, seed=seed)
    log.info("simulated %d streams x %d sensors x %d readings, %d faults", streams, features, readings,
             len(fleet.faults))
    params = params or TrainParams(name="demo")
    series = Series(list(fleet.features), list(fleet.streams), [fleet.values[s, : fleet.normal_until]
                                                                for s in range(streams)])
    model, manifest = train_model(series, params, progress=progress)
    log.info("trained in %.0f s (%d epochs); calibrated p99.9 window score %.2f", manifest.training["seconds"],
             manifest.training["epochs_run"], manifest.quantile(0.999))
    if out_dir:
        save_artifact(Path(out_dir) / "model", model, manifest)
    cfg = cfg or DEMO_CONFIG
    daemon = Daemon(cfg, Pipeline(cfg, Artifact(model, manifest, Path(out_dir or ".")), "cpu"))
    start = max(fleet.normal_until - 4 * manifest.window, 0)
    records = fleet_to_records(fleet, start, readings, cfg.input.topics[0])
    source = IterSource(records, batch_size=streams * manifest.hop)
    sink = ListSink()
    while not source.exhausted:
        batch = source.poll_batch(0)
        if batch:
            daemon.process(batch, source, sink)
    daemon.commit(source, sink)
    alerts = [orjson.loads(r.value) for r in sink.on(cfg.output.alerts_topic)]
    if out_dir:
        Path(out_dir, "alerts.jsonl").write_bytes(b"".join(r.value + b"\n" for r in sink.on(cfg.output.alerts_topic)))
    step = float(fleet.timestamps[1] - fleet.timestamps[0])
    caught, missed, false_alerts = match_alerts(alerts, fleet.faults, fleet.timestamps, grace_s=manifest.window * step)
    return DemoResult(caught, missed, false_alerts, streams, len(records), alerts, time.monotonic() - t0)
