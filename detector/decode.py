"""Decode and validate raw records into columnar readings; what does not validate is returned with a reason.

Accepted message forms (field names are mapped in config `input.fields`):
  one reading:   {"stream": "pump-17", "ts": 1700000000.5, "values": {"temp": 71.3, "rpm": 1480}}
  many readings: {"stream": "pump-17", "readings": [{"ts": ..., "values": {...}}, ...]}
  as columns:    {"stream": "pump-17", "readings": {"ts": [t1, t2, ...], "values": {"temp": [v1, v2, ...], ...}}}
`ts` is epoch seconds, epoch milliseconds (any number above 1e11) or an RFC 3339 string. A value of null
is a missing reading value (a gap, imputed downstream with a mask), not bad input. A name given twice in one
object (a field, or a feature inside `values`, in any form) is ambiguous and rejected (`duplicate_key`).
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from consumers.base import Record

if TYPE_CHECKING:
    from detector.config import InputConfig

__all__ = ["Readings", "Reject", "Decoder", "REASONS"]

REASONS = (
    "empty_value",
    "oversize",
    "bad_json",
    "not_an_object",
    "missing_stream",
    "missing_timestamp",
    "bad_timestamp",
    "future_timestamp",
    "bad_values",
    "unknown_feature",
    "non_numeric_value",
    "no_values",
    "late",
    "duplicate_timestamp",
    "duplicate_key",
    "key_mismatch",
    "missing_key",
    "stream_id_too_long",
)
"""Every reason a record can be rejected for; the dead-letter topic's `reason` header is one of these."""


@dataclass(slots=True)
class Readings:
    """A batch of readings as columns: N readings of F features."""

    streams: np.ndarray  # (N,) object: stream ids
    ts: np.ndarray  # (N,) float64: event time, epoch seconds
    values: np.ndarray  # (N, F) float32: NaN where a value is missing
    source: np.ndarray  # (N,) int64: index of the record each reading came from

    def __len__(self) -> int:
        return len(self.ts)

    @staticmethod
    def empty(n_features: int) -> Readings:
        """A batch with no readings."""
        return Readings(
            np.empty(0, dtype=object), np.empty(0), np.empty((0, n_features), np.float32), np.empty(0, np.int64)
        )


@dataclass(slots=True, frozen=True)
class Reject:
    """One record (or one reading of a batched record) that did not validate."""

    index: int  # index of the record in the batch
    reason: str  # one of REASONS
    detail: str


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def parse_ts(raw: Any) -> float:
    """Event time in epoch seconds from epoch s, epoch ms (> 1e11) or an RFC 3339 string.

    >>> parse_ts(1700000000), parse_ts(1700000000500), parse_ts("2023-11-14T22:13:20Z")
    (1700000000.0, 1700000000.5, 1700000000.0)
    """
    if isinstance(raw, bool) or raw is None:
        raise _Bad("bad_timestamp", f"timestamp must be a number or RFC 3339 string, got {raw!r}")
    if isinstance(raw, int | float):
        t = float(raw)
    elif isinstance(raw, str):
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise _Bad("bad_timestamp", f"timestamp {raw[:40]!r} is not RFC 3339") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        t = dt.timestamp()
    else:
        raise _Bad("bad_timestamp", f"timestamp must be a number or RFC 3339 string, got {type(raw).__name__}")
    if not math.isfinite(t) or t <= 0:
        raise _Bad("bad_timestamp", f"timestamp {raw!r} is not a positive finite time")
    return t / 1000.0 if t > 1e11 else t


_NUMERIC = {float, int, type(None)}  # bool is its own type, so True and False are not numbers here


def _names(obj: dict[str, Any]) -> int:
    """How many names the objects of a parsed message hold, nested ones included.

    >>> _names({"stream": "p", "ts": 1, "values": {"temp": 1, "rpm": 2}})
    5
    """
    n = len(obj)
    values = obj.values()
    kinds = set(map(type, values))
    if dict in kinds or list in kinds:
        for v in values:
            if type(v) is dict:
                n += _names(v)
            elif type(v) is list:
                n += _names_in(v)
    return n


def _colons(obj: Any) -> int:
    """How many colons the names and strings of a parsed message hold.

    >>> _colons({"stream": "a:b", "ts": "2023-11-14T22:13:20Z", "values": {"x:y": 1}})
    4
    """
    if type(obj) is dict:
        return sum(name.count(":") + _colons(v) for name, v in obj.items())
    if type(obj) is list:
        return sum(map(_colons, obj))
    return obj.count(":") if type(obj) is str else 0


