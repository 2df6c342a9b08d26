"""NAB scoring: hand-computed cases, the fast threshold sweep against brute force, and the published corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from detector.nab import (
    PROFILES,
    FileScore,
    NabFile,
    Profile,
    best_threshold,
    file_score,
    load_profiles,
    merge_windows,
    nab_scores,
    normalised_score,
    null_score,
    perfect_score,
    probationary_rows,
    scaled_sigmoid,
    threshold_curve,
    windows_to_rows,
)

NAB_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NAB"
STD = PROFILES["standard"]


def sig(y: float) -> float:
    """Reference sigma, written as in the README."""
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def detections(n: int, rows: list[int]) -> np.ndarray:
    det = np.zeros(n, dtype=bool)
    det[rows] = True
    return det


# ---------------------------------------------------------------------------------------------- basics


def test_scaled_sigmoid_values() -> None:
    assert scaled_sigmoid(0.0) == 0.0
    assert scaled_sigmoid(-1.0) == pytest.approx(2.0 / (1.0 + math.exp(-5.0)) - 1.0, abs=1e-12)
    assert scaled_sigmoid(-1.0) == pytest.approx(0.986614, abs=1e-6)
    assert scaled_sigmoid(1.0) == pytest.approx(-0.986614, abs=1e-6)
    assert scaled_sigmoid(1000.0) == -1.0  # no overflow far past a window
    ys = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(scaled_sigmoid(ys), [sig(y) for y in ys], atol=1e-12)


def test_probationary_rows() -> None:
    assert probationary_rows(0) == 0
    assert probationary_rows(10) == 1  # floor(1.5)
    assert probationary_rows(100) == 15
    assert probationary_rows(4032) == 604  # floor(604.8)
    assert probationary_rows(5000) == 750
    assert probationary_rows(5001) == 750  # 750.15 capped
    assert probationary_rows(22695) == 750


def test_profiles_constants_match_nab_config() -> None:
    assert PROFILES["standard"] == Profile(tp=1.0, fp=0.11, fn=1.0)
    assert PROFILES["reward_low_FP_rate"] == Profile(tp=1.0, fp=0.22, fn=1.0)
    assert PROFILES["reward_low_FN_rate"] == Profile(tp=1.0, fp=0.11, fn=2.0)
    assert load_profiles() == PROFILES
    path = NAB_DIR / "config" / "profiles.json"
    assert path.is_file(), f"NAB data missing: {path} (expected ../shared/data/NAB next to the repository)"
    assert load_profiles(path) == PROFILES


def test_windows_to_rows_inclusive_bounds() -> None:
    ts = 1_400_000_000.0 + 300.0 * np.arange(20)  # every 5 minutes
    wins = [
        (ts[3], ts[6]),  # exactly on rows: both ends included
        (ts[9] + 1.0, ts[12] - 1.0),  # between rows: rows 10..11
        (ts[19], ts[19] + 1e6),  # runs past the end
        (ts[0] - 1e6, ts[0] - 1.0),  # before the data: dropped
    ]
    assert windows_to_rows(ts, wins) == [(3, 6), (10, 11), (19, 19)]
    assert windows_to_rows(ts, []) == []


def test_merge_windows() -> None:
    assert merge_windows([]) == []
    assert merge_windows([(40, 49), (45, 54)]) == [(40, 54)]
    assert merge_windows([(70, 80), (10, 20), (20, 25), (75, 76)]) == [(10, 25), (70, 80)]
    assert merge_windows([(10, 20), (21, 30)]) == [(10, 20), (21, 30)]  # adjacent, not overlapping
    with pytest.raises(ValueError):
        merge_windows([(5, 4)])


# ------------------------------------------------------------------------------- hand-computed file scores
# 100 rows: probation = floor(0.15 * 100) = 15 rows (0..14). One window, rows 40..49: width 10.
# In the window y = (row - (49 + 1)) / 10 (-1 at row 40); after it y = (row - 49) / (10 - 1).

N = 100
WIN = [(40, 49)]


def test_hand_computed_mixed_file() -> None:
    # row 20: before any window             -> -A_FP                           = -0.11
    # row 42: y = (42 - 50) / 10 = -0.8     -> sig(-0.8) / sig(-1) = tanh(2) / tanh(2.5) = +0.977107
    # row 45: later in the same window      -> ignored (only the earliest counts)
    # row 60: y = (60 - 49) / 9 = 1.2222    -> 0.11 * sig(11/9) = -0.11 * tanh(3.0556) = -0.109513
    # total = -0.11 + 0.977107 - 0.109513 = 0.757594
    expected = -0.11 + sig(-0.8) / sig(-1.0) + 0.11 * sig(11 / 9)
    assert expected == pytest.approx(0.757594, abs=1e-6)
    got = file_score(detections(N, [20, 42, 45, 60]), WIN, STD)
    assert got.score == pytest.approx(expected, abs=1e-12)
    assert (got.tp, got.fp, got.fn) == (1, 2, 0)


def test_left_edge_earns_exactly_a_tp() -> None:
    for profile in PROFILES.values():
        got = file_score(detections(N, [40]), WIN, profile)
        assert got.score == pytest.approx(profile.tp, abs=1e-12)
        assert (got.tp, got.fp, got.fn) == (1, 0, 0)


def test_right_edge_earns_little() -> None:
    # row 49: y = (49 - 50) / 10 = -0.1 -> tanh(0.25) / tanh(2.5) = 0.248242
    got = file_score(detections(N, [49]), WIN, STD)
    assert got.score == pytest.approx(sig(-0.1) / sig(-1.0), abs=1e-12)
    assert got.score == pytest.approx(0.248242, abs=1e-6)


def test_missed_window_costs_a_fn() -> None:
    assert file_score(np.zeros(N, dtype=bool), WIN, STD) == FileScore(score=-1.0, tp=0, fp=0, fn=1)
    low_fn = file_score(np.zeros(N, dtype=bool), WIN, PROFILES["reward_low_FN_rate"])
    assert low_fn.score == -2.0


def test_only_earliest_detection_in_window_counts() -> None:
    one = file_score(detections(N, [42]), WIN, STD)
    many = file_score(detections(N, [42, 43, 47, 49]), WIN, STD)
    assert many.score == pytest.approx(one.score, abs=1e-12)
    assert (many.tp, many.fp, many.fn) == (1, 0, 0)


def test_fp_cost_grows_with_distance_after_window() -> None:
    # row 50: y = 1/9  -> 0.11 * sig(1/9)  = -0.029793 (just after: small)
    # row 99: y = 50/9 -> 0.11 * sig(50/9) = -0.110000 (far: nearly -A_FP)
    # the window itself is detected at its left edge (+1) so only the FP differs.
    near = file_score(detections(N, [40, 50]), WIN, STD).score - 1.0
    far = file_score(detections(N, [40, 99]), WIN, STD).score - 1.0
    assert near == pytest.approx(0.11 * sig(1 / 9), abs=1e-12)
    assert near == pytest.approx(-0.029793, abs=1e-6)
    assert far == pytest.approx(-0.11, abs=1e-9)
    assert -0.11 < far < near < 0


def test_fp_between_windows_uses_preceding_window_width() -> None:
    wins = [(30, 39), (70, 89)]  # widths 10 and 20
    # row 50: after the first window: y = (50 - 39) / 9   -> 0.11 * sig(11/9) = -0.109513
    # row 95: after the second:       y = (95 - 89) / 19  -> 0.11 * sig(6/19) = -0.072392
    # both windows missed: -2
    got = file_score(detections(N, [50, 95]), wins, STD)
    expected = 0.11 * sig(11 / 9) + 0.11 * sig(6 / 19) - 2.0
    assert got.score == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(-2.181905, abs=1e-6)
    assert (got.tp, got.fp, got.fn) == (0, 2, 2)


def test_probationary_detections_count_for_nothing() -> None:
    probe = file_score(detections(N, list(range(15))), WIN, STD)
    assert probe == FileScore(score=-1.0, tp=0, fp=0, fn=1)
    # row 15 is the first scored row: a false detection before the window.
    first = file_score(detections(N, [15]), WIN, STD)
    assert first.score == pytest.approx(-1.11, abs=1e-12)
    assert first.fp == 1
    # a window wholly inside the probationary period is not scored at all.
    assert file_score(detections(N, [5]), [(2, 8)], STD) == FileScore(score=0.0, tp=0, fp=0, fn=0)


def test_overlapping_windows_are_merged() -> None:
    # (40, 49) and (45, 54) -> one window 40..54, width 15.
    # row 52: y = (52 - 55) / 15 = -0.2 -> tanh(0.5) / tanh(2.5) = 0.468387
    # row 60: y = (60 - 54) / 14        -> 0.11 * sig(6/14)
    det = detections(N, [52, 60])
    got = file_score(det, [(40, 49), (45, 54)], STD)
    assert got == file_score(det, [(40, 54)], STD)
    assert got.score == pytest.approx(sig(-0.2) / sig(-1.0) + 0.11 * sig(6 / 14), abs=1e-12)
    assert (got.tp, got.fp, got.fn) == (1, 1, 0)


def test_no_windows_only_false_positives() -> None:
    got = file_score(detections(N, [10, 20, 30]), [], STD)  # row 10 is probationary
    assert got == FileScore(score=pytest.approx(-0.22), tp=0, fp=2, fn=0)


# ------------------------------------------------------------------------------------------ normalisation


def _two_files() -> list[NabFile]:
    rng = np.random.default_rng(0)
    a = NabFile(rng.uniform(0, 0.5, 200), [(60, 79), (120, 139)], "a")
    b = NabFile(rng.uniform(0, 0.5, 100), [(40, 49)], "b")
    return [a, b]


def test_null_and_perfect_raw_scores() -> None:
    files = _two_files()
    assert null_score(files, STD) == -3.0
    assert perfect_score(files, STD) == 3.0
    assert null_score(files, PROFILES["reward_low_FN_rate"]) == -6.0


def test_null_detector_scores_zero_and_perfect_scores_hundred() -> None:
    files = _two_files()
    perfect = []
    for f in files:
        s = np.zeros(len(f.scores))
        s[[a for a, _ in f.windows]] = 1.0
        perfect.append(NabFile(s, f.windows, f.name))
    for profile in PROFILES.values():
        assert normalised_score(files, profile, threshold=2.0) == pytest.approx(0.0, abs=1e-12)
        assert normalised_score(perfect, profile, threshold=1.0) == pytest.approx(100.0, abs=1e-12)
        assert best_threshold(perfect, profile) == (1.0, pytest.approx(100.0, abs=1e-12))


def test_best_threshold_returns_null_when_every_detection_hurts() -> None:
    # Only false positives above 0.5; in-window scores are 0.
    s = np.zeros(100)
    s[[20, 60, 70]] = 0.9
    files = [NabFile(s, [(40, 49)])]
    t, score = best_threshold(files, STD)
    assert score == 0.0
    assert t > 0.9
    assert normalised_score(files, STD, t) == 0.0


def test_normalisation_needs_a_window() -> None:
    with pytest.raises(ValueError):
        normalised_score([NabFile(np.zeros(50), [])], STD, 0.5)


# ----------------------------------------------------------------------------- fast sweep vs brute force


def _random_files(seed: int) -> list[NabFile]:
    rng = np.random.default_rng(seed)
    files = []
    for i in range(int(rng.integers(2, 6))):
        n = int(rng.integers(40, 300))
        scores = np.round(rng.uniform(0, 1, n) ** 3, 2)  # many ties, most scores small
        windows = []
        for _ in range(int(rng.integers(0, 4))):
            left = int(rng.integers(0, n - 5))
            windows.append((left, min(n - 1, left + int(rng.integers(0, n // 5 + 2)))))
        files.append(NabFile(scores, windows, f"f{i}"))
    if not any(w for f in files for w in f.windows):
        files[0] = NabFile(files[0].scores, [(len(files[0].scores) - 10, len(files[0].scores) - 1)], "f0")
    return files


@pytest.mark.parametrize("seed", range(12))
def test_best_threshold_matches_brute_force(seed: int) -> None:
    files = _random_files(seed)
    candidates = np.unique(np.concatenate([f.scores for f in files]))[::-1]
    for profile in PROFILES.values():
        brute = {float(t): normalised_score(files, profile, float(t)) for t in candidates}
        best_t, best = best_threshold(files, profile)
        assert best == pytest.approx(max(0.0, *brute.values()), abs=1e-9)
        assert normalised_score(files, profile, best_t) == pytest.approx(best, abs=1e-9)
        thresholds, curve = threshold_curve(files, profile)
        for t, s in zip(thresholds, curve, strict=True):
            assert s == pytest.approx(brute[float(t)], abs=1e-9)


# ------------------------------------------------------------------------------------- published corpus


def load_published(results_dir: Path, windows_json: Path) -> list[NabFile]:
    """One NabFile per labelled data file, scores from a detector's published per-row results."""
    labels = json.loads(windows_json.read_text())
    files = []
    for rel, wins in sorted(labels.items()):
        df = pd.read_csv(results_dir / rel, usecols=["timestamp", "anomaly_score"])
        ts = pd.to_datetime(df["timestamp"]).to_numpy("datetime64[ns]").astype(np.int64) / 1e9
        bounds = [(pd.Timestamp(a).value / 1e9, pd.Timestamp(b).value / 1e9) for a, b in wins]
        rows = windows_to_rows(ts, bounds)
        assert len(rows) == len(wins), f"{rel}: a labelled window holds no rows"
        files.append(NabFile(df["anomaly_score"].to_numpy(np.float64), rows, rel))
    return files


