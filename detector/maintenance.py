"""Maintenance windows: periods in which the matching streams raise no alerts and teach the thresholds nothing."""

from __future__ import annotations

import numpy as np

from detector.config import MaintenanceWindow
from detector.labels import Labeler, StreamMatch
from detector.rows import grown, needed

__all__ = ["MaintenanceSchedule"]

_DAY = 86400.0


class MaintenanceSchedule:
    """Which windows fall in a maintenance period of their stream (event time, UTC).

    A window selects its streams by a glob on the id and, when it gives `labels`, by those labels too;
    membership is resolved once per stream, when it first appears (a reload builds a new schedule).

    >>> from detector.config import parse_config
    >>> cfg = parse_config({"alerts": {"maintenance": [{"streams": "pump-*", "daily": "23:00-01:00"}]}})
    >>> s = MaintenanceSchedule(cfg.alerts.maintenance, ["pump-1", "fan-1"])
    >>> s.active(np.array([0, 0, 1]), np.array([23.5, 12.0, 23.5]) * 3600).tolist()
    [True, False, False]
    """

    def __init__(self, windows: list[MaintenanceWindow], names: list[str], labels: Labeler | None = None) -> None:
        self.windows = windows
        self.selectors = [StreamMatch(w.streams, dict(w.labels)) for w in windows]
        self.names = names  # the engine's stream ids by row (grows as streams appear)
        self.labels = labels or Labeler()
        self.member = np.zeros((0, len(windows)), bool)
        self.known = np.zeros(0, bool)  # per row: its memberships are computed (for the stream it holds now)

    def _members(self, rows: np.ndarray) -> np.ndarray:
        need = needed(rows, len(self.member))
        if need:
            self.member, self.known = grown(self.member, need, False), grown(self.known, need, False)
        todo = np.unique(rows[~self.known[rows]]) if len(rows) else rows
        if len(todo):
            named = [(self.names[r], self.labels(self.names[r])) for r in todo.tolist()]
            self.member[todo] = np.array([[m.matches(name, lab) for m in self.selectors] for name, lab in named],
                                         bool).reshape(-1, len(self.windows))
            self.known[todo] = True
        return self.member[rows]

    def forget_rows(self, rows: np.ndarray) -> None:
        """These rows' streams are gone: their memberships are computed again for the next stream a row holds."""
        self.known[rows[rows < len(self.known)]] = False

    def active(self, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """(K,) True where the window's stream is in maintenance at the window's event time `ts`."""
        out = np.zeros(len(rows), bool)
        if not self.windows or not len(rows):
            return out
        member = self._members(rows)
        for j, w in enumerate(self.windows):
            if w.daily is not None:
                a, b = (int(p[:2]) * 3600 + int(p[3:]) * 60 for p in w.daily.split("-"))
                tod = np.mod(ts, _DAY)
                inside = (tod >= a) & (tod < b) if a <= b else (tod >= a) | (tod < b)
            else:
                inside = (ts >= w.start.timestamp()) & (ts < w.end.timestamp())  # type: ignore[union-attr]
            out |= member[:, j] & inside
        return out
