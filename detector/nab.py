"""Numenta Anomaly Benchmark (NAB) scoring: windowed, time-weighted rewards and costs, normalised to 0..100.

The rules (see ``shared/data/README.md``, section NAB), with the row conventions of NAB's own scorer:

* The first ``min(floor(0.15 * rows), 750)`` rows of a file are probationary: never scored.
* Windows are inclusive row ranges ``[left, right]``; overlapping ones are merged. A window of
  ``width = right - left + 1`` rows places row ``i`` at ``y = (i - (right + 1)) / width``: ``-1`` at the left
  edge, just below 0 at the right edge. The earliest detection in a window earns
  ``A_TP * sigma(y) / sigma(-1)`` (exactly ``A_TP`` at the left edge); a window with none costs ``A_FN``.
* A detection outside every window after window ``w`` costs ``A_FP * sigma(y)`` with
  ``y = (i - right_w) / (width_w - 1)`` (0 just past the right edge, 1 one window length later); before the
  first window it costs ``A_FP``.
* ``sigma(y) = 2 / (1 + exp(5 y)) - 1``. Raw scores are summed over files and normalised as
  ``100 * (S - S_null) / (S_perfect - S_null)``: the null detector never detects (``-A_FN`` per window) and
  the perfect one detects each window at its left edge (``+A_TP`` per window).

A window with no row after the probationary period is not scored at all (neither reward nor cost).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "PROBATION_FRACTION",
    "PROBATION_CAP",
    "Profile",
    "PROFILES",
    "load_profiles",
    "NabFile",
    "FileScore",
    "scaled_sigmoid",
    "probationary_rows",
    "windows_to_rows",
    "merge_windows",
    "file_score",
    "null_score",
    "perfect_score",
    "normalised_score",
    "threshold_curve",
    "best_threshold",
    "nab_scores",
]

PROBATION_FRACTION = 0.15
PROBATION_CAP = 750

Window = tuple[int, int]


@dataclass(frozen=True)
class Profile:
    """The positive weights of one NAB scoring profile: reward per true positive, cost per FP and per FN."""

    tp: float
    fp: float
    fn: float


PROFILES: dict[str, Profile] = {
    "standard": Profile(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": Profile(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": Profile(tp=1.0, fp=0.11, fn=2.0),
}


def load_profiles(path: Path | str | None = None) -> dict[str, Profile]:
    """The profiles of NAB's ``config/profiles.json`` at `path`, or the built-in `PROFILES` when None."""
    if path is None:
        return dict(PROFILES)
    raw = json.loads(Path(path).read_text())
    out: dict[str, Profile] = {}
    for name, body in raw.items():
        cm = body["CostMatrix"]
        out[name] = Profile(tp=float(cm["tpWeight"]), fp=float(cm["fpWeight"]), fn=float(cm["fnWeight"]))
    return out


@dataclass(frozen=True, eq=False)
class NabFile:
    """One scored stream: a detector's per-row anomaly scores and the file's labelled windows (row ranges)."""

    scores: np.ndarray
    windows: list[Window] = field(default_factory=list)
    name: str = ""


@dataclass
class FileScore:
    """Raw NAB score of one file at one threshold, with windows detected, false detections and windows missed."""

    score: float
    tp: int
    fp: int
    fn: int


def scaled_sigmoid(y: np.ndarray | float) -> np.ndarray | float:
    """NAB's ``2 / (1 + exp(5 y)) - 1``: +1 far before a window's right edge, 0 at it, -1 far after.

    >>> round(float(scaled_sigmoid(-1.0)), 6), float(scaled_sigmoid(0.0))
    (0.986614, 0.0)
    """
    # 2 / (1 + e^x) - 1 == -tanh(x / 2), which cannot overflow.
    out = 0.0 - np.tanh(2.5 * np.asarray(y, dtype=np.float64))  # 0.0 - x: no -0.0 at y = 0
    return float(out) if out.ndim == 0 else out


_SIGMA_LEFT_EDGE = math.tanh(2.5)  # scaled_sigmoid(-1)


def probationary_rows(n_rows: int) -> int:
    """Number of leading rows of an `n_rows`-row file that are not scored.

    >>> probationary_rows(100), probationary_rows(4032), probationary_rows(22695)
    (15, 604, 750)
    """
    return min(math.floor(PROBATION_FRACTION * n_rows), PROBATION_CAP)


