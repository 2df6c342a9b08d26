"""Threshold policies: the rolling policy adapts per stream and keeps short faults visible."""

from __future__ import annotations

import numpy as np

from detector.config import parse_config
from detector.threshold import RollingThreshold, StaticThreshold, build_threshold
from tests.helpers import random_artifact


def feed(t: RollingThreshold, scores: dict[int, np.ndarray], batch: int = 7) -> dict[int, np.ndarray]:
    """Run window scores of several streams through levels-then-learn, a batch at a time; return warnings."""
    n = len(next(iter(scores.values())))
    out: dict[int, list[float]] = {r: [] for r in scores}
    for a in range(0, n, batch):
        rows = np.concatenate([np.full(len(s[a:a + batch]), r, np.int64) for r, s in scores.items()])
        vals = np.concatenate([s[a:a + batch] for s in scores.values()])
        warning, _ = t.levels(rows)
        for r in scores:
            out[r].extend(warning[rows == r].tolist())
        t.learn(rows, vals, vals >= warning)
    return {r: np.array(v) for r, v in out.items()}


def test_rolling_levels_follow_each_stream_and_keep_short_faults_visible() -> None:
    rng = np.random.default_rng(0)
    quiet = 1.0 + 0.1 * rng.standard_normal(400)
    loud = 5.0 + 0.5 * rng.standard_normal(400)  # normal for this machine, far above the training data
    loud[300:320] += 10.0  # a fault of 20 windows
    t = RollingThreshold(StaticThreshold(2.0, 4.0), history=200, min_history=20, warning_k=6.0, critical_k=12.0)
    w = feed(t, {0: quiet, 1: loud})
    assert (w[0] == 2.0).all(), "the quiet stream keeps the base level: rolling never goes below it"
    assert (w[1][:20] == 2.0).all(), "before min_history windows the base level applies"
    assert (loud[100:300] < w[1][100:300]).mean() > 0.99, "the loud stream's normal no longer alerts"
    assert (loud[300:320] >= w[1][300:320]).all(), "the fault stays above the adapted level"


def test_rolling_policy_is_built_from_the_config() -> None:
    art = random_artifact()
    cfg = parse_config({"thresholds": {"policy": "rolling", "rolling": {"history": 50, "min_history": 10,
                                                                         "warning_k": 3, "critical_k": 5}}})
    t = build_threshold(cfg.thresholds, art.manifest)
    assert isinstance(t, RollingThreshold) and t.name == "rolling"
    assert (t.history, t.min_history, t.warning_k, t.critical_k) == (50, 10, 3.0, 5.0)
    w, c = t.levels(np.array([0]))
    assert w[0] == art.manifest.quantile(0.999) and c[0] == art.manifest.quantile(0.9999)