@pytest.fixture(scope="module")
def published() -> dict[str, list[NabFile]]:
    windows_json = NAB_DIR / "labels" / "combined_windows.json"
    assert windows_json.is_file(), f"NAB data missing: {windows_json} (expected ../shared/data/NAB)"
    return {det: load_published(NAB_DIR / "results" / det, windows_json) for det in ("ARTime", "numenta")}


@pytest.mark.parametrize(
    ("detector", "expected"),
    [
        ("ARTime", {"standard": 74.85, "reward_low_FP_rate": 65.15, "reward_low_FN_rate": 80.36}),
        ("numenta", {"standard": 70.10, "reward_low_FP_rate": 63.2, "reward_low_FN_rate": 74.32}),
    ],
)
def test_published_corpus_scores(published: dict[str, list[NabFile]], detector: str, expected: dict) -> None:
    files = published[detector]
    assert len(files) == 58
    assert sum(len(f.scores) for f in files) == 365_558
    assert sum(len(f.windows) for f in files) == 116
    got = nab_scores(files)
    assert set(got) == set(expected)
    for profile, score in expected.items():
        assert got[profile]["score"] == pytest.approx(score, abs=0.06), (profile, got[profile])
        t = got[profile]["threshold"]
        assert normalised_score(files, PROFILES[profile], t) == pytest.approx(got[profile]["score"], abs=1e-9)
