"""Point-wise and event metrics on small hand-computed cases, edge cases included."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from detector.quality import (
    Attribution,
    EventMetrics,
    PointMetrics,
    attribution,
    combine_attribution,
    combine_events,
    combine_points,
    event_metrics,
    moved_features,
    point_adjusted,
    point_metrics,
    rows_to_windows,
    windows_to_labels,
)


def b(s: str) -> np.ndarray:
    """'0110' -> array([False, True, True, False])."""
    return np.array([c == "1" for c in s], dtype=bool)


# --- rows_to_windows / windows_to_labels -------------------------------------------------------------------------


def test_rows_to_windows_finds_maximal_runs_including_the_ends() -> None:
    assert rows_to_windows(b("1100111010")) == [(0, 1), (4, 6), (8, 8)]
    assert rows_to_windows(b("0001")) == [(3, 3)]
    assert rows_to_windows(b("1111")) == [(0, 3)]
    assert rows_to_windows(b("0000")) == []
    assert rows_to_windows(np.zeros(0, dtype=bool)) == []
    assert rows_to_windows(np.array([0, 1, 1, 0])) == [(1, 2)]  # 0/1 integers are accepted
    assert all(type(x) is int for w in rows_to_windows(b("0110")) for x in w)


def test_windows_to_labels_is_the_inverse_and_merges_overlaps() -> None:
    labels = b("0110011101")
    assert (windows_to_labels(rows_to_windows(labels), 10) == labels).all()
    assert (windows_to_labels([(1, 3), (2, 5)], 7) == b("0111110")).all()
    assert not windows_to_labels([], 4).any()


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="booleans or 0/1"):
        point_metrics(np.array([0.2, 0.9]), b("01"))
    with pytest.raises(ValueError, match="rows"):
        point_metrics(b("011"), b("01"))
    with pytest.raises(ValueError, match="inside"):
        event_metrics(b("0000"), [(2, 4)])  # row 4 does not exist
    with pytest.raises(ValueError, match="inside"):
        event_metrics(b("0000"), [(3, 2)])  # start after end
    with pytest.raises(ValueError, match="n_rows"):
        event_metrics(b("0000"), [], n_rows=5)


# --- point_metrics ------------------------------------------------------------------------------------------------


def test_point_metrics_by_hand() -> None:
    # row:    0 1 2 3 4 5 6 7 8 9
    # pred:   1 1 0 0 1 0 0 0 1 0
    # label:  1 0 0 0 1 1 1 0 0 0
    # TP = rows 0,4 = 2; FP = rows 1,8 = 2; FN = rows 5,6 = 2; TN = 10 - 6 = 4
    m = point_metrics(b("1100100010"), b("1000111000"))
    assert (m.tp, m.fp, m.tn, m.fn) == (2, 2, 4, 2)
    assert m.precision == pytest.approx(2 / 4)  # TP / (TP + FP)
    assert m.recall == pytest.approx(2 / 4)  # TP / (TP + FN)
    assert m.f1 == pytest.approx(0.5)  # 2 * .5 * .5 / (.5 + .5)
    assert m.far == pytest.approx(2 / 6)  # FP / (FP + TN)
    assert m.mar == pytest.approx(2 / 4)  # FN / (FN + TP)


def test_point_metrics_unequal_precision_and_recall() -> None:
    # pred 1 1 1 1 0 0, label 1 0 0 0 0 1: TP 1, FP 3, FN 1, TN 1
    m = point_metrics(b("111100"), b("100001"))
    assert (m.tp, m.fp, m.tn, m.fn) == (1, 3, 1, 1)
    assert m.precision == pytest.approx(0.25) and m.recall == pytest.approx(0.5)
    assert m.f1 == pytest.approx(2 * 0.25 * 0.5 / 0.75)  # = 1/3
    assert m.far == pytest.approx(0.75) and m.mar == pytest.approx(0.5)


def test_point_metrics_zero_division_is_zero() -> None:
    # nothing predicted, two anomalous rows: precision 0/0 -> 0, recall 0/2, MAR 2/2, FAR 0/2
    m = point_metrics(b("0000"), b("0110"))
    assert (m.precision, m.recall, m.f1, m.far, m.mar) == (0.0, 0.0, 0.0, 0.0, 1.0)
    # no anomalous row, one alarm: recall 0/0 -> 0, MAR 0/0 -> 0, FAR 1/4
    m = point_metrics(b("0100"), b("0000"))
    assert (m.precision, m.recall, m.f1, m.far, m.mar) == (0.0, 0.0, 0.0, 0.25, 0.0)
    # all rows anomalous and all predicted: FAR 0/0 -> 0, perfect otherwise
    m = point_metrics(b("111"), b("111"))
    assert (m.precision, m.recall, m.f1, m.far, m.mar) == (1.0, 1.0, 1.0, 0.0, 0.0)
    # empty input: every count and rate 0
    m = point_metrics(np.zeros(0, bool), np.zeros(0, bool))
    assert m == PointMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0)


def test_combine_points_sums_counts_not_rates() -> None:
    a = point_metrics(b("1100"), b("1000"))  # TP 1, FP 1, TN 2, FN 0: precision 0.5
    c = point_metrics(b("0000"), b("0011"))  # TP 0, FP 0, TN 2, FN 2: precision 0 (0/0)
    m = combine_points([a, c])
    # totals TP 1, FP 1, TN 4, FN 2: precision 1/2, recall 1/3, F1 2*(1/2)(1/3)/(5/6) = 0.4, FAR 1/5, MAR 2/3
    assert (m.tp, m.fp, m.tn, m.fn) == (1, 1, 4, 2)
    assert m.precision == pytest.approx(0.5) and m.recall == pytest.approx(1 / 3) and m.f1 == pytest.approx(0.4)
    assert m.far == pytest.approx(0.2) and m.mar == pytest.approx(2 / 3)
    assert combine_points([]) == PointMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0)


# --- event_metrics ------------------------------------------------------------------------------------------------


def test_event_metrics_by_hand() -> None:
    # rows:    0123456789012345678 9
    # windows:   [--]      [---]       (2..5) and (12..16); a third (18..19) is missed
    # pred:    0000110011000011000 0
    # window (2,5): first detection row 4, delay 4 - 2 = 2; window (12,16): row 14, delay 2; (18,19) missed
    # predicted runs: (4,5) in a window, (8,9) outside every window -> 1 false event, (14,15) in a window
    pred = b("00001100110000110000")
    m = event_metrics(pred, [(2, 5), (12, 16), (18, 19)])
    assert (m.caught, m.missed, m.false_events) == (2, 1, 1)
    assert m.delays == [2.0, 2.0]
    assert m.precision == pytest.approx(2 / 3)  # caught / (caught + false events)
    assert m.recall == pytest.approx(2 / 3)  # caught / windows
    assert m.f1 == pytest.approx(2 / 3)


def test_detection_on_the_last_row_of_a_window_counts_and_one_after_does_not() -> None:
    # window (3,6); detection at row 6: caught with delay 3, no false event
    m = event_metrics(b("0000001000"), [(3, 6)])
    assert (m.caught, m.missed, m.false_events, m.delays) == (1, 0, 0, [3.0])
    # detection at row 7, just after the window: missed, and the run (7,7) is a false event
    m = event_metrics(b("0000000100"), [(3, 6)])
    assert (m.caught, m.missed, m.false_events, m.delays) == (0, 1, 1, [])
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)


def test_a_run_touching_a_window_is_not_false_and_one_ending_just_before_it_is() -> None:
    # window (4,7). Run (1,4) overlaps the window's first row: it catches it with delay 0 and is not false.
    m = event_metrics(b("0111100000"), [(4, 7)])
    assert (m.caught, m.false_events, m.delays) == (1, 0, [0.0])
    # run (1,3) ends on row 3, just before the window: a false event; the window is missed
    m = event_metrics(b("0111000000"), [(4, 7)])
    assert (m.caught, m.missed, m.false_events) == (0, 1, 1)
    # run (6,9) starts inside and runs past the right edge: caught with delay 6 - 4 = 2, not false
    m = event_metrics(b("0000001111"), [(4, 7)])
    assert (m.caught, m.false_events, m.delays) == (1, 0, [2.0])


def test_one_run_across_two_windows_catches_both() -> None:
    # windows (1,2) and (5,6); run (2,5) covers the gap: both caught (delays 2-1=1, 5-5=0), no false event
    m = event_metrics(b("00111100"), [(1, 2), (5, 6)])
    assert (m.caught, m.missed, m.false_events, m.delays) == (2, 0, 0, [1.0, 0.0])
    assert m.precision == 1.0 and m.recall == 1.0 and m.f1 == 1.0


def test_event_metrics_without_windows() -> None:
    # no windows and two separate alarm runs: 2 false events; precision 0/(0+2) = 0, recall 0/0 -> 0
    m = event_metrics(b("1100010"), [])
    assert m == EventMetrics(0.0, 0.0, 0.0, 0, 0, 2, [])
    # no windows, no alarms: everything 0
    assert event_metrics(b("0000"), [], n_rows=4) == EventMetrics(0.0, 0.0, 0.0, 0, 0, 0, [])
    # empty file
    assert event_metrics(np.zeros(0, bool), []) == EventMetrics(0.0, 0.0, 0.0, 0, 0, 0, [])


def test_combine_events_sums_counts_and_pools_delays() -> None:
    a = event_metrics(b("0011000100"), [(2, 4)])  # caught (delay 0), false run (7,7): 1, 0, 1
    c = event_metrics(b("0000000010"), [(1, 3), (6, 9)])  # (1,3) missed; (6,9) caught at 8, delay 2: 1, 1, 0
    m = combine_events([a, c])
    # caught 2, missed 1, false 1: precision 2/3, recall 2/3
    assert (m.caught, m.missed, m.false_events, m.delays) == (2, 1, 1, [0.0, 2.0])
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3) and m.f1 == pytest.approx(2 / 3)
    assert combine_events([]) == EventMetrics(0.0, 0.0, 0.0, 0, 0, 0, [])


# --- point_adjusted -----------------------------------------------------------------------------------------------


def test_point_adjust_fills_detected_windows_only() -> None:
    # windows (1,3) and (6,8); one alarm at row 2 (inside the first), one at row 5 (outside both)
    pred = b("0010010000")
    adj = point_adjusted(pred, [(1, 3), (6, 8)])
    assert (adj == b("0111010000")).all()  # first window filled, second untouched, the outside alarm kept
    assert (pred == b("0010010000")).all(), "the input is not modified"
    # the inflation it causes: plain recall 1/6, point-adjusted 3/6
    labels = windows_to_labels([(1, 3), (6, 8)], 10)
    assert point_metrics(pred, labels).recall == pytest.approx(1 / 6)
    assert point_metrics(adj, labels).recall == pytest.approx(3 / 6)
    # a detection on a window's last row fills it too; no windows leaves the prediction as it was
    assert (point_adjusted(b("00010"), [(1, 3)]) == b("01110")).all()
    assert (point_adjusted(b("01001"), []) == b("01001")).all()


# --- attribution: which sensors an anomaly moved -----------------------------------------------------------------


def sides_and_window(inside: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """30 rows: 10 normal (0, 2, 0, ...: mean 1, sd 1), 10 anomalous at `inside`, 10 normal (10, 12, ...: mean 11)."""
    alt = np.tile([0.0, 2.0], 5)
    x = np.stack([np.r_[alt, np.full(10, v), alt + 10] for v in inside], axis=1)
    y = np.zeros(30, bool)
    y[10:20] = True
    return x, y


def test_a_sensor_is_moved_when_its_mean_leaves_the_range_of_both_sides_by_k_deviations() -> None:
    x, y = sides_and_window([15.0, 13.5, 5.0, -2.5])
    # beyond the sides' means (1 and 11) by 4, 2.5, 0 (between them: a drift) and 3.5 deviations
    assert moved_features(x, (10, 19), y).tolist() == [True, False, False, True]
    assert moved_features(x, (10, 19), y, k=2.0).tolist() == [True, True, False, True]


def test_moved_features_uses_one_side_when_the_anomaly_ends_the_file_and_skips_missing_values() -> None:
    x, y = sides_and_window([5.0, 3.5])
    x[12, 0] = np.nan
    assert moved_features(x[:20], (10, 19), y[:20]).tolist() == [True, False]  # 4 and 2.5 above mean 1
    assert moved_features(x[10:20], (0, 9), y[10:20]).tolist() == [False, False], "no normal rows: nothing known"
    x, y = sides_and_window([15.0, 15.0])
    x[10:20, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert moved_features(x, (10, 19), y).tolist() == [True, False], "no value inside: not moved"


def test_attribution_scores_alerts_inside_windows_against_the_sensors_moved() -> None:
    x, y = sides_and_window([15.0, 5.0])
    names = ["flow", "temp"]
    raised = [(3, "temp"), (11, "flow"), (12, "temp"), (14, "pressure"), (25, "flow")]
    moved = [moved_features(x, (10, 19), y)]
    assert attribution(raised, [(10, 19)], moved, names) == Attribution(alerts=3, right=1, undecided=0)
    x, y = sides_and_window([5.0, 5.0])  # the window moved neither sensor: nothing to score against
    moved = [moved_features(x, (10, 19), y)]
    assert attribution(raised, [(10, 19)], moved, names) == Attribution(alerts=0, right=0, undecided=3)
    assert Attribution(0, 0).share == 0.0 and Attribution(4, 3).share == 0.75
    assert combine_attribution([Attribution(3, 1), Attribution(0, 0, 3), Attribution(4, 3, 1)]) == Attribution(7, 4, 4)