def windows_to_rows(timestamps: np.ndarray, windows: Sequence[tuple[float, float]]) -> list[Window]:
    """Inclusive row ranges of the rows whose (sorted, epoch-second) timestamp lies in each ``[start, end]``.

    Windows that contain no row are dropped.

    >>> windows_to_rows(np.array([0.0, 60.0, 120.0, 180.0]), [(60.0, 120.0), (500.0, 600.0)])
    [(1, 2)]
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    if len(windows) == 0:
        return []
    bounds = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    lo = np.searchsorted(ts, bounds[:, 0], side="left")
    hi = np.searchsorted(ts, bounds[:, 1], side="right") - 1
    return [(int(a), int(b)) for a, b in zip(lo, hi, strict=True) if a <= b]


def merge_windows(windows: Sequence[Window]) -> list[Window]:
    """Windows sorted by start, with overlapping ranges (sharing at least one row) merged into one.

    >>> merge_windows([(50, 60), (10, 20), (15, 30), (31, 35)])
    [(10, 30), (31, 35), (50, 60)]
    """
    merged: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in windows):
        if b < a:
            raise ValueError(f"window ({a}, {b}) ends before it starts")
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


@dataclass(frozen=True)
class _Layout:
    """Per-row scoring layout of one file under one profile (private)."""

    start: int  # first scored row
    window: np.ndarray  # (T,) int: index of the window holding the row, -1 outside every window
    value: np.ndarray  # (T,) float: reward of a detection there if in a window, else its (negative) FP cost
    n_windows: int  # windows with at least one scored row


def _layout(n_rows: int, windows: Sequence[Window], profile: Profile) -> _Layout:
    start = probationary_rows(n_rows)
    clipped = [(max(a, 0), min(b, n_rows - 1)) for a, b in windows if b >= 0 and a <= n_rows - 1]
    wins = merge_windows(clipped)
    rows = np.arange(n_rows)
    if not wins:
        return _Layout(start, np.full(n_rows, -1), np.full(n_rows, -profile.fp), 0)
    left = np.array([a for a, _ in wins])
    right = np.array([b for _, b in wins])
    width = (right - left + 1).astype(np.float64)
    k = np.searchsorted(left, rows, side="right") - 1  # last window starting at or before the row
    kk = np.maximum(k, 0)
    inside = (k >= 0) & (rows <= right[kk])
    y_in = (rows - right[kk] - 1) / width[kk]
    y_after = (rows - right[kk]) / np.maximum(width[kk] - 1.0, 1.0)
    reward = profile.tp * scaled_sigmoid(y_in) / _SIGMA_LEFT_EDGE
    cost = np.where(k >= 0, profile.fp * scaled_sigmoid(y_after), -profile.fp)
    n_windows = int(np.count_nonzero(right >= start))
    return _Layout(start, np.where(inside, k, -1), np.where(inside, reward, cost), n_windows)


def file_score(detections: np.ndarray, windows: Sequence[Window], profile: Profile) -> FileScore:
    """Raw NAB score of one file's boolean detections (T,); rows in the probationary period are ignored."""
    det = np.asarray(detections, dtype=bool)
    lay = _layout(len(det), windows, profile)
    det = det.copy()
    det[: lay.start] = False
    fp_rows = det & (lay.window < 0)
    fp_cost = float(lay.value[fp_rows].sum())
    in_rows = np.flatnonzero(det & (lay.window >= 0))
    # Rows come in ascending order, so each window's first occurrence is its earliest detection.
    _, first = np.unique(lay.window[in_rows], return_index=True)
    reward = float(lay.value[in_rows[first]].sum())
    tp = len(first)
    fn = lay.n_windows - tp
    return FileScore(score=reward + fp_cost - profile.fn * fn, tp=tp, fp=int(fp_rows.sum()), fn=fn)


def _n_windows(files: Sequence[NabFile]) -> int:
    return sum(_layout(len(f.scores), f.windows, PROFILES["standard"]).n_windows for f in files)


def null_score(files: Sequence[NabFile], profile: Profile) -> float:
    """Raw score, summed over `files`, of the detector that never detects."""
    return -profile.fn * _n_windows(files)


