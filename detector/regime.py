"""Regime changes: a persistent rise of a stream's score level, reported once instead of as a stream of alerts.

A Page-Hinkley test per stream on the log window score, vectorised over streams (river's PageHinkley runs one
Python object per stream and value, which does not keep up with a fleet scored in batches): with m the mean
of the stream's log scores since the test (re)started, it accumulates U = sum(x - m - delta) and declares a
change when U - min(U) exceeds `threshold`. The test then restarts. The event only reports: with the
`rolling` threshold policy the stream's levels settle on the new level by themselves (its median follows
once most of its history lies in the new regime) and the open alert clears; with fixed levels it stays open.
"""

from __future__ import annotations

import numpy as np

from detector.rows import RowState, grown, needed

__all__ = ["RegimeDetector"]


class RegimeDetector(RowState):
    """Page-Hinkley tests on the log window scores of every stream, one row per stream.

    >>> d = RegimeDetector(delta=0.1, threshold=5.0, min_windows=10)
    >>> rows = np.zeros(80, np.int64)
    >>> scores = np.r_[np.full(40, 1.0), np.full(40, 20.0)]  # the level jumps twentyfold at window 40
    >>> np.flatnonzero(d.update(rows, scores)).tolist()
    [41]
    """

    def __init__(self, delta: float = 0.5, threshold: float = 30.0, min_windows: int = 30) -> None:
        self.delta, self.threshold, self.min_windows = delta, threshold, min_windows
        self.n = np.zeros(0, np.int64)
        self.mean = np.zeros(0)
        self.cum = np.zeros(0)
        self.low = np.zeros(0)

    def row_fields(self) -> dict[str, object]:
        """Each stream's test: windows seen, mean, cumulative sum and its minimum."""
        return {"n": 0, "mean": 0.0, "cum": 0.0, "low": 0.0}

    def _ensure(self, rows: np.ndarray) -> None:
        cap = needed(rows, len(self.n))
        if cap:
            self.n, self.mean, self.cum, self.low = (grown(a, cap) for a in (self.n, self.mean, self.cum, self.low))

    def restart(self, rows: np.ndarray) -> None:
        """Start these streams' tests afresh."""
        self._ensure(rows)
        self.n[rows] = 0
        self.mean[rows] = self.cum[rows] = self.low[rows] = 0.0

    def update(self, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Feed windows (ordered by row, then time); True where a regime change is declared."""
        out = np.zeros(len(rows), bool)
        if not len(rows):
            return out
        self._ensure(rows)
        x_all = np.log(np.maximum(scores, 1e-9))
        first = np.ones(len(rows), bool)
        first[1:] = rows[1:] != rows[:-1]
        starts = np.flatnonzero(first)
        rank = np.arange(len(rows)) - starts[np.cumsum(first) - 1]
        for step in range(int(rank.max()) + 1):
            w = np.flatnonzero(rank == step)
            r, x = rows[w], x_all[w]
            self.n[r] += 1
            self.mean[r] += (x - self.mean[r]) / self.n[r]
            self.cum[r] += x - self.mean[r] - self.delta
            self.low[r] = np.minimum(self.low[r], self.cum[r])
            hit = (self.n[r] >= self.min_windows) & (self.cum[r] - self.low[r] > self.threshold)
            if hit.any():
                out[w[hit]] = True
                self.restart(r[hit])
        return out
