"""Detection quality: point-wise and event-level metrics of boolean predictions against labelled anomalies.

Point-wise metrics (precision, recall, F1, false-alarm rate, missed-alarm rate) follow the SKAB leaderboard;
event metrics count each labelled anomaly window once. All functions take boolean row arrays (0/1 integers
are accepted too) and windows as inclusive row ranges ``(first_row, last_row)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "PointMetrics",
    "EventMetrics",
    "point_metrics",
    "event_metrics",
    "point_adjusted",
    "combine_points",
    "combine_events",
    "rows_to_windows",
    "windows_to_labels",
    "MOVED_K",
    "Attribution",
    "moved_features",
    "attribution",
    "combine_attribution",
]


@dataclass(frozen=True)
class PointMetrics:
    """Row-by-row confusion counts and the rates derived from them."""

    precision: float
    recall: float
    f1: float
    far: float  # false-alarm rate FP / (FP + TN)
    mar: float  # missed-alarm rate FN / (FN + TP)
    tp: int
    fp: int
    tn: int
    fn: int


@dataclass(frozen=True)
class EventMetrics:
    """Window-level detection counts: caught and missed anomaly windows, false alarm runs, detection delays."""

    precision: float
    recall: float
    f1: float
    caught: int
    missed: int
    false_events: int
    delays: list[float] = field(default_factory=list)  # per caught window: first detection row - window start


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else 0.0


def _f1(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def _as_bool(a: np.ndarray, what: str) -> np.ndarray:
    """A 1-D boolean copy of `a`; 0/1 numbers are accepted, anything else is refused."""
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of booleans, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iuf" and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise ValueError(f"{what} must be booleans or 0/1 numbers, got dtype {arr.dtype}")


def _check_windows(windows: list[tuple[int, int]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows' first and last rows as int arrays, after checking they are ordered and inside [0, n)."""
    w = np.asarray(windows, dtype=np.int64).reshape(-1, 2)
    a, b = w[:, 0], w[:, 1]
    bad = (a > b) | (a < 0) | (b >= n)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"window {tuple(windows[i])} is not an inclusive row range inside [0, {n})")
    return a, b


