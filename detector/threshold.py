"""Threshold policies: warning and critical score levels per stream, kept separate from scoring."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from detector.artifact import Manifest
from detector.config import ThresholdConfig

__all__ = ["ThresholdPolicy", "StaticThreshold", "CalibratedThreshold", "build_threshold"]


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


def build_threshold(cfg: ThresholdConfig, manifest: Manifest) -> ThresholdPolicy:
    """The policy that `thresholds.policy` names, built from its section of the config."""
    if cfg.policy == "static":
        return StaticThreshold(cfg.static.warning, cfg.static.critical)
    c = cfg.calibrated
    return CalibratedThreshold(manifest, c.warning, c.critical, c.scale)
