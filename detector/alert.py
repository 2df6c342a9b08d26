"""The per-stream alert state machine, as arrays with one row per stream.

A stream raises after k of its last n windows reach the warning level, escalates once k of the last n
reach critical (or at once, escalated, when one window reaches `immediate` x critical: a fault far past the
critical level is not made to wait for k windows; a window that holds one sensor's spike, detector.spikes, raises
at once too, at warning severity), and clears after `clear_after`
windows in a row below `clear_ratio` x warning (hysteresis).
An episode lasts at least `min_duration_windows` windows (a blip that fires and clears at once is held
open that long, so it reads as one alert, not a flapping pair). After a clear, `cooldown_windows`
windows pass before it can raise again. The alert id is derived from the
model, the stream and the event time of the window that raised, so a replay of the same input yields the
same ids.

An operator may acknowledge an open episode (the control topic, detector/control.py): it is marked `acked`,
its escalation is then not announced (the state still moves, so its clear says critical), and the clear is.
`raised_wall` keeps the wall-clock time at which the episode was raised, so that an acknowledgement read
again after a restore applies only to episodes that were open when it was written.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from detector.config import AlertConfig
from detector.rows import RowState, grown

__all__ = ["AlertMachine", "Transitions", "NORMAL", "RAISED", "ESCALATED", "alert_id"]

NORMAL, RAISED, ESCALATED = 0, 1, 2
EVENT_RAISED, EVENT_ESCALATED, EVENT_CLEARED = "raised", "escalated", "cleared"
_ADDED = ("acked", "raised_wall")  # fields added after the first checkpoint format
_FIELDS = ("warn_bits", "crit_bits", "state", "below", "cooldown", "raised_at", "age", *_ADDED)
_NAMESPACE = uuid.UUID("6f1c1c2e-5d55-4a8e-9a55-3f1f3c0de001")


def alert_id(model: str, stream: str, raised_at: float) -> str:
    """The deterministic id of the alert episode of `stream` raised at event time `raised_at`.

    >>> alert_id("m1", "pump-1", 1700000000.0) == alert_id("m1", "pump-1", 1700000000.0)
    True
    """
    return str(uuid.uuid5(_NAMESPACE, f"{model}|{stream}|{raised_at:.6f}"))


@dataclass(slots=True)
class Transitions:
    """State changes caused by a batch of windows: window positions, event names and episode start times."""

    window: np.ndarray  # (E,) int64 positions into the batch's WindowScores
    event: np.ndarray  # (E,) object: raised | escalated | cleared
    raised_at: np.ndarray  # (E,) float64 event time of the window that raised the episode
    severity: np.ndarray  # (E,) object: warning | critical


class AlertMachine(RowState):
    """Runs the alert state machine of every stream over scored windows."""

    def __init__(self, cfg: AlertConfig, capacity: int = 0) -> None:
        self.cfg = cfg
        self._mask = np.int64((1 << cfg.n) - 1)
        self.capacity = 0
        self.warn_bits = np.zeros(0, np.int64)
        self.crit_bits = np.zeros(0, np.int64)
        self.state = np.zeros(0, np.int8)
        self.below = np.zeros(0, np.int32)
        self.cooldown = np.zeros(0, np.int32)
        self.age = np.zeros(0, np.int32)  # windows since the episode was raised
        self.raised_at = np.zeros(0, np.float64)
        self.acked = np.zeros(0, np.int8)  # 1: the open episode was acknowledged by an operator
        self.raised_wall = np.zeros(0, np.float64)  # wall-clock time the open episode was raised
        self.ensure(capacity)

    def row_fields(self) -> dict[str, object]:
        """Window history bits, state, counters, the open episode's start and whether it was acknowledged."""
        return {name: 0 for name in _FIELDS}

    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set these streams' state (None: normal, no history).

        A checkpoint written before acknowledgements existed (no `acked`, `raised_wall`) restores the rest of
        its state, its open episode unacknowledged.
        """
        if len(rows):
            self.ensure(int(rows.max()) + 1)
        if state is not None and "state" in state:
            state = {**{k: np.zeros(len(rows), getattr(self, k).dtype) for k in _ADDED}, **state}
        return super().import_rows(rows, state)

    def ensure(self, capacity: int) -> None:
        """Grow the state arrays to hold `capacity` streams."""
        if capacity <= self.capacity:
            return
        for name in _FIELDS:
            setattr(self, name, grown(getattr(self, name), capacity))
        self.capacity = capacity

    def reconfigure(self, cfg: AlertConfig) -> None:
        """Take new rules, keeping every stream's state (window history beyond the new n is dropped)."""
        self.cfg = cfg
        self._mask = np.int64((1 << cfg.n) - 1)
        self.warn_bits &= self._mask
        self.crit_bits &= self._mask

    def reset(self, rows: np.ndarray) -> None:
        """Return these streams to normal without an event (their history is gone)."""
        for arr in (self.warn_bits, self.crit_bits, self.state, self.below, self.cooldown, self.age, self.acked):
            arr[rows] = 0

    def acknowledge(self, rows: np.ndarray, written_at: float | None = None) -> np.ndarray:
        """Mark the open, unacknowledged episodes of these rows acknowledged; return the rows it marked.

        With `written_at` (wall clock), only episodes raised at or before it: an acknowledgement read again
        after a restore does not reach an episode raised after it was written.
        """
        hit = (self.state[rows] > NORMAL) & (self.acked[rows] == 0)
        if written_at is not None:
            hit &= self.raised_wall[rows] <= written_at
        out = np.unique(rows[hit])
        self.acked[out] = 1
        return out

    def close(self, rows: np.ndarray) -> np.ndarray:
        """End the open episodes of these rows at once, without cooldown (a mute); return the rows closed."""
        out = np.unique(rows[self.state[rows] > NORMAL])
        self.reset(out)
        return out

    def update(self, rows: np.ndarray, end_ts: np.ndarray, score: np.ndarray, warning: np.ndarray,
               critical: np.ndarray, now: float = 0.0, spike: np.ndarray | None = None) -> Transitions:
        """Feed windows (ordered by row, then time) through the machine; return the transitions.

        `now` is the wall-clock time, kept with each episode raised (see `acknowledge`). A window marked in
        `spike` (detector.spikes) raises at once, at warning severity unless k windows reached critical.
        """
        k = len(rows)
        parts: list[tuple[np.ndarray, str, np.ndarray, np.ndarray]] = []
        if k == 0:
            return _no_transitions()
        first = np.ones(k, bool)
        first[1:] = rows[1:] != rows[:-1]
        starts = np.flatnonzero(first)
        rank = np.arange(k) - starts[np.cumsum(first) - 1]
        cfg = self.cfg
        for step in range(int(rank.max()) + 1):
            w = np.flatnonzero(rank == step)
            r = rows[w]
            s = score[w]
            self.warn_bits[r] = ((self.warn_bits[r] << 1) | (s >= warning[w])) & self._mask
            self.crit_bits[r] = ((self.crit_bits[r] << 1) | (s >= critical[w])) & self._mask
            n_warn = np.bitwise_count(self.warn_bits[r])
            n_crit = np.bitwise_count(self.crit_bits[r])
            st = self.state[r].copy()
            self.below[r] = np.where((st > NORMAL) & (s < cfg.clear_ratio * warning[w]), self.below[r] + 1, 0)

            extreme = (s >= cfg.immediate * critical[w]) if cfg.immediate > 0 else np.zeros(len(w), bool)
            sudden = spike[w] if spike is not None else False
            raise_ = (st == NORMAL) & (self.cooldown[r] == 0) & ((n_warn >= cfg.k) | extreme | sudden)
            escalate = (st == RAISED) & ((n_crit >= cfg.k) | extreme)
            self.age[r] = np.where(st > NORMAL, self.age[r] + 1, 0)
            clear = (st > NORMAL) & (self.below[r] >= cfg.clear_after) & (self.age[r] >= cfg.min_duration_windows)
            self.cooldown[r] = np.where(st == NORMAL, np.maximum(self.cooldown[r] - 1, 0), self.cooldown[r])

            if raise_.any():
                rr = r[raise_]
                self.raised_at[rr] = end_ts[w[raise_]]
                self.raised_wall[rr] = now
                self.acked[rr] = 0
                new_state = np.where((n_crit[raise_] >= cfg.k) | extreme[raise_], ESCALATED, RAISED).astype(np.int8)
                self.state[rr] = new_state
                parts.append((w[raise_], EVENT_RAISED, self.raised_at[rr], new_state))
            if escalate.any():
                re_ = r[escalate]
                self.state[re_] = ESCALATED
                told = self.acked[re_] == 0  # an acknowledged episode escalates silently
                if told.any():
                    parts.append((w[escalate][told], EVENT_ESCALATED, self.raised_at[re_[told]], self.state[re_[told]]))
            if clear.any():
                rc = r[clear]
                parts.append((w[clear], EVENT_CLEARED, self.raised_at[rc], st[clear]))
                self.state[rc] = NORMAL
                self.below[rc] = 0
                self.cooldown[rc] = cfg.cooldown_windows
                self.warn_bits[rc] = 0
                self.crit_bits[rc] = 0
                self.acked[rc] = 0
        if not parts:
            return _no_transitions()
        win = np.concatenate([p[0] for p in parts])
        ev = np.concatenate([np.full(len(p[0]), p[1], dtype=object) for p in parts])
        at = np.concatenate([p[2] for p in parts])
        peak = np.concatenate([p[3] for p in parts])
        order = np.argsort(win, kind="stable")
        severity = np.where(peak[order] == ESCALATED, "critical", "warning").astype(object)
        return Transitions(win[order], ev[order], at[order], severity)


def _no_transitions() -> Transitions:
    return Transitions(np.empty(0, np.int64), np.empty(0, object), np.empty(0), np.empty(0, object))