def perfect_score(files: Sequence[NabFile], profile: Profile) -> float:
    """Raw score, summed over `files`, of the detector that detects each window at its left edge only."""
    return profile.tp * _n_windows(files)


def _span(files: Sequence[NabFile], profile: Profile) -> float:
    span = (profile.tp + profile.fn) * _n_windows(files)
    if span <= 0:
        raise ValueError("NAB normalisation needs at least one scored window and a positive A_TP + A_FN")
    return span


def normalised_score(files: Sequence[NabFile], profile: Profile, threshold: float) -> float:
    """NAB score in [.., 100] of `files` when every row whose score is >= `threshold` is a detection."""
    raw = sum(file_score(np.asarray(f.scores) >= threshold, f.windows, profile).score for f in files)
    return 100.0 * (raw - null_score(files, profile)) / _span(files, profile)


def threshold_curve(files: Sequence[NabFile], profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Candidate thresholds (descending) and the normalised NAB score at each, over all scored rows of `files`.

    Thresholds are the distinct scores at which the score can change; any other threshold scores as the
    smallest candidate above it (or 0, the null score, above the largest).
    """
    values: list[np.ndarray] = []
    deltas: list[np.ndarray] = []
    for f in files:
        scores = np.asarray(f.scores, dtype=np.float64)
        lay = _layout(len(scores), f.windows, profile)
        scored = np.zeros(len(scores), dtype=bool)
        scored[lay.start :] = True
        scored &= ~np.isnan(scores)
        # A false detection adds its cost for every threshold at or below its score.
        fp = scored & (lay.window < 0)
        values.append(scores[fp])
        deltas.append(lay.value[fp])
        # A window's reward is the value of its earliest row reaching the threshold. Going down in threshold,
        # it changes only at the rows that set a new running maximum of the window's scores (its records).
        idx = np.flatnonzero(scored & (lay.window >= 0))
        if len(idx) == 0:
            continue
        s, wid, val = scores[idx], lay.window[idx], lay.value[idx]
        _, rank = np.unique(s, return_inverse=True)
        key = wid.astype(np.int64) * (int(rank.max()) + 2) + rank  # segmented running max via offsets
        run = np.maximum.accumulate(key)
        rec = np.ones(len(key), dtype=bool)
        rec[1:] = key[1:] > run[:-1]
        rs, rw, rv = s[rec], wid[rec], val[rec]
        last = np.ones(len(rw), dtype=bool)
        last[:-1] = rw[1:] != rw[:-1]
        nxt = np.append(rv[1:], 0.0)
        # The largest record turns the window from missed (-A_FN) to detected late; each smaller one moves
        # the earliest detection back to its own, earlier row.
        values.append(rs)
        deltas.append(np.where(last, rv + profile.fn, rv - nxt))
    v = np.concatenate(values) if values else np.empty(0)
    d = np.concatenate(deltas) if deltas else np.empty(0)
    order = np.argsort(-v, kind="stable")
    v, total = v[order], np.cumsum(d[order])
    ends = np.ones(len(v), dtype=bool)
    ends[:-1] = v[1:] != v[:-1]
    return v[ends], 100.0 * total[ends] / _span(files, profile)


def best_threshold(files: Sequence[NabFile], profile: Profile) -> tuple[float, float]:
    """The threshold over every distinct scored value that maximises the normalised score, and that score.

    Ties go to the highest threshold; if no threshold beats the null detector, a threshold just above every
    score (no detections, score 0) is returned.
    """
    thresholds, scores = threshold_curve(files, profile)
    if len(scores) == 0 or scores.max() <= 0.0:
        top = max((float(np.nanmax(f.scores)) for f in files if np.any(~np.isnan(f.scores))), default=0.0)
        return float(np.nextafter(top, np.inf)), 0.0
    i = int(np.argmax(scores))
    return float(thresholds[i]), float(scores[i])


def nab_scores(files: Sequence[NabFile], profiles: dict[str, Profile] | None = None) -> dict[str, dict[str, float]]:
    """Best normalised score and its threshold for each profile: ``{profile: {"score": s, "threshold": t}}``."""
    out: dict[str, dict[str, float]] = {}
    for name, profile in (PROFILES if profiles is None else profiles).items():
        t, s = best_threshold(files, profile)
        out[name] = {"score": s, "threshold": t}
    return out
