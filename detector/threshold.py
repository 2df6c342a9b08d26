"""Threshold policies: warning and critical score levels per stream, kept separate from scoring."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from detector.artifact import Manifest
from detector.config import ThresholdConfig

__all__ = ["ThresholdPolicy", "StaticThreshold", "CalibratedThreshold", "RollingThreshold", "build_threshold"]


class ThresholdPolicy(ABC):
    """Gives each scored window its warning and critical level."""

    name: str

    @abstractmethod
    def levels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Warning and critical levels (each (K,) float64) for windows of stream rows `rows`."""

    def learn(self, rows: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> None:  # noqa: B027
        """Update from scored windows; windows already flagged are not learned from. Fixed policies ignore it."""


class StaticThreshold(ThresholdPolicy):
    """Fixed score values.

    >>> w, c = StaticThreshold(5.0, 9.0).levels(np.array([0, 3]))
    >>> w.tolist(), c.tolist()
    ([5.0, 5.0], [9.0, 9.0])
    """

    name = "static"

    def __init__(self, warning: float, critical: float) -> None:
        self.warning, self.critical = float(warning), float(critical)

    def levels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same two values for every window."""
        return np.full(len(rows), self.warning), np.full(len(rows), self.critical)


class CalibratedThreshold(StaticThreshold):
    """Quantiles of the window scores measured on held-back normal data when the model was trained."""

    name = "calibrated"

    def __init__(self, manifest: Manifest, warning_q: float, critical_q: float, scale: float = 1.0) -> None:
        super().__init__(scale * manifest.quantile(warning_q), scale * manifest.quantile(critical_q))
        self.warning_q, self.critical_q = warning_q, critical_q


class RollingThreshold(ThresholdPolicy):
    """Each stream's levels follow its own recent window scores: median + k x MAD, floored by a base policy.

    A stream whose normal operation sits above what the training data showed (another load, a warmer
    season) would otherwise alert forever. The median and the MAD (scaled to a standard deviation) of its
    last `history` window scores adapt to that; being robust, they move only when most of the history moves,
    so a fault that lasts less than half of `history` windows stays visible. Until a stream has
    `min_history` windows, and whenever the rolling level would be lower, the base policy's levels apply.

    >>> base = StaticThreshold(5.0, 9.0)
    >>> t = RollingThreshold(base, history=10, min_history=4, warning_k=3.0, critical_k=6.0)
    >>> rows = np.zeros(6, np.int64)
    >>> t.levels(rows[:1])[0].tolist()
    [5.0]
    >>> t.learn(rows, np.array([20.0, 21.0, 22.0, 20.0, 21.0, 22.0]), np.ones(6, bool))
    >>> [round(v, 2) for v in t.levels(rows[:1])[0].tolist()]
    [25.45]
    """

    name = "rolling"

    def __init__(self, base: ThresholdPolicy, history: int, min_history: int, warning_k: float,
                 critical_k: float) -> None:
        self.base = base
        self.history, self.min_history = history, min_history
        self.warning_k, self.critical_k = warning_k, critical_k
        self.buf = np.full((0, history), np.nan, np.float32)
        self.pos = np.zeros(0, np.int64)
        self.n = np.zeros(0, np.int64)

    def _ensure(self, rows: np.ndarray) -> None:
        need = int(rows.max()) + 1 if len(rows) else 0
        if need > len(self.n):
            cap = max(need, 2 * len(self.n))
            buf = np.full((cap, self.history), np.nan, np.float32)
            buf[: len(self.buf)] = self.buf
            self.buf = buf
            self.pos = np.concatenate([self.pos, np.zeros(cap - len(self.pos), np.int64)])
            self.n = np.concatenate([self.n, np.zeros(cap - len(self.n), np.int64)])

    def levels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The base levels, raised to each stream's median + k x MAD once it has enough history."""
        warning, critical = self.base.levels(rows)
        self._ensure(rows)
        ready = self.n[rows] >= self.min_history
        if ready.any():
            r = np.unique(rows[ready])
            hist = self.buf[r]
            med = np.nanmedian(hist, axis=1)
            mad = 1.4826 * np.nanmedian(np.abs(hist - med[:, None]), axis=1)
            at = np.searchsorted(r, rows[ready])
            warning = warning.copy()
            critical = critical.copy()
            warning[ready] = np.maximum(warning[ready], med[at] + self.warning_k * mad[at])
            critical[ready] = np.maximum(critical[ready], med[at] + self.critical_k * mad[at])
        return warning, critical

    def learn(self, rows: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> None:
        """Append every window's score to its stream's history (windows ordered by row, then time)."""
        if not len(rows):
            return
        self._ensure(rows)
        first = np.ones(len(rows), bool)
        first[1:] = rows[1:] != rows[:-1]
        starts = np.flatnonzero(first)
        rank = np.arange(len(rows)) - starts[np.cumsum(first) - 1]
        slot = (self.pos[rows] + rank) % self.history
        self.buf[rows, slot] = scores
        u, counts = np.unique(rows, return_counts=True)
        self.pos[u] = (self.pos[u] + counts) % self.history
        self.n[u] += counts


def build_threshold(cfg: ThresholdConfig, manifest: Manifest) -> ThresholdPolicy:
    """The policy that `thresholds.policy` names, built from its section of the config."""
    if cfg.policy == "static":
        return StaticThreshold(cfg.static.warning, cfg.static.critical)
    c = cfg.calibrated
    calibrated = CalibratedThreshold(manifest, c.warning, c.critical, c.scale)
    if cfg.policy == "rolling":
        r = cfg.rolling
        return RollingThreshold(calibrated, r.history, r.min_history, r.warning_k, r.critical_k)
    return calibrated
