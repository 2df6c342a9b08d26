"""The demo: a simulated fleet with injected faults, trained and streamed through the daemon's own code path.

It trains a small model on the fleet's normal period, then streams the rest as JSON records through the
same Daemon.process (decode, engine, thresholds, alert logic, sinks) that `detector run` uses, with an
in-memory source and sink instead of Kafka, and scores the alerts against the injected faults.

A few streams (two by default, never faulty ones) change their operating point for good after the normal
period: a regime change, not a fault. The demo enables `alerts.regime`, and counts a regime change as
detected when its stream publishes a `regime_change` event at or after the change. The anomaly alerts that
such a stream raises from its change on are attributed to the regime change (listed with it), not counted
as false alerts; a `regime_change` event anywhere else is reported apart, never silently dropped, with how
many of them fell inside an injected fault (the test cannot tell a lasting fault from a new operating point:
a long level shift is a persistent rise of the score too).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from consumers.base import Record
from consumers.memory import IterSource, ListSink
from detector.artifact import Artifact, Manifest, save_artifact
from detector.config import Config, parse_config
from detector.daemon import Daemon
from detector.model import LSTMAutoencoder
from detector.pipeline import Pipeline
from detector.simulate import Fault, Fleet, RegimeShift, fleet_records, simulate_fleet
from detector.train import Series, TrainParams, train_model

__all__ = ["DemoResult", "run_demo", "match_alerts", "match_regimes", "fleet_to_records", "DEMO_CONFIG"]

log = logging.getLogger(__name__)

DEMO_CONFIG = parse_config({"alerts": {"regime": {"enabled": True}}})
"""The defaults (the stuck-sensor check among them), plus regime-change events (some streams change their
operating point for good)."""


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
    regimes_detected: list[tuple[RegimeShift, float]] = field(default_factory=list)  # with the delay in seconds
    regimes_missed: list[RegimeShift] = field(default_factory=list)
    regime_alerts: list[dict[str, Any]] = field(default_factory=list)  # anomaly alerts raised after a change
    other_regime_events: list[dict[str, Any]] = field(default_factory=list)  # regime_change on other streams
    fault_regime_events: int = 0  # how many of those fell on a stream during its injected fault (a level shift)

    def summary_line(self) -> str:
        """The machine-readable last line of the demo."""
        expected = len(self.regimes_detected) + len(self.regimes_missed)
        return (f"demo: caught={len(self.caught)} missed={len(self.missed)} false_alerts={len(self.false_alerts)} "
                f"regime_changes={len(self.regimes_detected)}/{expected} "
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


def match_regimes(alerts: list[dict[str, Any]], regimes: list[RegimeShift], timestamps: np.ndarray
                  ) -> tuple[list[tuple[RegimeShift, float]], list[RegimeShift], list[dict[str, Any]],
                             list[dict[str, Any]], list[dict[str, Any]]]:
    """Split alerts by the regime changes: detected (with delay), missed, anomaly alerts raised on a stream from
    its change on, regime_change events on other streams (or before a change), and every other alert."""
    start = {r.stream: float(timestamps[r.start]) for r in regimes}
    first: dict[str, float] = {}
    explained, other_events, rest = [], [], []
    for a in alerts:
        at = _epoch(a["first_seen"])
        after = a["stream"] in start and at >= start[a["stream"]]
        if a["kind"] == "regime_change":
            if after:
                first.setdefault(a["stream"], at - start[a["stream"]])
            else:
                other_events.append(a)
        elif after and a["kind"] == "anomaly":
            explained.append(a)
        else:
            rest.append(a)
    detected = [(r, first[r.stream]) for r in regimes if r.stream in first]
    missed = [r for r in regimes if r.stream not in first]
    return detected, missed, [a for a in explained if a["state"] == "raised"], other_events, rest


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_demo(streams: int = 50, features: int = 8, readings: int = 3600, normal: int = 1800, seed: int = 7,
             out_dir: str | None = None, progress: bool = True, params: TrainParams | None = None,
             cfg: Config | None = None, regimes: int = 2,
             trained: tuple[LSTMAutoencoder, Manifest] | None = None) -> DemoResult:
    """Simulate, train (unless `trained` gives the model), stream and score; return what was caught."""
    t0 = time.monotonic()
    fleet = simulate_fleet(n_streams=streams, n_features=features, n_readings=readings,
                           normal_readings=normal, seed=seed, n_regimes=regimes)
    log.info("simulated %d streams x %d sensors x %d readings, %d faults, %d regime changes", streams, features,
             readings, len(fleet.faults), len(fleet.regimes))
    params = params or TrainParams(name="demo")
    series = Series(list(fleet.features), list(fleet.streams), [fleet.values[s, : fleet.normal_until]
                                                                for s in range(streams)])
    model, manifest = trained or train_model(series, params, progress=progress)
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
    detected, regimes_missed, regime_alerts, other_events, rest = match_regimes(alerts, fleet.regimes,
                                                                                 fleet.timestamps)
    grace = manifest.window * step
    caught, missed, false_alerts = match_alerts(rest, fleet.faults, fleet.timestamps, grace_s=grace)
    # a regime_change event during an injected fault: the score rose for long enough (a level shift, a drift)
    in_fault = len(other_events) - len(match_alerts([{**a, "state": "raised"} for a in other_events], fleet.faults,
                                                    fleet.timestamps, grace)[2])
    return DemoResult(caught, missed, false_alerts, streams, len(records), alerts, time.monotonic() - t0,
                      detected, regimes_missed, regime_alerts, other_events, in_fault)
