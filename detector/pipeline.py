"""One batch through every stage: decode, window and model, score, threshold, alert.

The daemon, the demo and evaluation all call the same Pipeline; only their sources and sinks differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import orjson

from consumers.base import Record
from detector import __version__
from detector.alert import ESCALATED, NORMAL, AlertMachine, alert_id
from detector.artifact import Artifact
from detector.config import Config, config_hash
from detector.control import Command, Feedback, Mutes
from detector.decode import Decoder, Readings, Reject
from detector.drift import DriftWatch
from detector.engine import Engine, WindowScores
from detector.interpolate import Interpolator, build_interpolator
from detector.labels import Labeler
from detector.maintenance import MaintenanceSchedule
from detector.regime import RegimeDetector
from detector.rows import RowState, grown, take
from detector.rows import step as next_capacity
from detector.sensors import REASONS, OrderWatch, SensorEvents, SensorGate, SilenceWatch
from detector.threshold import build_threshold

__all__ = ["Pipeline", "BatchOutput", "iso"]


def iso(ts: float) -> str:
    """RFC 3339 UTC text of an epoch time.

    >>> iso(1700000000.25)
    '2023-11-14T22:13:20.250Z'
    """
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class BatchOutput:
    """What one batch produced."""

    alerts: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    readings: Readings | None = None
    windows: WindowScores | None = None
    warning: np.ndarray | None = None  # (K,) level in force for each window
    replayed: int = 0  # readings skipped because the stream's restored state already holds them
    drifting: np.ndarray | None = None  # rows whose streams started drifting with this batch (detector.drift)

    @property
    def n_readings(self) -> int:
        """Readings decoded from the batch (late and duplicate ones included)."""
        return 0 if self.readings is None else len(self.readings)


class Pipeline(RowState):
    """The detector's stages wired in order, for any source of record batches.

    Every stage keeps its per-stream state in rows of arrays; `export_rows` and `import_rows` move the state of
    a set of streams out of and into all of them at once (checkpoints). Beside it the pipeline keeps, per
    stream, where its newest reading came from (topic, partition, offset): after a restore, readings from
    records at or before that offset are already in the state and are skipped, so a replay never counts twice.
    """

    def __init__(self, cfg: Config, artifact: Artifact, device: str = "cpu") -> None:
        m = artifact.manifest
        self.cfg = cfg
        self.manifest = m
        self.config_hash = config_hash(cfg)
        self.decoder = Decoder.for_input(m.features, cfg.input)
        self.engine = Engine(artifact, device=device, max_gap_s=cfg.scoring.max_gap_s,
                             adapt_halflife=cfg.scoring.adapt_halflife_windows, precision=cfg.model.precision,
                             adapt_gate=cfg.scoring.adapt_gate, learn_scale=cfg.scoring.learn_scale_readings,
                             adapt_features=cfg.scoring.adapt_features,
                             finetune_rate=cfg.scoring.finetune_rate)
        self.labels = Labeler(cfg.streams.labels)
        self.threshold = build_threshold(cfg.thresholds, m, self.engine.streams, (cfg.alerts.k, cfg.alerts.n),
                                         self.labels)
        self.alerts = AlertMachine(cfg.alerts)
        rc = cfg.alerts.regime
        self.regime = RegimeDetector(rc.delta, rc.threshold, rc.min_windows) if rc.enabled else None
        self.gate = SensorGate(m.features, cfg.sensors.flatline_readings, dict(cfg.sensors.limits),
                               dict(cfg.sensors.missing), m.longest_runs)
        self.interp = build_interpolator(m.features, dict(cfg.sensors.missing), cfg.sensors.interpolate_max_readings)
        self.silence = SilenceWatch(cfg.sensors.silent_after_s) if cfg.sensors.silent_after_s > 0 else None
        self.order = OrderWatch()  # late and repeated readings per stream (sensors.timestamp_faults)
        self.silent_since = np.zeros(0)  # per row: event time of its last reading before it fell silent, else NaN
        self.maintenance = MaintenanceSchedule(cfg.alerts.maintenance, self.engine.streams, self.labels)
        self.mutes = Mutes(self.engine.streams)  # operators' mutes (control topic): kept across reloads
        self.acks: dict[str, tuple[Command, dict[str, Any]]] = {}  # newest ack per glob, with where it was read
        self.feedback = Feedback()  # operators' labels of alerts: false alarms raise their streams' levels
        self.drift = DriftWatch()  # per stream, the share of recent windows at or above the calibrated p99
        self._p99 = m.quantile(0.99)
        self.topics: list[str] = []  # input topics seen, indexed by in_topic
        self.forgotten: list[tuple[str, str, int]] = []  # (stream, topic, partition) forgotten since the last commit
        self._sweep_at: dict[int, float] = {}  # per input (topic, partition) key: event time of the next look for
        # streams to forget (a member catching up reads some partitions hours ahead of others)
        self.in_topic = np.zeros(0, np.int64)
        self.in_partition = np.zeros(0, np.int64)
        self.in_offset = np.zeros(0, np.int64)
        self.dirty = np.zeros(0, bool)  # changed since the last checkpoint

    # ----- per-stream state --------------------------------------------------------------------------------
    def row_fields(self) -> dict[str, object]:
        """Where each stream's newest reading came from, and since when it is silent."""
        return {"in_topic": -1, "in_partition": -1, "in_offset": -1, "silent_since": np.nan}

    def _stages(self) -> dict[str, RowState | None]:
        return {"engine": self.engine, "alerts": self.alerts, "threshold": self.threshold, "regime": self.regime,
                "gate": self.gate, "silence": self.silence, "interp": self.interp, "order": self.order}

    def _room(self) -> int:
        """How many rows the per-stream arrays hold: those the engine has handed out, grown a step at a time up to
        its capacity. Not all of a table reserved for a restore: its rows not yet taken cost no memory there, and
        must not here either."""
        have, used = len(self.dirty), self.engine.rows_used
        return min(max(used, next_capacity(have)), self.engine.capacity) if used > have else have

    def _ensure_rows(self) -> None:
        cap = self._room()
        self.alerts.ensure(cap)
        for name, fill in (*self.row_fields().items(), ("dirty", False)):
            setattr(self, name, grown(getattr(self, name), cap, fill))

    def export_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The whole per-stream state of these rows, `stage.field` -> array with one entry per row."""
        out = {f"pipeline.{k}": v for k, v in super().export_rows(rows).items()}
        for stage, obj in self._stages().items():
            if obj is not None:
                out.update({f"{stage}.{k}": v for k, v in obj.export_rows(rows).items()})
        return out

    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set the whole state of these rows (None: fresh streams); return the fields that did not fit."""
        self._ensure_rows()

        def part(prefix: str) -> dict[str, np.ndarray] | None:
            if state is None:
                return None
            return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}

        misfit = [f"pipeline.{k}" for k in super().import_rows(rows, part("pipeline"))]
        held = part("interp")
        if self.interp is None and held and np.any(np.asarray(held.get("n", 0)) > 0):
            # checkpointed while a gap was open, restored under a config that interpolates nothing: the held
            # readings are released (value held) at their stream's next reading instead of being dropped
            self.interp = Interpolator(np.zeros(self.engine.n_features, bool),
                                       self.cfg.sensors.interpolate_max_readings)
        for stage, obj in self._stages().items():
            if obj is not None:
                misfit += [f"{stage}.{k}" for k in obj.import_rows(rows, part(stage))]
        self.dirty[rows] = False
        return misfit

    def release(self, rows: np.ndarray) -> None:
        """Forget these streams: every stage's state of them starts fresh, and their rows go to new streams."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return
        self.import_rows(rows, None)
        self.threshold.forget_rows(rows)
        self.maintenance.forget_rows(rows)
        self.mutes.forget_rows(rows)
        self.drift.forget_rows(rows)
        self.engine.release(rows)

    def streams_at(self, rows: np.ndarray) -> list[str]:
        """The stream ids of these rows."""
        return [self.engine.streams[int(r)] for r in rows]

    def rows_on(self, partitions: set[tuple[str, int]]) -> np.ndarray:
        """Rows of the streams whose newest reading came from one of these (topic, partition)s."""
        self._ensure_rows()
        n = len(self.engine.streams)
        hit = np.zeros(n, bool)
        for topic, p in partitions:
            if topic in self.topics:
                hit |= (self.in_topic[:n] == self.topics.index(topic)) & (self.in_partition[:n] == p)
        return np.flatnonzero(hit)

    def take_dirty(self) -> np.ndarray:
        """Rows changed since the last call (to checkpoint), and mark them clean."""
        self._ensure_rows()
        rows = np.flatnonzero(self.dirty)
        self.dirty[rows] = False
        return rows

    def _admit(self, rows: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The engine's admission (late and repeated readings dropped), with held readings counted as seen."""
        admitted, dropped, why = self.engine.admit(rows, ts)
        if self.interp is not None:
            floor = self.interp.newest(rows)
            late = np.flatnonzero(admitted & (ts <= floor))
            if len(late):
                admitted = admitted.copy()
                admitted[late] = False
                dropped = np.r_[dropped, late]
                why = np.r_[why, np.where(ts[late] == floor[late], "duplicate_timestamp", "late").astype(object)]
        return admitted, dropped, why

    def _skip_replayed(self, records: list[Record], readings: Readings, rows: np.ndarray) -> tuple[np.ndarray, int]:
        """Mark where each stream's readings come from; drop those its state already holds (a replay)."""
        self._ensure_rows()
        src = readings.source
        topic_of = {}
        for t in {records[i].topic for i in np.unique(src).tolist()}:
            if t not in self.topics:
                self.topics.append(t)
            topic_of[t] = self.topics.index(t)
        rec_topic = np.fromiter((topic_of[r.topic] for r in records), np.int64, len(records))[src]
        rec_part = np.fromiter((r.partition for r in records), np.int64, len(records))[src]
        rec_off = np.fromiter((r.offset for r in records), np.int64, len(records))[src]
        seen = (self.in_topic[rows] == rec_topic) & (self.in_partition[rows] == rec_part) & (
            rec_off <= self.in_offset[rows])
        keep = ~seen
        k = rows[keep]
        self.in_topic[k], self.in_partition[k] = rec_topic[keep], rec_part[keep]
        order = np.lexsort((rec_off[keep], k))  # the newest offset of each row lands last
        self.in_offset[k[order]] = rec_off[keep][order]
        self.dirty[k] = True
        return keep, int(seen.sum())

    LIVE_SECTIONS = ("streams", "thresholds", "alerts", "sensors")
    """Configuration sections that a reload applies to the running pipeline; the others need a restart."""

    def reconfigure(self, new: Config) -> list[str]:
        """Apply the live sections of a new configuration, keeping every stream's state; say what changed.

        The engine (windows, LSTM state), the alert machine's open episodes and the sensor gate's state are
        kept. A new thresholds section rebuilds the policies and hands them what the old ones had learned per
        stream (a rolling history, evt peaks) wherever its layout still fits: a changed `k` keeps the history, a
        changed history length or policy kind starts that part afresh. The regime tests carry over likewise.
        """
        old = self.cfg
        changes = []
        for name in type(old).model_fields:
            if getattr(old, name) != getattr(new, name):
                changes.append(name if name in self.LIVE_SECTIONS else f"{name} (takes effect after a restart)")
        cfg = old.model_copy(update={n: getattr(new, n) for n in self.LIVE_SECTIONS})
        m = self.manifest
        # build everything first, so that a reload that fails (e.g. limits for an unknown feature) changes nothing
        threshold, regime, gate, silence = self.threshold, self.regime, self.gate, self.silence
        interp = self.interp  # readings held for interpolation stay held (and are released) across a reload
        every = np.arange(len(self.engine.streams))
        labels = Labeler(cfg.streams.labels) if cfg.streams != old.streams else self.labels
        if (cfg.thresholds != old.thresholds or (cfg.alerts.k, cfg.alerts.n) != (old.alerts.k, old.alerts.n)
                or cfg.streams != old.streams):  # new labels: every stream's override is resolved again
            threshold = build_threshold(cfg.thresholds, m, self.engine.streams, (cfg.alerts.k, cfg.alerts.n), labels)
            threshold.import_rows(every, self.threshold.export_rows(every))  # what was learned, where it fits
        if cfg.alerts.regime != old.alerts.regime:
            rc = cfg.alerts.regime
            regime = RegimeDetector(rc.delta, rc.threshold, rc.min_windows) if rc.enabled else None
            if regime is not None and self.regime is not None:
                regime.import_rows(every, self.regime.export_rows(every))
        if cfg.sensors != old.sensors:
            sc = cfg.sensors
            gate = SensorGate(m.features, sc.flatline_readings, dict(sc.limits), dict(sc.missing), m.longest_runs)
            gate.adopt(self.gate)  # open episodes go on, and clear once the new rules no longer flag them
            silence = SilenceWatch(sc.silent_after_s) if sc.silent_after_s > 0 else None
            if silence is not None and self.silence is not None:
                silence.silent = self.silence.silent.copy()
            interp = build_interpolator(m.features, dict(sc.missing), sc.interpolate_max_readings, self.interp)
        if cfg.alerts != old.alerts:
            self.alerts.reconfigure(cfg.alerts)
        if cfg.alerts != old.alerts or cfg.streams != old.streams:
            self.maintenance = MaintenanceSchedule(cfg.alerts.maintenance, self.engine.streams, labels)
        self.labels = labels
        self.threshold, self.regime, self.gate, self.silence = threshold, regime, gate, silence
        self.interp = interp
        self.cfg = cfg
        self.config_hash = config_hash(cfg)
        return changes

    def process(self, records: list[Record], now: float) -> BatchOutput:
        """Run one batch of raw records through every stage; `now` is wall-clock epoch seconds."""
        readings, rejects = self.decoder.decode(records, now)
        sensor_events, replayed = None, 0
        order_alerts: list[dict[str, Any]] = []
        self._ensure_rows()
        rows = self.engine.rows_for(readings.streams)  # looked up once, for every stage
        if len(readings):
            keep, replayed = self._skip_replayed(records, readings, rows)
            # late and repeated readings are dropped before any stage sees them (the gate included)
            admitted, dropped, why = self._admit(rows, readings.ts)
            for i, reason in zip(dropped.tolist(), why.tolist(), strict=True):
                if keep[i]:
                    rejects.append(Reject(int(readings.source[i]), str(reason), f"reading at ts {readings.ts[i]:.3f} "
                                          f"is not after the stream's last reading"))
            # ... and raise a sensor fault of their stream (when off, open ones still clear)
            mine = keep[dropped] if self.cfg.sensors.timestamp_faults else np.zeros(len(dropped), bool)
            opened, cleared, since, code = self.order.update(rows, readings.ts, keep, dropped[mine], why[mine])
            order_alerts = self._order_alerts(records, readings, rows, keep, opened, cleared, since, code)
            keep &= admitted
            if not keep.all():
                readings = Readings(readings.streams[keep], readings.ts[keep], readings.values[keep],
                                    readings.source[keep])
                rows = rows[keep]
        checked = readings  # the readings of this batch as the gate saw them (sensor alerts point into them)
        if self.gate.enabled and len(readings):
            readings.values, sensor_events = self.gate.check(rows, readings.ts, readings.values)
        if self.interp is not None and len(readings):  # readings with a gap to interpolate wait for its end
            readings, rows = self.interp.release(readings, rows)
        res = self.engine.score_batch(readings, rows)
        ws = res.windows
        self.alerts.ensure(self._room())
        warning, critical = self.threshold.levels(ws.rows)
        if self.feedback.any_false:  # operators' false-alarm labels raise their streams' levels
            held, at = np.unique(ws.rows, return_inverse=True)  # one lookup per stream, not per window
            f = self.feedback.factors([self.engine.streams[r] for r in held.tolist()])[at]
            warning, critical = warning * f, critical * f
        # warming streams and streams in maintenance or muted neither alert nor teach the thresholds
        muted = self.mutes.muted(ws.rows, now)
        paused = self.maintenance.active(ws.rows, ws.end_ts) | muted
        live = np.flatnonzero((ws.nth >= self.cfg.alerts.warmup_readings) & ~paused)
        muted_clears = self._close_muted(records, readings, ws, np.flatnonzero(muted), warning, critical)
        tr = self.alerts.update(ws.rows[live], ws.end_ts[live], ws.score[live], warning[live], critical[live], now,
                                ws.spike[live] if self.cfg.alerts.spikes else None)
        tr.window = live[tr.window]
        self.threshold.learn(ws.rows[live], ws.score[live], ws.score[live] >= warning[live])
        changed = np.empty(0, np.int64)
        if self.regime is not None:
            changed = live[self.regime.update(ws.rows[live], ws.score[live])]
        alerts = muted_clears + [
            self._alert(records, readings, ws, int(w), str(ev), float(at), str(sev), warning, critical)
            for w, ev, at, sev in zip(tr.window, tr.event, tr.raised_at, tr.severity, strict=True)
        ]
        alerts.extend(self._regime_event(records, readings, ws, int(w), warning) for w in changed)
        if sensor_events is not None and len(sensor_events):
            alerts.extend(self._sensor_alert(records, checked, sensor_events, e) for e in range(len(sensor_events)))
        if self.silence is not None and records:
            went, back = self.silence.update(self.engine.last_times())
            self.dirty[went] = self.dirty[back] = True
            alerts.extend(self._silence_alert(records[-1], int(r), state) for rows, state in
                          ((went, "raised"), (back, "cleared")) for r in rows)
        alerts.extend(order_alerts)
        drifting = self.drift.update(ws.rows, ws.score >= self._p99)
        if self.cfg.scoring.forget_after_s > 0 and len(readings) and self._sweep_due(rows, readings.ts):
            alerts.extend(self._forget_silent(records[-1], now))
        return BatchOutput(alerts, rejects, readings, ws, warning, replayed, drifting)

    def _partition_key(self, rows: np.ndarray) -> np.ndarray:
        """One int64 per row for the input (topic, partition) its newest reading came from."""
        return self.in_topic[rows] * (1 << 32) + self.in_partition[rows]

    def _sweep_due(self, rows: np.ndarray, ts: np.ndarray) -> bool:
        """Whether this batch moved an input partition's newest event time a sixteenth of forget_after_s past the
        last look, per partition."""
        if self._sweep_at and float(ts.max()) < min(self._sweep_at.values()):  # the usual batch: one max
            return False
        parts, at = np.unique(self._partition_key(rows), return_inverse=True)
        newest = np.full(len(parts), -np.inf)
        np.maximum.at(newest, at, ts)
        due = False
        step = self.cfg.scoring.forget_after_s / 16
        for key, hi in zip(parts.tolist(), newest.tolist(), strict=True):
            if hi >= self._sweep_at.get(key, -np.inf):
                self._sweep_at[key] = hi + step
                due = True
        return due

    def _forget_silent(self, rec: Record, now: float) -> list[dict[str, Any]]:
        """Forget the streams silent past scoring.forget_after_s that have no episode open; their silent episodes
        are cleared, the alert records returned.

        Silent is in event time, against the newest reading of any stream held on the same input partition (a
        member catching up reads some partitions far ahead of others), but never against one ahead of the wall
        clock `now` (a producer whose clock runs ahead does not age every other stream).
        """
        live = self.engine.live_rows()
        last = self.engine.last_times()[live]
        seen = np.isfinite(last)
        if not seen.any():
            return []
        live, last = live[seen], last[seen]
        self._ensure_rows()
        groups, at = np.unique(self._partition_key(live), return_inverse=True)
        newest = np.full(len(groups), -np.inf)
        np.maximum.at(newest, at, last)
        stale = live[last < np.minimum(newest[at], now) - self.cfg.scoring.forget_after_s]
        if not len(stale):
            return []
        busy = (self.alerts.state[stale] > NORMAL) | ~np.isnan(take(self.order.since, stale, np.nan))
        if self.gate.cap:
            busy |= take(self.gate.open, stale, False).reshape(len(stale), -1).any(axis=1)
        if self.interp is not None:  # readings held for an interpolation are not scored yet
            busy |= take(self.interp.n, stale, 0) > 0
        gone = stale[~busy]
        if not len(gone):
            return []
        alerts = []
        if self.silence is not None:
            silent = take(self.silence.silent, gone, False)
            alerts = [self._silence_alert(rec, int(r), "cleared") for r in gone[silent].tolist()]
        self.forgotten += self.forgotten_rows(gone)
        self.release(gone)
        return alerts

    # ----- operators' commands (control topic) --------------------------------------------------------------
    def command(self, cmd: Command, source: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """Apply an operator's command; return the alert records it produces and how many streams held match.

        mute and unmute take effect from the next batch on (a muted stream's open episode is cleared at its
        next window); ack marks the open episode of each matching stream acknowledged and returns one
        `acknowledged` record per episode. `source` ({topic, partition, offset}) says where it was read. A label
        is held (control.Feedback): a false alarm raises its stream's levels from the next batch on.
        """
        if cmd.action == "label":
            self.feedback.apply(cmd)
            return [], len(self.mutes.matching(cmd.streams))
        if cmd.action != "ack":
            self.mutes.apply(cmd)
            return [], len(self.mutes.matching(cmd.streams))
        self.acks[cmd.streams] = (cmd, source)
        rows = self._open_matching(cmd.streams)
        return self._acknowledge(rows, cmd, source, None), len(self.mutes.matching(cmd.streams))

    def forget(self, kind: str, glob: str) -> None:
        """Drop the mute or unmute ("mute"), the ack ("ack") of this glob or the label ("label") of this alert id:
        its key was deleted from the topic."""
        if kind == "label":
            self.feedback.forget(glob)
        elif kind == "ack":
            self.acks.pop(glob, None)
        else:
            self.mutes.forget(glob)

    def reapply_acks(self) -> list[dict[str, Any]]:
        """After a restore: acknowledge again the restored episodes that an ack seen earlier covers.

        Only episodes raised (wall clock) before the ack was written, and not yet acknowledged in their
        checkpoint: those the ack reached on a member whose checkpoint did not record it.
        """
        out: list[dict[str, Any]] = []
        for cmd, source in self.acks.values():
            out += self._acknowledge(self._open_matching(cmd.streams), cmd, source, cmd.at)
        return out

    def forgotten_rows(self, rows: np.ndarray) -> list[tuple[str, str, int]]:
        """(stream, topic, partition) of these rows, as `forgotten` lists them (their checkpoints get deleted)."""
        return [(self.engine.streams[r], self.topics[int(self.in_topic[r])], int(self.in_partition[r]))
                for r in np.asarray(rows, np.int64).tolist() if self.in_topic[r] >= 0]

    def retire(self, reason: str, rec: Record) -> list[dict[str, Any]]:
        """End every open episode at once, as when another model takes over: a `cleared` record of each, with
        `reason` and stamped with `rec` (the control command), and every stage left with no episode open (a
        condition that lasts opens a new one at its stream's next readings)."""
        n = len(self.engine.streams)
        self._ensure_rows()
        m = self.manifest
        out: list[dict[str, Any]] = []
        source = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
        rows = np.flatnonzero(self.alerts.state[:n] > NORMAL)
        for r in rows.tolist():
            at = float(self.alerts.raised_at[r])
            out.append({
                "alert_id": alert_id(m.model_version or m.name, self.engine.streams[r], at),
                "kind": "anomaly", "stream": self.engine.streams[r], "model": m.name,
                "model_version": m.model_version, "state": "cleared",
                "severity": "critical" if self.alerts.state[r] == ESCALATED else "warning",
                "first_seen": iso(at), "window_end": iso(float(self.engine.last_ts[r])), "reason": reason,
                "input": source, "config_hash": self.config_hash, "detector_version": __version__})
        self.alerts.close(rows)
        self.dirty[rows] = True
        g = self.gate
        for r, f, k in np.argwhere(g.open[:n]).tolist():
            end = float(self.engine.last_ts[r])
            out.append({**self._sensor_record(rec, r, f, REASONS[k], "cleared", float(g.opened_at[r, f, k]), end),
                        "cause": reason})
        self.dirty[np.flatnonzero(g.open[:n].any(axis=(1, 2)))] = True
        g.open[:n] = False
        late = np.flatnonzero(~np.isnan(self.order.since[:n]))
        for r in late.tolist():
            out.append({**self._order_alert(rec, r, "cleared", float(self.order.since[r]),
                                            float(self.engine.last_ts[r]), int(self.order.reason[r])),
                        "cause": reason})
        self.order.since[late] = np.nan
        self.dirty[late] = True
        if self.silence is not None:
            quiet = np.flatnonzero(self.silence.silent[:n])
            out += [{**self._silence_alert(rec, r, "cleared"), "cause": reason} for r in quiet.tolist()]
            self.silence.silent[quiet] = False
            self.dirty[quiet] = True
        return out

    def _open_matching(self, glob: str) -> np.ndarray:
        """Rows with an open alert episode whose stream id matches `glob`."""
        n = len(self.engine.streams)
        self._ensure_rows()
        open_rows = np.flatnonzero(self.alerts.state[:n] > NORMAL)
        names = self.engine.streams
        return np.array([r for r in open_rows.tolist() if fnmatchcase(names[r], glob)], np.int64)

    def _acknowledge(self, rows: np.ndarray, cmd: Command, source: dict[str, Any],
                     written_at: float | None) -> list[dict[str, Any]]:
        acked = self.alerts.acknowledge(rows, written_at)
        self.dirty[acked] = True
        m = self.manifest
        return [{
            "alert_id": alert_id(m.model_version or m.name, self.engine.streams[r], float(self.alerts.raised_at[r])),
            "kind": "anomaly",
            "stream": self.engine.streams[r],
            "model": m.name,
            "model_version": m.model_version,
            "state": "acknowledged",
            "severity": "critical" if self.alerts.state[r] == ESCALATED else "warning",
            "first_seen": iso(float(self.alerts.raised_at[r])),
            "reason": cmd.reason,
            "by": cmd.by,
            "acknowledged_at": iso(cmd.at),
            "input": source,
            "config_hash": self.config_hash,
            "detector_version": __version__,
        } for r in acked.tolist()]

    def _close_muted(self, records: list[Record], readings: Readings, ws: WindowScores, muted: np.ndarray,
                     warning: np.ndarray, critical: np.ndarray) -> list[dict[str, Any]]:
        """Clear (reason `muted`) the open episodes of muted streams, at the first window of each in the batch."""
        if not len(muted):
            return []
        _, first = np.unique(ws.rows[muted], return_index=True)
        w = muted[first]
        w = w[self.alerts.state[ws.rows[w]] > NORMAL]
        if not len(w):
            return []
        rows = ws.rows[w]
        raised_at, severity = self.alerts.raised_at[rows].copy(), self.alerts.state[rows] == ESCALATED
        self.alerts.close(rows)
        return [{**self._alert(records, readings, ws, int(i), "cleared", float(at), "critical" if crit else "warning",
                               warning, critical), "reason": "muted"}
                for i, at, crit in zip(w.tolist(), raised_at.tolist(), severity.tolist(), strict=True)]

    def _order_alerts(self, records: list[Record], readings: Readings, rows: np.ndarray, live: np.ndarray,
                      opened: np.ndarray, cleared: np.ndarray, since: np.ndarray,
                      code: np.ndarray) -> list[dict[str, Any]]:
        """sensor_fault records of streams whose readings came late or repeated (opened), or in order again."""
        out = []
        for i in opened.tolist():  # a reading index: the stream's first late or repeated one
            row = int(rows[i])
            at = float(readings.ts[i])
            out.append(self._order_alert(records[int(readings.source[i])], row, "raised", at, at,
                                         int(self.order.reason[row])))
        for row, at, c in zip(cleared.tolist(), since.tolist(), code.tolist(), strict=True):
            last = int(np.flatnonzero((rows == row) & live)[-1])
            out.append(self._order_alert(records[int(readings.source[last])], row, "cleared", at,
                                         float(readings.ts[last]), c))
        return out

    def _order_alert(self, rec: Record, row: int, state: str, since: float, end: float,
                     code: int) -> dict[str, Any]:
        return self._stream_fault(rec, row, state, OrderWatch.REASONS[code], since, end, "out of order")

    def _silence_alert(self, rec: Record, row: int, state: str) -> dict[str, Any]:
        if np.isnan(self.silent_since[row]):
            self.silent_since[row] = float(self.engine.last_ts[row])
        quiet_since = float(self.silent_since[row])
        if state == "cleared":
            self.silent_since[row] = np.nan
        return self._stream_fault(rec, row, state, "silent", quiet_since, float(self.engine.last_ts[row]), "silent")

    def _stream_fault(self, rec: Record, row: int, state: str, reason: str, since: float, end: float,
                      direction: str) -> dict[str, Any]:
        """A sensor_fault record about the whole stream (feature "*"), its episode begun at event time `since`."""
        stream, m = self.engine.streams[row], self.manifest
        return {
            "alert_id": alert_id(f"{m.model_version or m.name}|*|{reason}", stream, since),
            "kind": "sensor_fault",
            "stream": stream,
            "model": m.name,
            "model_version": m.model_version,
            "state": state,
            "severity": "warning",
            "reason": reason,
            "feature": "*",
            "window_start": iso(since),
            "window_end": iso(end),
            "first_seen": iso(since),
            "top_features": [{"name": "*", "share": 1.0, "direction": direction}],
            "input": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
            "config_hash": self.config_hash,
            "detector_version": __version__,
        }

    def _regime_event(self, records: list[Record], readings: Readings, ws: WindowScores, w: int,
                      warning: np.ndarray) -> dict[str, Any]:
        stream = self.engine.streams[int(ws.rows[w])]
        rec = records[int(readings.source[ws.reading[w]])]
        m = self.manifest
        at = float(ws.end_ts[w])
        top = np.argsort(-ws.share[w], kind="stable")[: self.cfg.alerts.top_features]
        return {
            "alert_id": alert_id(f"{m.model_version or m.name}|regime", stream, at),
            "kind": "regime_change",
            "stream": stream,
            "model": m.name,
            "model_version": m.model_version,
            "state": "detected",
            "severity": "info",
            "score": round(float(ws.score[w]), 6),
            "threshold": round(float(warning[w]), 6),
            "threshold_policy": self.threshold.policy_of(int(ws.rows[w])),
            "window_start": iso(float(ws.start_ts[w])),
            "window_end": iso(at),
            "first_seen": iso(at),
            "top_features": [{"name": m.features[int(f)], "share": round(float(ws.share[w, f]), 4)} for f in top],
            "input": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
            "config_hash": self.config_hash,
            "detector_version": __version__,
        }

    def _sensor_alert(self, records: list[Record], readings: Readings, ev: SensorEvents, e: int) -> dict[str, Any]:
        rec = records[int(readings.source[int(ev.reading[e])])]
        return self._sensor_record(rec, int(ev.rows[e]), int(ev.feature[e]), str(ev.reason[e]), str(ev.state[e]),
                                   float(ev.raised_at[e]), float(ev.ts[e]))

    def _sensor_record(self, rec: Record, row: int, f: int, reason: str, state: str, raised_at: float,
                       end: float) -> dict[str, Any]:
        """A sensor_fault record about feature f of a stream, its episode raised at event time `raised_at`."""
        stream = self.engine.streams[row]
        feature = self.manifest.features[f]
        m = self.manifest
        return {
            "alert_id": alert_id(f"{m.model_version or m.name}|{feature}|{reason}", stream, raised_at),
            "kind": "sensor_fault",
            "stream": stream,
            "model": m.name,
            "model_version": m.model_version,
            "state": state,
            "severity": "warning",
            "reason": reason,
            "feature": feature,
            "window_start": iso(raised_at),
            "window_end": iso(end),
            "first_seen": iso(raised_at),
            "top_features": [{"name": feature, "share": 1.0, "direction": {
                "flatline": "stuck", "out_of_range": "outside limits", "missing": "missing"}[reason]}],
            "input": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
            "config_hash": self.config_hash,
            "detector_version": __version__,
        }

    def _alert(self, records: list[Record], readings: Readings, ws: WindowScores, w: int, event: str,
               raised_at: float, severity: str, warning: np.ndarray, critical: np.ndarray) -> dict[str, Any]:
        stream = self.engine.streams[int(ws.rows[w])]
        top = np.argsort(-ws.share[w], kind="stable")[: self.cfg.alerts.top_features]
        rec = records[int(readings.source[ws.reading[w]])]
        m = self.manifest
        return {
            "alert_id": alert_id(m.model_version or m.name, stream, raised_at),
            "kind": "anomaly",
            "stream": stream,
            "model": m.name,
            "model_version": m.model_version,
            "state": event,
            "severity": severity,
            "score": round(float(ws.score[w]), 6),
            "threshold": round(float(critical[w] if severity == "critical" else warning[w]), 6),
            "threshold_policy": self.threshold.policy_of(int(ws.rows[w])),
            "window_start": iso(float(ws.start_ts[w])),
            "window_end": iso(float(ws.end_ts[w])),
            "first_seen": iso(raised_at),
            "top_features": [
                {
                    "name": m.features[int(f)],
                    "share": round(float(ws.share[w, f]), 4),
                    "direction": "above" if ws.direction[w, f] >= 0 else "below",
                }
                for f in top
            ],
            "input": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
            "config_hash": self.config_hash,
            "detector_version": __version__,
        }


def encode_alert(alert: dict[str, Any]) -> tuple[bytes, bytes]:
    """The Kafka key (stream id) and JSON value of an alert."""
    return alert["stream"].encode(), orjson.dumps(alert)
