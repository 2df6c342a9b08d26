"""Training data from what Kafka already holds: the input topic's readings over a time span, less alerted and
muted spans.

`detector train --from-topic` reads the records (consumers.kafka.read_span), and this module turns them into
the per-stream series `train_model` takes: every reading form the daemon accepts, decoded by the daemon's own
Decoder (a record it would dead-letter is counted by reason and left out), in time order per stream, a
repeated timestamp kept once. With alert records (the alerts topic over the same span), the readings inside a
stream's anomaly or sensor-fault episodes (raised to cleared, or to the span's end while open) are left out, so
a model is not taught its own faults as normal; regime changes are a new normal and stay in. With the control
topic's records, the readings of a stream while operators held it muted are left out too (a mute is how an
operator says "this machine is not itself now": maintenance, a known fault).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import translate

import numpy as np
import orjson
import pandas as pd

from consumers.base import Record
from detector.config import InputConfig
from detector.control import BadCommand, Command, deleted, parse_command
from detector.decode import Decoder, parse_ts
from detector.errors import DataError
from detector.train import Series

__all__ = ["TopicData", "features_in", "alerted_spans", "muted_spans", "joined", "series_from_records"]

EXCLUDED_KINDS = ("anomaly", "sensor_fault")
"""Alert kinds whose episodes are left out of training data (a regime change is a new normal, kept)."""


@dataclass
class TopicData:
    """The series read from a topic, and what became of its records."""

    series: Series
    records: int
    readings: int
    rejected: dict[str, int] = field(default_factory=dict)  # by the reason the daemon would dead-letter it
    duplicates: int = 0  # readings whose stream and timestamp came before
    excluded: int = 0  # readings inside alerted or muted spans
    muted_spans: int = 0  # muted spans found in the control topic's records (over the streams read)


def _values_of(msg: object, fields: InputConfig) -> Iterable[dict]:
    """The values objects of one message, in any of the three reading forms (others: none)."""
    if not isinstance(msg, dict):
        return []
    f = fields.fields
    batch = msg.get(f.readings)
    if isinstance(batch, dict):
        vals = batch.get(f.values)
        return [vals] if isinstance(vals, dict) else []
    items = batch if isinstance(batch, list) else [msg]
    return [it[f.values] for it in items if isinstance(it, dict) and isinstance(it.get(f.values), dict)]


def features_in(records: Iterable[Record], cfg: InputConfig) -> list[str]:
    """The feature names the records carry, in the order first seen (unreadable records add none).

    >>> recs = [Record("t", 0, i, None, v) for i, v in enumerate([b'{"stream": "a", "ts": 1, "values": {"b": 1}}',
    ...         b'not json', b'{"stream": "a", "readings": {"ts": [2], "values": {"a": [1], "b": [2]}}}'])]
    >>> features_in(recs, InputConfig())
    ['b', 'a']
    """
    seen: dict[str, None] = {}
    for rec in records:
        try:
            msg = orjson.loads(rec.value or b"")
        except orjson.JSONDecodeError:
            continue
        for vals in _values_of(msg, cfg):
            seen.update(dict.fromkeys(k for k in vals if isinstance(k, str)))
    return list(seen)


def alerted_spans(records: Iterable[Record], until: float) -> dict[str, list[tuple[float, float]]]:
    """Per stream, the [start, end] event-time spans of its anomaly and sensor-fault episodes in alert records
    (an episode still open at the end of the records runs to `until`).

    >>> a = lambda **kw: Record("alerts", 0, 0, None, orjson.dumps({"kind": "anomaly", "stream": "p", **kw}))
    >>> alerted_spans([a(alert_id="x", state="raised", first_seen="1970-01-01T00:01:40Z", window_end=100),
    ...                a(alert_id="x", state="cleared", first_seen=100, window_end=160),
    ...                a(alert_id="y", state="raised", first_seen=500, window_end=500)], until=900.0)
    {'p': [(100.0, 160.0), (500.0, 900.0)]}
    """
    opened: dict[str, tuple[str, float]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for rec in records:
        try:
            alert = orjson.loads(rec.value or b"")
            if alert.get("kind") not in EXCLUDED_KINDS:
                continue
            aid, stream, state = alert["alert_id"], alert["stream"], alert["state"]
            start = parse_ts(alert["first_seen"])
            end = parse_ts(alert.get("window_end", alert["first_seen"]))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            continue  # not an alert this detector wrote
        if state in ("raised", "escalated"):
            opened.setdefault(aid, (stream, start))
        elif state == "cleared":
            stream, start = opened.pop(aid, (stream, start))
            spans.setdefault(stream, []).append((start, end))
    for stream, start in opened.values():
        spans.setdefault(stream, []).append((start, until))
    return {s: sorted(v) for s, v in spans.items()}


def muted_spans(records: Iterable[Record], streams: Iterable[str],
                until: float) -> dict[str, list[tuple[float, float]]]:
    """Per stream, the [start, end] spans in which the control records' mute commands held it muted (the daemon's
    rule: of the mute and unmute commands whose glob matches, the newest decides, until its `until`; a
    tombstone deletes its command from then on); a mute in force at the end runs to `until`. Times are the
    records' (wall clock), compared with readings' event times.

    >>> c = lambda at, v, key=b"k": Record("ctl", 0, 0, key, v and orjson.dumps(v), int(at * 1000))
    >>> muted_spans([c(100, {"action": "mute", "streams": "pump-*"}), c(200, {"action": "unmute", "streams": "pump-2"}),
    ...              c(300, {"action": "mute", "streams": "pump-2", "until": 350}), c(400, None, b"mute:pump-*")],
    ...             ["pump-1", "pump-2", "fan-1"], until=900.0)
    {'pump-1': [(100.0, 400.0)], 'pump-2': [(100.0, 200.0), (300.0, 350.0)]}
    """
    events: list[tuple[float, str, Command | None]] = []  # in the topic's order: the newest last
    for rec in records:
        at = rec.timestamp_ms / 1000
        try:
            cmd = parse_command(rec.value, at)
        except BadCommand:
            continue  # the daemon dead-lettered it
        if cmd is None:
            gone = deleted(rec.key)
            if gone is not None and gone[0] == "mute":
                events.append((at, gone[1], None))
        elif cmd.action in ("mute", "unmute"):
            events.append((at, cmd.streams, cmd))
    match = {glob: re.compile(translate(glob)).match for _, glob, _ in events}
    out: dict[str, list[tuple[float, float]]] = {}
    for stream in streams:
        mine = [e for e in events if match[e[1]](stream)]
        rules: dict[str, Command] = {}  # by glob, the newest last (a command replaces its glob's and is newest)
        spans: list[tuple[float, float]] = []
        for i, (at, glob, cmd) in enumerate(mine):
            rules.pop(glob, None)
            if cmd is not None:
                rules[glob] = cmd
            newest = next(reversed(rules.values()), None)
            if newest is None or newest.action != "mute":
                continue
            end = min(mine[i + 1][0] if i + 1 < len(mine) else until,
                      newest.until if newest.until is not None else math.inf)
            if end <= at:
                continue
            if spans and spans[-1][1] >= at:  # held on by the next command: one span
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((at, end))
        if spans:
            out[stream] = spans
    return out


def joined(*spans: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Per stream, the spans of all the given maps together, in time order.

    >>> joined({"a": [(5.0, 6.0)]}, {"a": [(1.0, 2.0)], "b": [(3.0, 4.0)]})
    {'a': [(1.0, 2.0), (5.0, 6.0)], 'b': [(3.0, 4.0)]}
    """
    out: dict[str, list[tuple[float, float]]] = {}
    for m in spans:
        for stream, ranges in m.items():
            out.setdefault(stream, []).extend(ranges)
    return {s: sorted(v) for s, v in out.items()}


