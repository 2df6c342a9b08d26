"""Threshold policies: the rolling policy adapts per stream and keeps short faults visible."""

from __future__ import annotations

import numpy as np
import pytest

from detector.config import parse_config
from detector.threshold import EvtThreshold, RollingThreshold, StaticThreshold, build_threshold, fit_gpd, pot_quantile
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


def test_rolling_learns_from_flagged_windows_unless_told_not_to() -> None:
    rng = np.random.default_rng(1)
    scores = 1.0 + 0.1 * rng.standard_normal(400)
    scores[150:] += 4.0  # a rise that lasts: 250 windows, more than the history
    flagged = {}
    for learn in (True, False):
        t = RollingThreshold(StaticThreshold(2.0, 4.0), history=100, min_history=20, warning_k=6.0, critical_k=12.0,
                             learn_from_flagged=learn)
        w = feed(t, {0: scores})[0]
        flagged[learn] = scores >= w
        if not learn:
            assert t.n[0] == (~flagged[learn]).sum() == 150, "only the windows below warning are in the history"
    assert flagged[True][150:160].all() and not flagged[True][300:].any(), "by default the rise becomes normal"
    assert flagged[False][150:].all(), "without learning from flagged windows the rise stays flagged"
    assert not flagged[False][:150].any() and not flagged[True][:150].any()
    cfg = parse_config({"thresholds": {"policy": "rolling", "rolling": {"learn_from_flagged": False}}})
    assert build_threshold(cfg.thresholds, random_artifact().manifest).learn_from_flagged is False


