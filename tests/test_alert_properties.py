"""Properties of the alert state machine over random streams, rules and batch splits (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.alert import AlertMachine
from detector.config import AlertConfig


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[AlertConfig, np.ndarray, np.ndarray, list[int]]:
    """A rule, 1-3 streams of scores in time order, and cut points for batches."""
    n = draw(st.integers(1, 5))
    cfg = AlertConfig(k=draw(st.integers(1, n)), n=n, clear_after=draw(st.integers(1, 4)),
                      clear_ratio=draw(st.sampled_from([0.5, 0.8, 1.0])), cooldown_windows=draw(st.integers(0, 3)),
                      min_duration_windows=draw(st.integers(0, 4)))
    streams = draw(st.integers(1, 3))
    length = draw(st.integers(1, 60))
    scores = np.array(draw(st.lists(st.sampled_from([1.0, 9.0, 11.0, 25.0]), min_size=streams * length,
                                    max_size=streams * length)))
    rows = np.tile(np.arange(streams), length)  # interleaved in time
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(rows) - 1, 1)), max_size=6))))
    return cfg, rows, scores, cuts


def replay(cfg: AlertConfig, rows: np.ndarray, scores: np.ndarray,
           cuts: list[int]) -> list[tuple[int, float, str, float]]:
    """Run the windows through a fresh machine in batches cut at `cuts`; return (row, time, event, raised_at)."""
    m = AlertMachine(cfg, capacity=int(rows.max()) + 1)
    ts = np.arange(len(rows), dtype=float)
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        idx = np.arange(a, b)
        o = idx[np.lexsort((ts[idx], rows[idx]))]  # each batch ordered by row, then time
        tr = m.update(rows[o], ts[o], scores[o], np.full(len(o), 10.0), np.full(len(o), 20.0))
        out += zip(rows[o][tr.window].tolist(), ts[o][tr.window].tolist(), tr.event.tolist(),
                   tr.raised_at.tolist(), strict=True)
    return sorted(out, key=lambda e: (e[0], e[1]))


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_episodes_are_well_formed_and_independent_of_batching(case) -> None:
    cfg, rows, scores, cuts = case
    events = replay(cfg, rows, scores, cuts)
    assert events == replay(cfg, rows, scores, []), "the same windows give the same events, however batched"
    for r in np.unique(rows).tolist():
        mine = [e for e in events if e[0] == r]
        open_since = None
        for _, t, event, raised_at in mine:
            if event == "raised":
                assert open_since is None, "no second episode while one is open"
                open_since = t
                assert raised_at == t
            else:
                assert open_since is not None, f"{event} follows a raise"
                assert raised_at == open_since, "every event of an episode carries its raise time (its id)"
                if event == "cleared":
                    open_since = None
