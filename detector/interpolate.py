"""The `interpolate` missing-value policy: a reading whose value is missing waits for the next value, then is filled.

Online and causal: a reading of a stream in which a feature with the `interpolate` policy is missing is held
back, with every later reading of that stream (order is kept), until a later reading brings that feature's
next value. The gap is then filled linearly in event time between the last value before it and that next
value, and the held readings are released, in order, ahead of the reading that completed the gap. A stream
that has never had a value of the feature has nothing to interpolate from: its readings are released with the
value missing (the engine holds it, masked, as under `hold`).

The delay is bounded: when a stream would hold more than `max_readings` readings, they are all released at
once with the value still missing, so the engine holds the last value (the `hold` policy) for that gap. Held
readings are per-stream state, rows of fixed-size arrays (so checkpoints carry them and a reload keeps them).
A released reading names, as its source, the record of the current batch that released it (the first of its
stream in the batch), so alerts always point at an offset that exists in the batch in hand.

Nothing here loops per reading or per stream: the held readings of the streams in the batch are gathered, put
in time order with the new ones, and the cut between what is released and what waits is found per stream with
cumulative maxima and minima.
"""

from __future__ import annotations

import numpy as np

from detector.decode import Readings
from detector.rows import RowState, grown, step

__all__ = ["Interpolator", "build_interpolator"]