def _string_colons(stamps: Any) -> int:
    """How many colons the strings among `stamps` hold: one timestamp, or a list or iterable of values."""
    if type(stamps) is str:
        return stamps.count(":")
    if type(stamps) is int or type(stamps) is float:
        return 0
    return sum(t.count(":") for t in stamps if type(t) is str)


def _names_in(items: list[Any]) -> int:
    kinds = set(map(type, items))
    if dict not in kinds and list not in kinds:
        return 0
    return sum(_names(v) if type(v) is dict else _names_in(v) if type(v) is list else 0 for v in items)


class _Twice(Exception):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> None:
    if len({name for name, _ in pairs}) < len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _Twice(name)
            seen.add(name)


def _name_given_twice(value: bytes) -> str | None:
    """The first name given twice in one object of a JSON message, or None.

    >>> _name_given_twice(b'{"a": 1, "b": {"c": 2, "c": 3}}'), _name_given_twice(b'{"a": {"b": 1}, "b": 2}')
    ('c', None)
    """
    try:
        json.loads(value, object_pairs_hook=_unique)
    except _Twice as twice:
        return str(twice.args[0])
    except ValueError:  # orjson read it, but the standard parser may not: no finding
        return None
    return None


class Decoder:
    """Turns a batch of raw records into Readings plus Rejects; never raises on bad input."""

    def __init__(
        self,
        features: list[str],
        *,
        stream_field: str = "stream",
        ts_field: str = "ts",
        values_field: str = "values",
        readings_field: str = "readings",
        max_message_bytes: int = 1_048_576,
        max_future_s: float = 86400.0,
        require_stream_key: bool = True,
        max_stream_id_bytes: int = 256,
    ) -> None:
        self.features = list(features)
        self._col = {f: i for i, f in enumerate(self.features)}
        self._colset = self._col.keys()
        self._stream, self._ts, self._values, self._readings = stream_field, ts_field, values_field, readings_field
        self.max_message_bytes = max_message_bytes
        self.max_future_s = max_future_s
        self.require_stream_key = require_stream_key
        self.max_stream_id_bytes = max_stream_id_bytes
        self._values_of, self._ts_of = operator.itemgetter(values_field), operator.itemgetter(ts_field)
        self._colon_names = any(":" in name for name in [*self.features, stream_field, ts_field, values_field,
                                                          readings_field])

    @classmethod
    def for_input(cls, features: list[str], cfg: InputConfig) -> Decoder:
        """A decoder of these features with the field names and limits of the config's `input` section."""
        f = cfg.fields
        return cls(features, stream_field=f.stream, ts_field=f.timestamp, values_field=f.values,
                   readings_field=f.readings, max_message_bytes=cfg.max_message_bytes, max_future_s=cfg.max_future_s,
                   require_stream_key=cfg.require_stream_key, max_stream_id_bytes=cfg.max_stream_id_bytes)

    def decode(self, records: list[Record], now: float) -> tuple[Readings, list[Reject]]:
        """Decode every record; `now` (epoch s) bounds how far in the future an event time may be."""
        streams: list[str] = []
        ts: list[float] = []
        rows: list[list[float]] = []
        source: list[int] = []
        columns: list[tuple[str, np.ndarray, np.ndarray, int]] = []  # messages in the columnar form
        rejects: list[Reject] = []
        horizon = now + self.max_future_s
        for i, rec in enumerate(records):
            try:
                msg = self._load(rec.value)
                stream = msg.get(self._stream)
                if not isinstance(stream, str) or not stream:
                    raise _Bad("missing_stream", f"field {self._stream!r} must be a non-empty string")
                if len(stream) * 4 > self.max_stream_id_bytes and len(stream.encode()) > self.max_stream_id_bytes:
                    raise _Bad("stream_id_too_long", f"stream id {stream[:40]!r}... is {len(stream.encode())} bytes, "
                                                     f"above input.max_stream_id_bytes ({self.max_stream_id_bytes})")
                batch = msg.get(self._readings)
                # the names the message holds as parsed, and its timestamps (a duplicate check counts them):
                # counted here for the usual shapes, whose values validation has seen; None: counted generically
                names: int | None = None
                if isinstance(batch, dict):
                    block = self._columns(batch, horizon)
                    parsed = []
                    stamps = batch[self._ts]
                    if len(msg) == 2 and len(batch) == 2:
                        names = 4 + len(batch[self._values])
                else:
                    items = batch if isinstance(batch, list) else [msg]
                    if isinstance(batch, list) and not batch:
                        raise _Bad("no_values", f"field {self._readings!r} is an empty list")
                    parsed = [self._reading(item, horizon) for item in items]
                    stamps = map(self._ts_of, items) if batch is not None else msg[self._ts]
                    if batch is None and len(msg) == 3:
                        names = 3 + len(msg[self._values])
                    elif batch is None:  # more fields: counted here when they are not objects or lists
                        kinds = list(map(type, msg.values()))
                        if kinds.count(dict) == 1 and list not in kinds:
                            names = len(msg) + len(msg[self._values])
                            stamps = msg  # its strings: the colons of all of them count
                    elif batch is not None and len(msg) == 2 and sum(map(len, items)) == 2 * len(items):
                        names = 2 + 2 * len(items) + sum(map(len, map(self._values_of, items)))
                self._unambiguous(rec, msg, stream, names, stamps)
            except _Bad as bad:
                rejects.append(Reject(i, bad.reason, bad.detail))
                continue
            if isinstance(batch, dict):
                columns.append((stream, *block, i))
            for t, row in parsed:
                streams.append(stream)
                ts.append(t)
                rows.append(row)
                source.append(i)
        if not ts and not columns:
            return Readings.empty(len(self.features)), rejects
        # values were only type-checked per reading; their range is checked here for the whole batch at once
        values = np.array(rows, dtype=np.float64).reshape(len(rows), len(self.features))  # None becomes NaN
        src = np.array(source, dtype=np.int64)
        stream_ids, times = np.array(streams, dtype=object), np.array(ts, dtype=np.float64)
        if columns:  # in record order, as if every message had been in the row form
            stream_ids = np.concatenate([stream_ids, *(np.full(len(c[1]), c[0], dtype=object) for c in columns)])
            times = np.concatenate([times, *(c[1] for c in columns)])
            values = np.concatenate([values, *(c[2] for c in columns)])
            src = np.concatenate([src, *(np.full(len(c[1]), c[3], dtype=np.int64) for c in columns)])
            order = np.argsort(src, kind="stable")
            stream_ids, times, values, src = stream_ids[order], times[order], values[order], src[order]
        huge = (np.abs(values) > 3.0e38).any(axis=1)  # inf included: not a finite float32
        empty = np.isnan(values).all(axis=1)
        if huge.any() or empty.any():
            bad_records: dict[int, Reject] = {}
            for j in np.flatnonzero(huge | empty).tolist():
                col = int(np.argmax(np.abs(np.nan_to_num(values[j], nan=0.0)) > 3.0e38))
                bad_records.setdefault(int(src[j]), Reject(int(src[j]), *(
                    ("non_numeric_value", f"feature {self.features[col]!r} is not a finite float32") if huge[j]
                    else ("no_values", "reading carries no feature value"))))
            rejects.extend(sorted(bad_records.values(), key=lambda r: r.index))
            keep = ~np.isin(src, list(bad_records))
            if not keep.any():
                return Readings.empty(len(self.features)), sorted(rejects, key=lambda r: r.index)
            values, src, stream_ids, times = values[keep], src[keep], stream_ids[keep], times[keep]
            rejects.sort(key=lambda r: r.index)
        return Readings(stream_ids, times, values.astype(np.float32), src), rejects

    def _columns(self, cols: dict[str, Any], horizon: float) -> tuple[np.ndarray, np.ndarray]:
        """The columnar batched form: times and an (n, F) array of values, NaN where missing or not given."""
        where = f"field {self._readings!r}"
        raw = cols.get(self._ts)
        if raw is None:
            raise _Bad("missing_timestamp", f"{where} has no {self._ts!r} list")
        if not isinstance(raw, list):
            raise _Bad("bad_timestamp", f"{where}: {self._ts!r} must be a list of timestamps")
        if not raw:
            raise _Bad("no_values", f"{where} has no readings")
        if set(map(type, raw)) <= {int, float}:  # epoch numbers: checked as parse_ts would, all at once
            t = np.array(raw, dtype=np.float64)
            if not (np.isfinite(t) & (t > 0)).all():
                raise _Bad("bad_timestamp", f"{where}: every timestamp must be a positive finite time")
            t = np.where(t > 1e11, t / 1000.0, t)
        else:
            t = np.array([parse_ts(x) for x in raw], dtype=np.float64)
        if (t > horizon).any():
            raise _Bad("future_timestamp", f"timestamp {t.max():.0f} is more than input.max_future_s ahead of now")
        vals = cols.get(self._values)
        if not isinstance(vals, dict):
            raise _Bad("bad_values", f"{where}: {self._values!r} must be an object of feature: list of numbers")
        out = np.full((len(t), len(self.features)), np.nan)
        for name, col in vals.items():
            j = self._col.get(name)
            if j is None:
                raise _Bad("unknown_feature", f"feature {str(name)[:40]!r} is not one of the model's features")
            if not isinstance(col, list) or len(col) != len(t):
                raise _Bad("bad_values", f"feature {name!r} must be a list of {len(t)} numbers or nulls, one per "
                                         f"timestamp")
            if not set(map(type, col)) <= _NUMERIC:
                bad = next(v for v in col if type(v) not in _NUMERIC)
                raise _Bad("non_numeric_value", f"feature {name!r} must be a number or null, got {bad!r:.40}")
            out[:, j] = np.array(col, dtype=np.float64)  # null becomes NaN
        return t, out

    def _unambiguous(self, rec: Record, msg: dict[str, Any], stream: str, names: int | None,
                     stamps: Any) -> None:
        """Reject a name given twice in one object (JSON parsers keep one silently), and a missing or wrong key."""
        value = rec.value or b""
        # Every name in the raw message is followed by one colon; the other colons are inside strings. So when the
        # colons are as many as the parsed objects hold names plus the colons of their strings, no name came twice
        # (without \\u escapes, which hide colons from the raw bytes). Otherwise the message is parsed again.
        n = value.count(b":")
        if names is None or self._colon_names:
            names = _names(msg)
            colons = 0 if n == names else _colons(msg)
        elif n != names:  # strings with colons (RFC 3339 times, stream ids), or a name given twice
            colons = _string_colons(stamps.values()) if type(stamps) is dict else \
                stream.count(":") + _string_colons(stamps)
        else:
            colons = 0
        if n != names + colons or (colons and b"\\u" in value):
            twice = _name_given_twice(value)
            if twice is not None:
                raise _Bad("duplicate_key", f"name {twice[:40]!r} appears more than once in one object of the "
                                            "message")
        if not self.require_stream_key:
            return
        if rec.key is None:
            raise _Bad("missing_key", f"record has no key: a stream's readings must carry its id {stream[:40]!r} as "
                                      "key (input.require_stream_key)")
        if rec.key != stream.encode():
            raise _Bad("key_mismatch", f"record key {rec.key[:40]!r} is not the stream id {stream[:40]!r}: a "
                                       "stream's readings must carry its id as key (input.require_stream_key)")

    def _load(self, value: bytes | None) -> dict[str, Any]:
        if not value:
            raise _Bad("empty_value", "message has no value")
        if len(value) > self.max_message_bytes:
            raise _Bad("oversize", f"message is {len(value)} bytes, above input.max_message_bytes")
        try:
            msg = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise _Bad("bad_json", f"not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise _Bad("not_an_object", f"message must be a JSON object, got {type(msg).__name__}")
        return msg

    def _reading(self, item: Any, horizon: float) -> tuple[float, list[float]]:
        if not isinstance(item, dict):
            raise _Bad("not_an_object", "each reading must be a JSON object")
        if self._ts not in item:
            raise _Bad("missing_timestamp", f"field {self._ts!r} is missing")
        t = parse_ts(item[self._ts])
        if t > horizon:
            raise _Bad("future_timestamp", f"timestamp {t:.0f} is more than input.max_future_s ahead of now")
        vals = item.get(self._values)
        if not isinstance(vals, dict):
            raise _Bad("bad_values", f"field {self._values!r} must be an object of feature: number")
        if vals.keys() <= self._colset and set(map(type, vals.values())) <= _NUMERIC:
            return t, [vals.get(f) for f in self.features]  # the common case: range checked per batch in decode
        row = [math.nan] * len(self.features)
        seen = 0
        for name, v in vals.items():
            col = self._col.get(name)
            if col is None:
                raise _Bad("unknown_feature", f"feature {str(name)[:40]!r} is not one of the model's features")
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _Bad("non_numeric_value", f"feature {name!r} must be a number or null, got {v!r:.40}")
            fv = float(v)
            if not math.isfinite(fv) or abs(fv) > 3.0e38:
                raise _Bad("non_numeric_value", f"feature {name!r} is not a finite float32")
            row[col] = fv
            seen += 1
        if not seen:
            raise _Bad("no_values", "reading carries no feature value")
        return t, row