def test_rolling_quantile_method_alerts_at_the_streams_own_quantile() -> None:
    rng = np.random.default_rng(2)
    scores = 5.0 + rng.exponential(1.0, 2000)  # a stream whose normal sits far above the base level
    cfg = parse_config({"thresholds": {"policy": "rolling", "rolling": {
        "method": "quantile", "history": 1000, "min_history": 100, "warning_quantile": 0.99,
        "critical_quantile": 0.999}}})
    t = build_threshold(cfg.thresholds, random_artifact().manifest)
    assert isinstance(t, RollingThreshold) and t.quantiles == (0.99, 0.999)
    w = feed(t, {0: scores})[0]  # levels are computed per batch of 7, before that batch is learned
    ref = [np.quantile(scores[b - 1000:b].astype(np.float32), 0.99) for b in (np.arange(1001, 2000) // 7) * 7]
    np.testing.assert_allclose(w[1001:], ref, rtol=1e-5)
    assert 0.005 < (scores[1000:] >= w[1000:]).mean() < 0.03, "about 1 % of normal windows reach warning"
    level_w, level_c = t.levels(np.array([0]))
    hist = t.buf[0]
    assert level_w[0] == pytest.approx(np.quantile(hist, 0.99))
    assert level_c[0] == pytest.approx(np.quantile(hist, 0.999))


def test_rolling_policy_is_built_from_the_config() -> None:
    art = random_artifact()
    cfg = parse_config({"thresholds": {"policy": "rolling", "rolling": {"history": 50, "min_history": 10,
                                                                         "warning_k": 3, "critical_k": 5}}})
    t = build_threshold(cfg.thresholds, art.manifest)
    assert isinstance(t, RollingThreshold) and t.name == "rolling"
    assert (t.history, t.min_history, t.warning_k, t.critical_k) == (50, 10, 3.0, 5.0)
    w, c = t.levels(np.array([0]))
    assert w[0] == art.manifest.quantile(0.999) and c[0] == art.manifest.quantile(0.9999)


def test_gpd_fit_recovers_a_known_tail() -> None:
    rng = np.random.default_rng(3)
    gamma, sigma = 0.2, 1.5
    u = rng.random(20000)
    excess = sigma / gamma * ((1 - u) ** -gamma - 1)  # inverse CDF of a generalised Pareto law
    g, s = fit_gpd(excess)
    assert abs(g - gamma) < 0.05 and abs(s - sigma) < 0.1
    # a body below t = 5 and this tail above it: 2 % of 100000 observations exceed t
    level = pot_quantile(5.0, g, s, 1e-4, 100000, 2000)
    truth = 5.0 + sigma / gamma * ((1e-4 * 100000 / 2000) ** -gamma - 1)
    assert abs(level - truth) / truth < 0.05


def test_evt_levels_start_from_calibration_and_learn_each_stream_tail() -> None:
    rng = np.random.default_rng(4)
    calibration = rng.exponential(1.0, 5000)
    t = EvtThreshold(calibration, warning_risk=1e-3, critical_risk=1e-4, level=0.98, refit_every=50)
    w0, c0 = t.levels(np.array([0, 1]))
    assert abs(w0[0] - np.log(1000)) < 0.8, "an exponential tail: the 1e-3 level is near ln(1000)"
    assert c0[0] > w0[0] and w0[0] == w0[1]
    light = 0.7 * rng.exponential(1.0, 15000)  # stream 1's normal scores have a lighter tail
    for a in range(0, 15000, 50):
        rows = np.r_[np.zeros(50, np.int64), np.ones(50, np.int64)]
        scores = np.r_[rng.exponential(1.0, 50), light[a:a + 50]]
        warning, _ = t.levels(rows)
        t.learn(rows, scores, scores >= warning)
    w, _ = t.levels(np.array([0, 1]))
    assert abs(w[0] - w0[0]) < 1.0, "stream 0 keeps the calibrated tail"
    assert w[1] < w[0] - 0.5, "stream 1 learned its lighter tail (0.7 x ln(1000) is 4.8)"


def test_flagged_windows_are_not_learned_and_dspot_follows_drift() -> None:
    rng = np.random.default_rng(5)
    t = EvtThreshold(rng.exponential(1.0, 5000), 1e-3, 1e-4, refit_every=5)
    before = t.levels(np.array([0]))[0][0]
    t.learn(np.zeros(200, np.int64), np.full(200, 100.0), np.ones(200, bool))
    assert t.levels(np.array([0]))[0][0] == before, "windows at or above warning teach nothing"
    d = EvtThreshold(rng.exponential(1.0, 5000), 1e-3, 1e-4, drift_window=20, refit_every=5)
    rows = np.zeros(20, np.int64)
    low = d.levels(rows[:1])[0][0]
    for step in range(50):
        scores = 1.0 + 0.2 * step + rng.exponential(1.0, 20)  # the normal score drifts upwards, slowly
        warning, _ = d.levels(rows)
        d.learn(rows, scores, scores >= warning)
    assert d.levels(rows[:1])[0][0] > low + 8, "DSPOT's levels ride on the recent normal mean"
    s = EvtThreshold(rng.exponential(1.0, 5000), 1e-3, 1e-4, refit_every=5)
    for step in range(50):
        scores = 1.0 + 0.2 * step + rng.exponential(1.0, 20)
        warning, _ = s.levels(rows)
        s.learn(rows, scores, scores >= warning)
    assert s.levels(rows[:1])[0][0] < low + 4, "SPOT without drift handling does not follow the drift"


def test_evt_policy_is_built_from_the_config() -> None:
    art = random_artifact()
    cfg = parse_config({"thresholds": {"policy": "evt", "evt": {"warning_risk": 0.005, "critical_risk": 0.001}}})
    t = build_threshold(cfg.thresholds, art.manifest)
    assert isinstance(t, EvtThreshold) and t.name == "evt" and t.risks == (0.005, 0.001)
    w, c = t.levels(np.array([0]))
    assert 0 < w[0] < c[0]


def test_overrides_pick_a_policy_per_stream_by_glob() -> None:
    art = random_artifact()
    cfg = parse_config({"thresholds": {"policy": "static", "static": {"warning": 5, "critical": 9}, "overrides": [
        {"streams": "turbine-*", "policy": "static", "static": {"warning": 50, "critical": 90}},
        {"streams": "turbine-7", "policy": "calibrated"},  # never reached: the first match wins
        {"streams": "pump-?2", "policy": "rolling"},
    ]}})
    names: list[str] = []
    t = build_threshold(cfg.thresholds, art.manifest, names)
    names.extend(["pump-01", "turbine-7", "pump-02"])  # streams appear after the policy was built
    w, c = t.levels(np.array([0, 1, 2, 1]))
    assert w[:2].tolist() == [5.0, 50.0] and c[1] == 90.0 and w[3] == 50.0
    assert w[2] == art.manifest.quantile(0.999), "the rolling policy starts from the calibrated levels"
    assert [t.policy_of(r) for r in range(3)] == ["static", "static", "rolling"]
    t.learn(np.array([2] * 60), np.full(60, 1000.0), np.zeros(60, bool))
    assert t.levels(np.array([2]))[0][0] > 999 and t.levels(np.array([0]))[0][0] == 5.0, "each learns its own"


def test_an_override_needs_a_glob_or_labels() -> None:
    from detector.errors import ConfigError

    with pytest.raises(ConfigError, match=r"thresholds.overrides.0: give streams \(a glob on the stream id\), labels"):
        parse_config({"thresholds": {"overrides": [{"policy": "static"}]}})


def test_budget_turns_alerts_per_day_into_calibrated_levels() -> None:
    art = random_artifact()  # hop 4; calibration scores rise linearly from 0.5 to 5.0 over the levels
    m = art.manifest
    cfg = parse_config({"thresholds": {"policy": "budget", "budget": {
        "alerts_per_day": 3.6, "critical_per_day": 0.36, "reading_interval_s": 60}}})
    one = build_threshold(cfg.thresholds, m, rule=(1, 1))
    # 86400 / (60 x 4) = 360 windows a day: 3.6 alerts a day is p = 0.01 per window, 0.36 is p = 0.001
    assert one.name == "budget"
    assert one.levels(np.array([0]))[0][0] == pytest.approx(m.quantile(0.99))
    assert one.levels(np.array([0]))[1][0] == pytest.approx(m.quantile(0.999))
    two_of_three = build_threshold(cfg.thresholds, m, rule=(2, 3))
    # 2 of 3: 360 x 3 x p^2 = 3.6, so p = sqrt(1/300): a lower level than 1 of 1 needs
    assert two_of_three.levels(np.array([0]))[0][0] == pytest.approx(m.quantile(1 - (1 / 300) ** 0.5))
    assert two_of_three.levels(np.array([0]))[0][0] < one.levels(np.array([0]))[0][0]


def test_telemanom_level_by_hand_with_pruning_and_the_policy_per_stream() -> None:
    from detector.threshold import telemanom_level

    e = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0])  # mean 1.9, std 2.7
    # every z from 2 to 2.5 puts the one run (10) alone above: gain (0.9/1.9 + 2.7/2.7) / (1 + 1); the
    # smallest of those candidates wins the tie, mean + 2 x std = 7.3; pruning keeps it (10 is 90 % above 1)
    assert telemanom_level(e) == pytest.approx(1.9 + 2 * 2.7)
    close = np.r_[np.ones(40), 6.0, np.ones(40), 5.8, np.ones(40), 5.7]
    assert telemanom_level(close) == 6.0, "the run above is within 13 % of the highest below: taken back"
    far = np.r_[np.ones(40), 6.0, np.ones(40), 3.0, np.ones(40), 2.9]
    assert 3.0 < telemanom_level(far) < 6.0, "6 is twice the highest below: it stays anomalous"
    assert telemanom_level(np.full(30, 2.0)) == 2.0, "no spread: the mean"

    cfg = parse_config({"thresholds": {"policy": "rolling", "rolling": {"method": "telemanom", "history": 200,
                                                                        "min_history": 20}}})
    art = random_artifact()
    policy = build_threshold(cfg.thresholds, art.manifest)
    rng = np.random.default_rng(1)
    quiet = np.abs(rng.normal(0, 1, 300)) * art.manifest.quantile(0.5)
    loud = quiet * 50  # a stream whose normal scores run far above the calibrated levels
    warnings = feed(policy, {0: quiet, 1: loud})
    base = art.manifest.quantile(0.999)
    assert (warnings[0] >= base - 1e-9).all() and (warnings[1] >= base - 1e-9).all(), "never below calibrated"
    assert warnings[1][-1] > 10 * warnings[0][-1] and (loud[-100:] < warnings[1][-1]).mean() > 0.95, "its own"
    assert parse_config({"thresholds": {"rolling": {"method": "telemanom"}}}).thresholds.rolling.method == "telemanom"