class Interpolator(RowState):
    """Holds readings back per stream until their missing `interpolate` features can be filled.

    >>> it = Interpolator(np.array([True, False]), max_readings=5)
    >>> def batch(ts, vals):
    ...     return Readings(np.array(["s"] * len(ts), object), np.array(ts, float), np.array(vals, np.float32),
    ...                     np.arange(len(ts)))
    >>> out, rows = it.release(batch([0, 1, 2], [[1, 0], [np.nan, 1], [np.nan, 2]]), np.zeros(3, np.int64))
    >>> out.ts.tolist(), int(it.n[0])  # the first is released, two wait for the next value of feature 0
    ([0.0], 2)
    >>> out, rows = it.release(batch([3], [[4, 3]]), np.zeros(1, np.int64))
    >>> out.ts.tolist(), out.values[:, 0].tolist(), out.source.tolist()
    ([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [0, 0, 0])
    """

    def __init__(self, interpolate: np.ndarray, max_readings: int = 10, width: int | None = None) -> None:
        self.interp = np.asarray(interpolate, bool)  # (F,) features whose missing values are interpolated
        F = len(self.interp)
        self.max_readings = max_readings
        self.width = max(width or 0, max_readings, 1)  # slots per stream (at least max_readings)
        self.n = np.zeros(0, np.int64)  # readings held per stream
        self.held_ts = np.zeros((0, self.width))
        self.held_v = np.zeros((0, self.width, F), np.float32)
        self.anchor_ts = np.zeros((0, F))  # per stream and feature: event time of the last released value
        self.anchor_v = np.zeros((0, F), np.float32)

    def row_fields(self) -> dict[str, object]:
        """Each stream's held readings and the last released value of each feature (the left end of a gap)."""
        return {"n": 0, "held_ts": np.nan, "held_v": np.nan, "anchor_ts": np.nan, "anchor_v": np.nan}

    def _ensure(self, capacity: int) -> None:
        if capacity <= len(self.n):
            return
        capacity = max(capacity, step(len(self.n)))  # a quarter more at least: a restore adds rows chunk by chunk
        for name, fill in self.row_fields().items():
            setattr(self, name, grown(getattr(self, name), capacity, fill))

    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set these streams' state (None: fresh); held readings fit whatever bound the checkpoint was made with."""
        if len(rows):
            self._ensure(int(rows.max()) + 1)
        if state is not None and getattr(state.get("held_ts"), "ndim", 0) == 2:
            w = state["held_ts"].shape[1]
            if w > self.width:  # checkpointed under a larger bound: make room rather than drop readings
                self._widen(w)
            elif w < self.width and getattr(state.get("held_v"), "ndim", 0) == 3:
                state = {**state, "held_ts": _pad(state["held_ts"], self.width),
                         "held_v": _pad(state["held_v"], self.width)}
        return super().import_rows(rows, state)

    def _widen(self, width: int) -> None:
        self.held_ts = _pad(self.held_ts, width)
        self.held_v = _pad(self.held_v, width)
        self.width = width

    def adopt(self, other: Interpolator) -> None:
        """Take over another interpolator's held readings and anchors (after a config reload)."""
        cap, w = len(other.n), min(other.width, self.width)
        self._ensure(cap)
        self.n[:cap] = other.n
        self.held_ts[:cap, :w], self.held_v[:cap, :w] = other.held_ts[:, :w], other.held_v[:, :w]
        self.anchor_ts[:cap], self.anchor_v[:cap] = other.anchor_ts, other.anchor_v

    def holding(self) -> int:
        """How many readings are held, over every stream."""
        return int(self.n.sum())

    def newest(self, rows: np.ndarray) -> np.ndarray:
        """(N,) event time of the newest held reading of each row's stream (-inf where none is held)."""
        out = np.full(len(rows), -np.inf)
        inside = rows < len(self.n)
        r = rows[inside]
        n = self.n[r]
        out[inside] = np.where(n > 0, self.held_ts[r, np.maximum(n - 1, 0)], -np.inf)
        return out

    def release(self, readings: Readings, rows: np.ndarray) -> tuple[Readings, np.ndarray]:
        """The readings ready to go on (held ones first, gaps filled) and their rows; hold back the rest.

        Every reading must come after its stream's held ones in event time (the pipeline drops late ones).
        """
        N, F = readings.values.shape
        if N == 0:
            return readings, rows
        self._ensure(int(rows.max()) + 1)
        # the held readings of the streams in this batch join the queue, ahead of the new ones
        present_rows = np.unique(rows)
        hr = present_rows[self.n[present_rows] > 0]
        counts = self.n[hr]
        h_row = np.repeat(hr, counts)
        h_slot = np.arange(len(h_row)) - np.repeat(np.cumsum(counts) - counts, counts)
        q_row = np.concatenate([h_row, rows])
        q_ts = np.concatenate([self.held_ts[h_row, h_slot], readings.ts])
        q_v = np.concatenate([self.held_v[h_row, h_slot], readings.values.astype(np.float32)])
        q_new = np.r_[np.full(len(h_row), -1), np.arange(N)]  # index in the batch, -1 for a held reading
        order = np.lexsort((q_ts, q_row))
        q_row, q_ts, q_v, q_new = q_row[order], q_ts[order], q_v[order], q_new[order]
        Q = len(q_row)
        idx = np.arange(Q)
        first = np.ones(Q, bool)
        first[1:] = q_row[1:] != q_row[:-1]
        g_start = np.maximum.accumulate(np.where(first, idx, 0))
        last = np.ones(Q, bool)
        last[:-1] = first[1:]
        g_end = np.minimum.accumulate(np.where(last, idx, Q)[::-1])[::-1]

        present = ~np.isnan(q_v)
        nxt = np.minimum.accumulate(np.where(present, idx[:, None], Q)[::-1], axis=0)[::-1]
        has_next = nxt <= g_end[:, None]
        prv = np.maximum.accumulate(np.where(present, idx[:, None], -1), axis=0)
        has_prev = prv >= g_start[:, None]
        # a reading waits while an interpolated feature is missing in it and no later reading brings a value
        waits = (~present & ~has_next & self.interp).any(axis=1)
        cut = np.minimum.reduceat(np.where(waits, idx, g_end + 1), np.flatnonzero(first))  # per stream
        g = np.cumsum(first) - 1
        over = (g_end[first] + 1 - cut) > self.max_readings  # the bound: release everything, value held
        cut = np.where(over, g_end[first] + 1, cut)
        out = idx < cut[g]

        # fill the gaps of released readings linearly in event time, from the last value (in the queue or
        # the anchor of the stream) to the next one
        r = q_row
        t0 = np.where(has_prev, q_ts[np.maximum(prv, 0)], self.anchor_ts[r])
        v0 = np.where(has_prev, q_v[np.maximum(prv, 0), np.arange(F)], self.anchor_v[r])
        t1 = q_ts[np.minimum(nxt, Q - 1)]
        v1 = q_v[np.minimum(nxt, Q - 1), np.arange(F)]
        fill = out[:, None] & ~present & has_next & self.interp & ~np.isnan(v0)
        if fill.any():
            frac = (q_ts[:, None] - t0) / np.where(t1 > t0, t1 - t0, 1.0)
            q_v = np.where(fill, v0 + (v1 - v0) * frac, q_v).astype(np.float32)

        # each stream's last released value of each feature is the left end of its next gap
        ends = g_end[first]
        rel_prv = np.maximum.accumulate(np.where(present & out[:, None], idx[:, None], -1), axis=0)[ends]
        got = rel_prv >= g_start[first][:, None]
        ur = q_row[first]
        self.anchor_ts[ur] = np.where(got, q_ts[np.maximum(rel_prv, 0)], self.anchor_ts[ur])
        self.anchor_v[ur] = np.where(got, q_v[np.maximum(rel_prv, 0), np.arange(F)], self.anchor_v[ur])

        # what waits goes back into the rows, in order
        wait = ~out
        self.n[ur] = 0
        w_row = q_row[wait]
        w_slot = idx[wait] - cut[g[wait]]
        self.held_ts[w_row, w_slot] = q_ts[wait]
        self.held_v[w_row, w_slot] = q_v[wait]
        np.add.at(self.n, w_row, 1)

        # a released reading names the first record of its stream in this batch as its source
        first_new = np.full(int(rows.max()) + 1, N, np.int64)
        np.minimum.at(first_new, rows, np.arange(N))
        src_idx = np.where(q_new >= 0, q_new, first_new[q_row])[out]
        released = Readings(readings.streams[src_idx], q_ts[out], q_v[out], readings.source[src_idx])
        return released, q_row[out]


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    """`a` with its second axis (the held slots) extended to `width`, new slots NaN."""
    out = np.full((a.shape[0], width, *a.shape[2:]), np.nan, a.dtype)
    out[:, : a.shape[1]] = a
    return out


def build_interpolator(features: list[str], missing: dict[str, str], max_readings: int,
                       old: Interpolator | None = None) -> Interpolator | None:
    """The interpolator for `sensors.missing` (None when no feature interpolates and nothing is held).

    With `old` (a reload), its held readings and anchors carry over; when the new configuration interpolates
    nothing but `old` still holds readings, an interpolator that releases them at their stream's next reading
    is kept.
    """
    mask = np.array([missing.get(f) == "interpolate" for f in features], bool)
    if not mask.any() and (old is None or not old.holding()):
        return None
    new = Interpolator(mask, max_readings, width=None if old is None else old.width)
    if old is not None:
        new.adopt(old)
    return new
