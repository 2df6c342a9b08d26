"""The data-quality gate before the model: a stuck sensor or an impossible value is a sensor fault.

A sensor that repeats exactly the same value for `flatline_readings` readings in a row is stuck, a value
outside its configured [low, high] limits is out of range, and a missing value of a feature whose missing
policy is `anomalous` is missing (policy `zero` reads a missing value as 0; `hold`, the default, leaves it
to the engine, which holds the last present value; `interpolate` is done after the gate, by
detector.interpolate). Either way the value is not evidence about the
machine: it is removed (the engine then treats it as missing: held at the last good value and left out of
the score, so it neither raises a machine alert nor feeds the threshold statistics), and the stream gets a
`sensor_fault` episode per feature and reason, raised when the condition starts and cleared when it ends.
State (last value, run length, open episodes) is kept per stream row, as arrays, like the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.errors import ModelError
from detector.rows import RowState, grown

__all__ = ["SensorGate", "SensorEvents", "SilenceWatch", "OrderWatch", "REASONS"]

REASONS = ("flatline", "out_of_range", "missing")


@dataclass(slots=True)
class SensorEvents:
    """Sensor-fault episodes that opened or closed in a batch (E events), in time order per stream."""

    rows: np.ndarray  # (E,) int64 stream rows
    feature: np.ndarray  # (E,) int64 feature index
    reason: np.ndarray  # (E,) object: flatline | out_of_range
    state: np.ndarray  # (E,) object: raised | cleared
    reading: np.ndarray  # (E,) int64 index into the batch's readings of the reading that opened or closed it
    ts: np.ndarray  # (E,) float64 event time of that reading
    raised_at: np.ndarray  # (E,) float64 event time at which the episode opened

    def __len__(self) -> int:
        return len(self.rows)


class SensorGate(RowState):
    """Finds stuck and out-of-range values per stream and feature, removes them, reports episodes."""

    def __init__(self, features: list[str], flatline_readings: int = 0,
                 limits: dict[str, tuple[float, float]] | None = None, missing: dict[str, str] | None = None) -> None:
        self.features = list(features)
        F = len(features)
        self.flatline = flatline_readings
        self.low = np.full(F, -np.inf)
        self.high = np.full(F, np.inf)
        for name, (lo, hi) in (limits or {}).items():
            if name not in self.features:
                raise ModelError(f"sensors.limits: {name!r} is not one of the model's features "
                                 f"({', '.join(self.features)})")
            i = self.features.index(name)
            self.low[i], self.high[i] = lo, hi
        self.zero = np.zeros(F, bool)  # a missing value means 0 (e.g. a meter that reports nothing when idle)
        self.absent_is_fault = np.zeros(F, bool)
        for name, policy in (missing or {}).items():
            if name not in self.features:
                raise ModelError(f"sensors.missing: {name!r} is not one of the model's features "
                                 f"({', '.join(self.features)})")
            i = self.features.index(name)
            self.zero[i], self.absent_is_fault[i] = policy == "zero", policy == "anomalous"
        self.enabled = bool(flatline_readings) or bool(limits) or bool(self.zero.any() or self.absent_is_fault.any())
        self.cap = 0
        self.last = np.zeros((0, F))
        self.run = np.zeros((0, F), np.int64)
        self.open = np.zeros((0, F, len(REASONS)), bool)
        self.opened_at = np.zeros((0, F, len(REASONS)))

    def row_fields(self) -> dict[str, object]:
        """Each stream's last values, repeat runs and open episodes."""
        return {"last": np.nan, "run": 0, "open": False, "opened_at": 0.0}

    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set these streams' state (None: fresh)."""
        if len(rows):
            self._ensure(int(rows.max()) + 1)
        return super().import_rows(rows, state)

    def _ensure(self, capacity: int) -> None:
        if capacity <= self.cap:
            return
        self.last = grown(self.last, capacity, np.nan)
        self.run = grown(self.run, capacity)
        self.open = grown(self.open, capacity, False)
        self.opened_at = grown(self.opened_at, capacity)
        self.cap = capacity

    def adopt(self, other: SensorGate) -> None:
        """Take over another gate's per-stream state (after a config reload): open episodes stay open."""
        self._ensure(other.cap)
        n = other.cap
        self.last[:n], self.run[:n] = other.last[:n], other.run[:n]
        self.open[:n], self.opened_at[:n] = other.open[:n], other.opened_at[:n]

    def check(self, rows: np.ndarray, ts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, SensorEvents]:
        """The values (N, F) with faulty ones set to NaN, and the episodes that opened or closed."""
        N, F = values.shape
        if not self.enabled or N == 0:
            return values, _no_events()
        self._ensure(int(rows.max()) + 1)
        order = np.lexsort((ts, rows))
        r, v = rows[order], values[order].astype(np.float64)
        if self.zero.any():
            v[:, self.zero] = np.nan_to_num(v[:, self.zero], nan=0.0)
        idx = np.arange(N)
        first = np.ones(N, bool)
        first[1:] = r[1:] != r[:-1]
        start = np.maximum.accumulate(np.where(first, idx, 0))  # index of each reading's group start

        prev = np.empty_like(v)
        prev[1:] = v[:-1]
        prev[first] = self.last[r[first]]
        same = v == prev  # NaN never equals: a gap breaks a run
        brk = ~same
        last_brk = np.maximum.accumulate(np.where(brk, idx[:, None], -1), axis=0)
        since_start = last_brk >= start[:, None]
        run = np.where(since_start, idx[:, None] - last_brk, self.run[r] + idx[:, None] - start[:, None] + 1)

        faults = np.zeros((N, F, len(REASONS)), bool)
        if self.flatline:
            faults[:, :, 0] = run + 1 >= self.flatline
        present = ~np.isnan(v)
        faults[:, :, 1] = present & ((v < self.low) | (v > self.high))
        faults[:, :, 2] = ~present & self.absent_is_fault

        ends = np.r_[np.flatnonzero(first)[1:] - 1, N - 1]
        self.run[r[ends]] = run[ends]
        last = np.where(present, v, np.nan)
        # the last present value of each stream and feature in the batch is what the next batch compares with
        pos = np.maximum.accumulate(np.where(present, idx[:, None], -1), axis=0)
        have = pos[ends] >= start[ends][:, None]
        keep = np.where(have, last[np.maximum(pos[ends], 0), np.arange(F)], self.last[r[ends]])
        self.last[r[ends]] = keep

        events = self._episodes(r, ts[order], order, first, faults)
        cleaned = np.empty_like(values)
        cleaned[order] = np.where(faults.any(axis=2), np.nan, v)
        return cleaned, events

    def _episodes(self, r: np.ndarray, t: np.ndarray, order: np.ndarray, first: np.ndarray,
                  faults: np.ndarray) -> SensorEvents:
        """Turn per-reading fault flags into raise and clear transitions against each stream's open episodes."""
        before = np.empty_like(faults)
        before[1:] = faults[:-1]
        before[first] = self.open[r[first]]
        changed = faults != before
        n, f, k = np.nonzero(changed)
        if len(n) == 0:
            return _no_events()
        raised = faults[n, f, k]
        raised_at = np.empty(len(n))
        # walk the transitions in time order per (stream, feature, reason) to carry each episode's start time
        for j in np.lexsort((n, k, f, r[n])).tolist():
            row, feat, reason = int(r[n[j]]), int(f[j]), int(k[j])
            if raised[j]:
                self.opened_at[row, feat, reason] = t[n[j]]
            raised_at[j] = self.opened_at[row, feat, reason]
            self.open[row, feat, reason] = bool(raised[j])
        order_ev = np.lexsort((n,))
        return SensorEvents(
            rows=r[n][order_ev], feature=f[order_ev].astype(np.int64),
            reason=np.array(REASONS, dtype=object)[k][order_ev],
            state=np.where(raised, "raised", "cleared").astype(object)[order_ev],
            reading=order[n][order_ev], ts=t[n][order_ev], raised_at=raised_at[order_ev],
        )


