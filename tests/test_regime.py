"""Regime changes: the Page-Hinkley test per stream fires once on a persistent rise, never on noise."""

from __future__ import annotations

import numpy as np

from detector.regime import RegimeDetector


def test_noise_never_fires_and_a_persistent_rise_fires_once_per_stream() -> None:
    rng = np.random.default_rng(0)
    quiet = np.exp(rng.normal(0.0, 0.5, 3000))  # log scores: mean 0, sd 0.5
    shifted = quiet.copy()
    shifted[1500:] *= np.exp(2.0)  # the log level rises by 2 for good
    d = RegimeDetector(delta=0.5, threshold=30.0, min_windows=30)
    rows = np.repeat([0, 1], 3000)
    hits = d.update(rows, np.r_[quiet, shifted])
    assert not hits[:3000].any(), "noise alone is no regime change"
    where = np.flatnonzero(hits[3000:])
    assert len(where) == 1 and 1500 <= where[0] < 1600, where
