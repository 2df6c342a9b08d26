"""The data-quality gate before the model: a stuck sensor or an impossible value is a sensor fault.

A sensor that repeats exactly the same value for `flatline_readings` readings in a row is stuck, unless the
model's training data held it at one value that long: with `longest`, the longest such run of each feature in
the training rows (see `longest_runs`), a feature is stuck from its `max(flatline_readings, 2 * longest + 1)`-th
equal value on, and a feature some training stream held at one value throughout (a setpoint, a valve held shut)
is never stuck. A value outside its configured [low, high] limits is out of range, and a missing value of a
feature whose missing policy is `anomalous` is missing (policy `zero` reads a missing value as 0; `hold`, the
default, leaves it to the engine, which holds the last present value; `interpolate` is done after the gate, by
detector.interpolate). Either way the value is not evidence about the
machine: it is removed (the engine then treats it as missing: held at the last good value and left out of
the score, so it neither raises a machine alert nor feeds the threshold statistics), and the stream gets a
`sensor_fault` episode per feature and reason, raised when the condition starts and cleared when it ends.
A missing value (NaN or an absent feature) decides nothing about a stuck or out-of-range sensor: a run counts
present values only, a gap neither ends it nor clears its episode, and only the next present value can (a
run that resumes after the gap at the same value goes on). One fault is one episode.
State (last value, run length, open episodes) is kept per stream row, as arrays, like the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.errors import ModelError
from detector.rows import RowState, grown, step

__all__ = ["SensorGate", "SensorEvents", "SilenceWatch", "OrderWatch", "REASONS", "longest_runs"]

REASONS = ("flatline", "out_of_range", "missing")


@dataclass(slots=True)
class SensorEvents:
    """Sensor-fault episodes that opened or closed in a batch (E events), in time order per stream."""

    rows: np.ndarray  # (E,) int64 stream rows
    feature: np.ndarray  # (E,) int64 feature index
    reason: np.ndarray  # (E,) object: one of REASONS
    state: np.ndarray  # (E,) object: raised | cleared
    reading: np.ndarray  # (E,) int64 index into the batch's readings of the reading that opened or closed it
    ts: np.ndarray  # (E,) float64 event time of that reading
    raised_at: np.ndarray  # (E,) float64 event time at which the episode opened

    def __len__(self) -> int:
        return len(self.rows)


class SensorGate(RowState):
    """Finds stuck and out-of-range values per stream and feature, removes them, reports episodes.

    `longest`: per feature, the longest run of equal values in the model's training rows (`longest_runs`;
    -1: held at one value throughout, never stuck); None or empty (a model trained before it was recorded):
    `flatline_readings` alone decides.
    """

    def __init__(self, features: list[str], flatline_readings: int = 0,
                 limits: dict[str, tuple[float, float]] | None = None, missing: dict[str, str] | None = None,
                 longest: list[int] | None = None) -> None:
        self.features = list(features)
        F = len(features)
        self.flatline = flatline_readings
        self.flat_at = flatline_at(flatline_readings, longest, F)  # per feature: equal values that make it stuck
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
        capacity = max(capacity, step(self.cap))  # a quarter more at least: a restore adds rows chunk by chunk
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

        present = ~np.isnan(v)
        cols = np.arange(F)
        # each reading's newest present value at or before it in its stream (-1: none in this batch)
        pos = np.maximum.accumulate(np.where(present, idx[:, None], -1), axis=0)
        inb = pos >= start[:, None]
        before = np.empty_like(pos)  # the newest present value strictly before it
        before[1:] = pos[:-1]
        before[first] = -1
        prev = np.where(before >= start[:, None], v[np.maximum(before, 0), cols], self.last[r])
        brk = present & (v != prev)  # a new value starts a run; a gap (NaN) neither starts nor ends one
        last_brk = np.maximum.accumulate(np.where(brk, idx[:, None], -1), axis=0)
        seen = np.cumsum(present, axis=0)  # present values up to and including each reading
        seen_before = np.where(start[:, None] > 0, seen[np.maximum(start - 1, 0)], 0)
        # run: how many present values repeated the run's first one, so far
        run = np.where(last_brk >= start[:, None], seen - seen[np.maximum(last_brk, 0), cols],
                       self.run[r] + seen - seen_before)

        faults = np.zeros((N, F, len(REASONS)), bool)
        faults[:, :, 0] = present & (run + 1 >= self.flat_at)
        faults[:, :, 1] = present & ((v < self.low) | (v > self.high))
        # a missing value keeps the state of the newest present value (or of the episode open before the batch)
        for k in (0, 1):
            faults[:, :, k] = np.where(inb, faults[np.maximum(pos, 0), cols, k], self.open[r, :, k])
        faults[:, :, 2] = ~present & self.absent_is_fault

        ends = np.r_[np.flatnonzero(first)[1:] - 1, N - 1]
        self.run[r[ends]] = run[ends]
        # the last present value of each stream and feature in the batch is what the next batch compares with
        self.last[r[ends]] = np.where(inb[ends], v[np.maximum(pos[ends], 0), cols], self.last[r[ends]])

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


def flatline_at(flatline_readings: int, longest: list[int] | None, n_features: int) -> np.ndarray:
    """Per feature, how many equal values in a row make it stuck (inf: never), given the training runs.

    >>> flatline_at(10, [1, 30, -1], 3).tolist()
    [10.0, 61.0, inf]
    >>> flatline_at(0, [1, 30, -1], 3).tolist(), flatline_at(10, None, 2).tolist()
    ([inf, inf, inf], [10.0, 10.0])
    """
    if not flatline_readings:
        return np.full(n_features, np.inf)
    if not longest:
        return np.full(n_features, float(flatline_readings))
    if len(longest) != n_features:
        raise ModelError(f"the model records {len(longest)} training runs (longest_runs) for {n_features} features")
    runs = np.asarray(longest, np.float64)
    return np.where(runs < 0, np.inf, np.maximum(flatline_readings, 2 * runs + 1))


def longest_runs(series: list[np.ndarray]) -> list[int]:
    """Per feature, the longest run of equal consecutive present values in any series; -1 where one series holds
    the feature at one value in all of its (at least two) present values.

    Missing values (NaN) are skipped, as the gate does at run time: a gap does not end a run.

    >>> nan = float("nan")
    >>> longest_runs([np.array([[1.0, 5.0, 0.1], [1.0, 5.0, 0.2], [nan, 5.0, 0.2], [1.0, 5.0, 0.3], [2.0, nan, 0.4]])])
    [3, -1, 2]
    """
    if not series:
        return []
    out = np.zeros(series[0].shape[1], np.int64)
    for values in series:
        for f in range(values.shape[1]):
            x = values[:, f]
            x = x[~np.isnan(x)]
            if len(x) == 0 or out[f] < 0:
                continue
            cuts = np.flatnonzero(x[1:] != x[:-1]) + 1
            if len(cuts) == 0 and len(x) >= 2:
                out[f] = -1
                continue
            out[f] = max(out[f], int(np.diff(np.r_[0, cuts, len(x)]).max()))
    return out.tolist()


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