def series_from_records(records: list[Record], features: list[str], cfg: InputConfig,
                        spans: dict[str, list[tuple[float, float]]] | None = None,
                        control: list[Record] | None = None) -> TopicData:
    """Decode the records with the daemon's decoder into per-stream series ordered by time, leaving out what it
    would reject, repeated timestamps and the readings inside `spans` or, with the control topic's records,
    inside a stream's muted spans."""
    readings, rejects = Decoder.for_input(features, cfg).decode(records, time.time())
    rejected = dict(Counter(r.reason for r in rejects))
    if not len(readings):
        raise DataError(f"no readings to learn from: {len(records)} records, "
                        + (f"rejected as {', '.join(f'{k} ({v})' for k, v in sorted(rejected.items()))}"
                           if rejected else "none of them readings"))
    streams, ts, values = readings.streams, readings.ts, readings.values
    order = np.lexsort((ts, streams.astype(str)))
    streams, ts, values = streams[order], ts[order], values[order]
    keep = np.ones(len(ts), bool)
    keep[1:] = (streams[1:] != streams[:-1]) | (ts[1:] != ts[:-1])
    duplicates = int((~keep).sum())
    inside = np.zeros(len(ts), bool)
    muted = muted_spans(control, pd.unique(streams).tolist(), math.inf) if control else {}
    spans = joined(spans or {}, muted)
    if spans:  # each stream's readings are one slice, in time order: a span is a searchsorted range of it
        starts = np.flatnonzero(np.r_[True, streams[1:] != streams[:-1]])
        slices = dict(zip(streams[starts].tolist(), zip(starts, np.r_[starts[1:], len(ts)], strict=True),
                          strict=True))
        for stream, ranges in spans.items():
            if stream not in slices:
                continue
            a, b = slices[stream]
            for lo, hi in ranges:
                inside[a + np.searchsorted(ts[a:b], lo, "left"):a + np.searchsorted(ts[a:b], hi, "right")] = True
    excluded = int((inside & keep).sum())
    keep &= ~inside
    streams, values = streams[keep], values[keep]
    if not len(streams):
        raise DataError(f"no readings left to learn from: all {len(readings)} lie inside alerted or muted spans or "
                        f"repeat")
    bounds = np.flatnonzero(np.r_[True, streams[1:] != streams[:-1], True])
    series = Series(list(features), [str(streams[a]) for a in bounds[:-1]],
                    [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return TopicData(series, len(records), int(keep.sum()), rejected, duplicates, excluded,
                     sum(map(len, muted.values())))
