"""Training data from what Kafka already holds: the input topic's readings over a time span, less alerted spans.

`detector train --from-topic` reads the records (consumers.kafka.read_span), and this module turns them into
the per-stream series `train_model` takes: every reading form the daemon accepts, decoded by the daemon's own
Decoder (a record it would dead-letter is counted by reason and left out), in time order per stream, a
repeated timestamp kept once. With alert records (the alerts topic over the same span), the readings inside a
stream's anomaly or sensor-fault episodes (raised to cleared, or to the span's end while open) are left out, so
a model is not taught its own faults as normal; regime changes are a new normal and stay in.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import orjson

from consumers.base import Record
from detector.config import InputConfig
from detector.decode import Decoder, parse_ts
from detector.errors import DataError
from detector.train import Series

__all__ = ["TopicData", "features_in", "alerted_spans", "series_from_records"]

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
    excluded: int = 0  # readings inside alerted spans


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


def series_from_records(records: list[Record], features: list[str], cfg: InputConfig,
                        spans: dict[str, list[tuple[float, float]]] | None = None) -> TopicData:
    """Decode the records with the daemon's decoder into per-stream series ordered by time, leaving out what it
    would reject, repeated timestamps and the readings inside `spans`."""
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
        raise DataError(f"no readings left to learn from: all {len(readings)} lie inside alerted spans or repeat")
    bounds = np.flatnonzero(np.r_[True, streams[1:] != streams[:-1], True])
    series = Series(list(features), [str(streams[a]) for a in bounds[:-1]],
                    [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return TopicData(series, len(records), int(keep.sum()), rejected, duplicates, excluded)
