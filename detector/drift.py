"""Per-stream drift watch: the share of each stream's recent windows that score at or above the model's calibrated
0.99 quantile.

While a stream looks like the model's calibration data about 1 % of its windows reach that quantile. The share is
an exponentially weighted mean over the stream's windows (half-life DRIFT_HALFLIFE windows); a stream is
*drifting* when, after at least DRIFT_MIN_WINDOWS windows, its share is DRIFT_SHARE or more: the model no longer
describes it (a repaired machine, a replaced sensor, a new season) and it is a candidate for retraining. It is
kept in memory only (not checkpointed): after a restart or a rebalance each stream's share starts again.

>>> w = DriftWatch()
>>> rows = np.repeat(np.arange(2), 200)
>>> above = np.r_[np.zeros(200, bool), np.arange(200) % 5 == 0]  # stream 1: one window in five
>>> w.update(rows, above).tolist(), w.drifting(np.arange(2)).tolist()
([1], [False, True])
>>> round(float(w.share[1]), 3), w.update(rows[200:], above[200:]).tolist()
(0.099, [])
"""

from __future__ import annotations

import numpy as np

from detector.rows import grown

__all__ = ["DriftWatch", "DRIFT_HALFLIFE", "DRIFT_MIN_WINDOWS", "DRIFT_SHARE"]

DRIFT_HALFLIFE = 200
"""Windows over which a stream's share of windows at or above the calibrated 0.99 quantile halves its weight."""
DRIFT_MIN_WINDOWS = 100
"""Windows a stream must have had before it can count as drifting."""
DRIFT_SHARE = 0.05
"""The share (five times the 1 % expected) from which a stream counts as drifting."""


class DriftWatch:
    """Per row (stream): the weighted share of its windows at or above the calibrated 0.99 quantile."""

    def __init__(self) -> None:
        self.share = np.zeros(0)
        self.windows = np.zeros(0, np.int64)
        self._decay = 0.5 ** (1.0 / DRIFT_HALFLIFE)

    def update(self, rows: np.ndarray, above: np.ndarray) -> np.ndarray:
        """Take a batch's windows (rows grouped, in time order within each) and whether each reached the
        quantile; return the rows that started drifting with it."""
        if not len(rows):
            return np.empty(0, np.int64)
        cap = int(rows.max()) + 1
        self.share, self.windows = grown(self.share, cap), grown(self.windows, cap)
        u, start, counts = np.unique(rows, return_index=True, return_counts=True)
        from_end = np.repeat(start + counts, counts) - 1 - np.arange(len(rows))
        weight = (1.0 - self._decay) * self._decay ** from_end  # the newest window weighs the most
        was = self.drifting(u)
        self.share[u] = self.share[u] * self._decay**counts + np.add.reduceat(weight * above, start)
        self.windows[u] += counts
        return u[self.drifting(u) & ~was]

    def drifting(self, rows: np.ndarray) -> np.ndarray:
        """Whether each of these rows counts as drifting now."""
        rows = np.asarray(rows, np.int64)
        inside = rows < len(self.share)
        out = np.zeros(len(rows), bool)
        r = rows[inside]
        out[inside] = (self.windows[r] >= DRIFT_MIN_WINDOWS) & (self.share[r] >= DRIFT_SHARE)
        return out

    def forget_rows(self, rows: np.ndarray) -> None:
        """These rows' streams were forgotten: their rows start again."""
        rows = np.asarray(rows, np.int64)
        rows = rows[rows < len(self.share)]
        self.share[rows], self.windows[rows] = 0.0, 0