def rows_to_windows(labels: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in a boolean row array, as inclusive ``(first_row, last_row)`` ranges.

    >>> rows_to_windows(np.array([0, 1, 1, 0, 1], dtype=bool))
    [(1, 2), (4, 4)]
    """
    x = _as_bool(labels, "labels").astype(np.int8)
    d = np.diff(np.concatenate(([0], x, [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1) - 1
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def windows_to_labels(windows: list[tuple[int, int]], n_rows: int) -> np.ndarray:
    """A boolean row array of length `n_rows` that is True inside any of the inclusive row windows."""
    a, b = _check_windows(windows, n_rows)
    d = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(d, a, 1)
    np.add.at(d, b + 1, -1)
    return np.cumsum(d[:-1]) > 0


def point_metrics(pred: np.ndarray, labels: np.ndarray) -> PointMetrics:
    """Row-by-row precision, recall, F1, false-alarm and missed-alarm rates of `pred` against `labels`.

    Every 0/0 ratio is 0.0: precision when nothing is predicted, recall and MAR when no row is anomalous,
    FAR when no row is normal, and F1 when precision and recall are both 0.
    """
    p = _as_bool(pred, "pred")
    y = _as_bool(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"pred has {p.size} rows but labels has {y.size}")
    tp = int(np.count_nonzero(p & y))
    fp = int(np.count_nonzero(p & ~y))
    fn = int(np.count_nonzero(~p & y))
    tn = int(p.size - tp - fp - fn)
    return _points(tp, fp, tn, fn)


def _points(tp: int, fp: int, tn: int, fn: int) -> PointMetrics:
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return PointMetrics(precision, recall, _f1(precision, recall), _ratio(fp, fp + tn), _ratio(fn, fn + tp),
                        tp, fp, tn, fn)


def event_metrics(pred: np.ndarray, windows: list[tuple[int, int]], n_rows: int | None = None) -> EventMetrics:
    """Window-level detection: each labelled window caught or missed once, plus false alarm runs and delays.

    A window is caught when any predicted row lies inside it; its delay is the first such row minus the
    window's first row. A false event is a maximal run of predicted rows that touches no window. Event
    precision is caught / (caught + false_events), recall caught / windows; 0/0 ratios are 0.0.
    `n_rows` (default ``len(pred)``) is the file's length: `pred` must have that many rows.
    """
    p = _as_bool(pred, "pred")
    n = p.size if n_rows is None else int(n_rows)
    if p.size != n:
        raise ValueError(f"pred has {p.size} rows but n_rows is {n}")
    a, b = _check_windows(windows, n)
    # next_hit[i]: the first predicted row at or after i (n when there is none)
    next_hit = np.where(p, np.arange(n), n)
    next_hit = np.minimum.accumulate(next_hit[::-1])[::-1]
    next_hit = np.append(next_hit, n)
    first = next_hit[a]
    hit = first <= b
    caught = int(np.count_nonzero(hit))
    delays = [float(d) for d in (first - a)[hit]]
    # a predicted run is false when it overlaps no window row: count window rows inside it with a prefix sum
    inside = np.concatenate(([0], np.cumsum(windows_to_labels(windows, n))))
    runs = np.asarray(rows_to_windows(p), dtype=np.int64).reshape(-1, 2)
    false_events = int(np.count_nonzero(inside[runs[:, 1] + 1] - inside[runs[:, 0]] == 0))
    return _events(caught, len(a) - caught, false_events, delays)


def _events(caught: int, missed: int, false_events: int, delays: list[float]) -> EventMetrics:
    precision, recall = _ratio(caught, caught + false_events), _ratio(caught, caught + missed)
    return EventMetrics(precision, recall, _f1(precision, recall), caught, missed, false_events, delays)


def point_adjusted(pred: np.ndarray, windows: list[tuple[int, int]]) -> np.ndarray:
    """Predictions under the point-adjust convention: a window with any detected row counts as wholly detected.

    Point adjustment is common in the literature but inflates scores (one lucky row in a long window makes the
    whole window a hit, so even random alarms score well); report it beside, never instead of, the plain
    point-wise and event metrics.
    """
    p = _as_bool(pred, "pred")
    a, b = _check_windows(windows, p.size)
    c = np.concatenate(([0], np.cumsum(p)))
    hit = c[b + 1] - c[a] > 0
    caught = [(int(s), int(e)) for s, e in zip(a[hit], b[hit], strict=True)]
    return p | windows_to_labels(caught, p.size)


def combine_points(items: list[PointMetrics]) -> PointMetrics:
    """Micro-average of several files' point metrics: sum the confusion counts, then recompute the rates."""
    return _points(sum(m.tp for m in items), sum(m.fp for m in items), sum(m.tn for m in items),
                   sum(m.fn for m in items))


def combine_events(items: list[EventMetrics]) -> EventMetrics:
    """Micro-average of several files' event metrics: sum the counts, pool the delays, recompute the rates."""
    return _events(sum(m.caught for m in items), sum(m.missed for m in items), sum(m.false_events for m in items),
                   [d for m in items for d in m.delays])


MOVED_K = 3.0
"""How far, in standard deviations of the normal rows around it, an anomaly must shift a sensor's mean for the
sensor to count as moved by it (set before any attribution figure was computed)."""


@dataclass(frozen=True)
class Attribution:
    """Alerts raised inside labelled anomalies, and how many of them name first a sensor the anomaly moved."""

    alerts: int  # raised inside a window that moved at least one sensor
    right: int  # of those, naming first a sensor the window moved
    undecided: int = 0  # raised inside a window that moved no sensor measurably: no truth to score them against

    @property
    def share(self) -> float:
        """Share of those alerts whose top sensor the anomaly moved (0.0 when there are none)."""
        return _ratio(self.right, self.alerts)


def moved_features(values: np.ndarray, window: tuple[int, int], labels: np.ndarray, k: float = MOVED_K) -> np.ndarray:
    """Which sensors (F,) an anomaly window moved: its mean lies beyond the normal rows' means on both sides.

    The reference is the normal rows just before the window and just after it, as many on each side as the
    window has rows (one side when the other has none). A sensor is moved when its mean inside the window lies
    outside the range of the two sides' means by more than `k` times the normal rows' standard deviation
    (the pooled spread within each side). A sensor that drifts through the whole recording has its window
    mean between the two sides' means, so it does not count, however far it moved since training.

    >>> t = np.arange(300.0)
    >>> x = np.stack([np.sin(t), t / 100, np.cos(t / 3)], axis=1)
    >>> x[100:200, 0] -= 5.0  # the fault moves sensor 0; sensor 1 drifts throughout
    >>> y = np.zeros(300, bool); y[100:200] = True
    >>> moved_features(x, (100, 199), y).tolist()
    [True, False, False]
    """
    a, b = window
    n = b - a + 1
    normal = ~_as_bool(labels, "labels")
    sides = [np.flatnonzero(normal[:a])[-n:], np.flatnonzero(normal[b + 1:])[:n] + b + 1]
    sides = [values[i] for i in sides if len(i) > 1]
    if not sides:
        return np.zeros(values.shape[1], dtype=bool)
    with warnings.catch_warnings():  # a sensor with no value on one side or inside is left NaN: not moved
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.stack([np.nanmean(v, axis=0) for v in sides])
        spread = np.sqrt(np.mean([np.nanvar(v, axis=0) for v in sides], axis=0))
        inside = np.nanmean(values[a:b + 1], axis=0)
    beyond = np.maximum(means.min(axis=0) - inside, inside - means.max(axis=0))
    return np.nan_to_num(beyond) > k * np.maximum(np.nan_to_num(spread), 1e-9)


def combine_attribution(items: list[Attribution]) -> Attribution:
    """Several files' attribution together: the counts summed."""
    return Attribution(sum(a.alerts for a in items), sum(a.right for a in items), sum(a.undecided for a in items))


def attribution(raised: list[tuple[int, str]], windows: list[tuple[int, int]], moved: list[np.ndarray],
                features: list[str]) -> Attribution:
    """Score the top sensor of each alert raised inside a labelled window against the sensors that window moved.

    `moved` holds, per window, the sensors it moved (`moved_features`).

    >>> t = np.arange(300.0)
    >>> x = np.stack([np.sin(t), np.cos(t / 3)], axis=1); x[100:200, 0] -= 5.0
    >>> y = np.zeros(300, bool); y[100:200] = True
    >>> attribution([(20, "b"), (120, "a"), (130, "b")], [(100, 199)], [moved_features(x, (100, 199), y)], ["a", "b"])
    Attribution(alerts=2, right=1, undecided=0)
    """
    alerts = right = undecided = 0
    for row, name in raised:
        i = next((i for i, (a, b) in enumerate(windows) if a <= row <= b), None)
        if i is None:
            continue
        if not moved[i].any():
            undecided += 1
            continue
        alerts += 1
        right += bool(name in features and moved[i][features.index(name)])
    return Attribution(alerts, right, undecided)
