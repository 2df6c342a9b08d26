"""The alert state machine: k of n, escalation, hysteresis, cooldown, deterministic ids."""

from __future__ import annotations

import numpy as np

from detector.alert import AlertMachine, alert_id
from detector.config import AlertConfig


def run(machine: AlertMachine, scores: list[float], row: int = 0, warn: float = 10.0, crit: float = 20.0,
        t0: float = 0.0) -> list[tuple[int, str, str]]:
    """Feed one stream's scores in one batch; return (window, event, severity)."""
    n = len(scores)
    tr = machine.update(np.full(n, row), t0 + np.arange(n, dtype=float), np.array(scores, float),
                        np.full(n, warn), np.full(n, crit))
    return [(int(w), str(e), str(s)) for w, e, s in zip(tr.window, tr.event, tr.severity, strict=True)]


def test_raises_after_k_of_n_and_not_on_a_blip() -> None:
    m = AlertMachine(AlertConfig(k=2, n=3, clear_after=2), capacity=4)
    assert run(m, [1, 11, 1, 1, 1, 1]) == []  # one blip: no alert
    assert run(m, [11, 1, 11]) == [(2, "raised", "warning")]  # two of the last three


def test_escalates_then_clears_with_hysteresis() -> None:
    m = AlertMachine(AlertConfig(k=2, n=3, clear_after=3, clear_ratio=0.5), capacity=1)
    events = run(m, [12, 12, 25, 25, 9, 9, 9, 9, 4, 4, 4])
    assert events == [(1, "raised", "warning"), (3, "escalated", "critical"), (10, "cleared", "critical")]
    # 9 is below warning but above the exit level 0.5 x 10: it keeps the alert open


def test_one_transition_per_state_and_cooldown() -> None:
    m = AlertMachine(AlertConfig(k=1, n=1, clear_after=1, cooldown_windows=3), capacity=1)
    assert run(m, [11, 11, 11, 1, 11, 11, 11, 11]) == [(0, "raised", "warning"), (3, "cleared", "warning"),
                                                        (7, "raised", "warning")]


def test_streams_are_independent_and_batches_split_anywhere() -> None:
    scores = np.array([11, 1, 11, 11, 1, 1, 1, 1, 1, 11, 11, 11], float)
    rows = np.array([0, 1] * 6)
    cfg = AlertConfig(k=2, n=2, clear_after=2)
    whole = AlertMachine(cfg, 2)
    order = np.lexsort((np.arange(12), rows))
    tr = whole.update(rows[order], np.arange(12.0)[order], scores[order], np.full(12, 10.0), np.full(12, 99.0))
    t_whole = np.arange(12.0)[order][tr.window]
    got_whole = sorted(zip(rows[order][tr.window].tolist(), t_whole.tolist(), tr.event.tolist(), strict=True))
    split = AlertMachine(cfg, 2)
    got_split = []
    for a, b in ((0, 5), (5, 12)):
        idx = np.arange(a, b)
        o = idx[np.lexsort((idx, rows[idx]))]
        t = split.update(rows[o], o.astype(float), scores[o], np.full(len(o), 10.0), np.full(len(o), 99.0))
        got_split += zip(rows[o][t.window].tolist(), o[t.window].astype(float).tolist(), t.event.tolist(), strict=True)
    assert got_whole == sorted(got_split)
    assert got_whole == [(0, 2.0, "raised"), (0, 6.0, "cleared"), (1, 11.0, "raised")]


def test_episode_events_share_the_raise_time_for_their_id() -> None:
    m = AlertMachine(AlertConfig(k=1, n=1, clear_after=1), capacity=1)
    tr = m.update(np.zeros(4, np.int64), np.array([5.0, 6, 7, 8]), np.array([11.0, 30, 1, 1]),
                  np.full(4, 10.0), np.full(4, 20.0))
    assert tr.event.tolist() == ["raised", "escalated", "cleared"]
    assert tr.raised_at.tolist() == [5.0, 5.0, 5.0]
    assert alert_id("m", "s", 5.0) != alert_id("m", "s", 6.0) != alert_id("m", "t", 5.0)


def test_minimum_duration_holds_a_blip_open() -> None:
    blip = [11, 1, 1, 1, 1, 1]
    assert run(AlertMachine(AlertConfig(k=1, n=1, clear_after=1), capacity=1), blip) == [
        (0, "raised", "warning"), (1, "cleared", "warning")]
    held = AlertMachine(AlertConfig(k=1, n=1, clear_after=1, min_duration_windows=3), capacity=1)
    assert run(held, blip) == [(0, "raised", "warning"), (3, "cleared", "warning")]