def _no_events() -> SensorEvents:
    e = np.empty(0)
    return SensorEvents(e.astype(np.int64), e.astype(np.int64), e.astype(object), e.astype(object),
                        e.astype(np.int64), e, e)


class SilenceWatch(RowState):
    """Streams that stopped sending: silent once their newest reading is `after_s` older than the fleet's.

    Time is event time: the newest reading of any stream is the clock (a watermark), so a replay of old data
    behaves as it did live, and one stream falling quiet while the others go on is what counts.

    >>> w = SilenceWatch(600.0)
    >>> w.update(np.array([1000.0, 1000.0]))
    (array([], dtype=int64), array([], dtype=int64))
    >>> w.update(np.array([1000.0, 1700.0]))  # stream 0 is 700 s behind
    (array([0]), array([], dtype=int64))
    >>> w.update(np.array([1800.0, 1800.0]))  # and back
    (array([], dtype=int64), array([0]))
    """

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.silent = np.zeros(0, bool)

    def row_fields(self) -> dict[str, object]:
        """Whether each stream is silent."""
        return {"silent": False}

    def update(self, last_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows that fell silent and rows that came back, given every stream's newest event time."""
        self.silent = grown(self.silent, len(last_ts), False)
        seen = np.isfinite(last_ts)
        if not seen.any():
            return np.empty(0, np.int64), np.empty(0, np.int64)
        now = np.where(seen, last_ts < last_ts[seen].max() - self.after_s, False)
        was = self.silent[: len(last_ts)]
        went, back = np.flatnonzero(now & ~was), np.flatnonzero(~now & was)
        self.silent[: len(last_ts)] = now
        return went, back


class OrderWatch(RowState):
    """Streams whose readings come at or before their newest event time: one `sensor_fault` episode each.

    Such readings are dropped before the model (and dead-lettered) wherever they come; this adds what an
    operator needs to see that a stream's clock or its producer misbehaves. The first late or repeated
    reading of a stream raises an episode (reason `late` or `duplicate_timestamp`, at that reading's event
    time); it clears at the next batch in which the stream sends readings and all of them are in order.

    >>> w = OrderWatch()
    >>> rows, ts = np.array([0, 0, 1]), np.array([5.0, 3.0, 9.0])
    >>> w.update(rows, ts, np.ones(3, bool), np.array([1]), np.array(["late"], object))
    (array([1]), array([], dtype=int64), array([], dtype=float64), array([], dtype=int8))
    >>> w.update(np.array([0]), np.array([6.0]), np.ones(1, bool), np.array([], np.int64), np.array([], object))
    (array([], dtype=int64), array([0]), array([3.]), array([0], dtype=int8))
    """

    REASONS = ("late", "duplicate_timestamp")

    def __init__(self) -> None:
        self.since = np.zeros(0)  # per row: event time of the reading that opened the episode, else NaN
        self.reason = np.zeros(0, np.int8)  # per row: index into REASONS

    def row_fields(self) -> dict[str, object]:
        """When each stream's out-of-order episode began (NaN: none open), and why."""
        return {"since": np.nan, "reason": 0}

    def update(self, rows: np.ndarray, ts: np.ndarray, live: np.ndarray, dropped: np.ndarray,
               why: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Readings that open an episode, and the rows that clear (with when and why theirs began).

        `rows`, `ts`: every reading of the batch; `live`: those considered (not replayed); `dropped`: indices of
        the live readings dropped as late or repeated, `why` their reasons.
        """
        cap = int(rows.max()) + 1 if len(rows) else 0
        if cap > len(self.since):
            self.since = grown(self.since, cap, np.nan)
            self.reason = grown(self.reason, cap, 0)
        first_bad = np.empty(0, np.int64)
        if len(dropped):
            order = np.lexsort((dropped, rows[dropped]))
            d = dropped[order]
            head = np.ones(len(d), bool)
            head[1:] = rows[d][1:] != rows[d][:-1]
            first_bad = d[head]  # each row's first dropped reading in the batch
            code = (why[order][head] == "duplicate_timestamp").astype(np.int8)
            new = np.isnan(self.since[rows[first_bad]])
            self.since[rows[first_bad[new]]] = ts[first_bad[new]]
            self.reason[rows[first_bad[new]]] = code[new]
            first_bad = first_bad[new]
        seen = rows[live]
        open_ = np.unique(seen[~np.isnan(self.since[seen])])  # usually empty: no unique over the whole batch
        clear = np.setdiff1d(open_, rows[dropped])
        since, reason = self.since[clear].copy(), self.reason[clear].copy()
        self.since[clear] = np.nan
        return first_bad, clear, since, reason

