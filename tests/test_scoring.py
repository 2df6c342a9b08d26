"""Scoring pieces against hand-computed cases: full covariance, constant sensors, the smoothed score, the
immediate path for extremes, and what training records for them."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from detector.alert import AlertMachine
from detector.config import AlertConfig
from detector.engine import Engine, score_spec
from detector.score import ScoreSpec, precision_matrix, score_windows, smooth_decay, smooth_score, smooth_update
from detector.simulate import simulate_fleet
from detector.train import ERROR_STD_FLOOR, Series, TrainParams, train_model
from tests.helpers import random_artifact, readings, sine_values

T0 = 1_700_000_000.0
ONES = torch.ones(1, 3, 2, dtype=torch.bool)


def window(*rows: tuple[float, float]) -> torch.Tensor:
    return torch.tensor([list(rows)], dtype=torch.float32)


def test_full_covariance_is_the_mahalanobis_distance_of_each_readings_error_vector() -> None:
    p = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])
    spec = ScoreSpec(torch.zeros(2), torch.ones(2), "max", precision=p)
    x = window((0.0, 0.0), (1.0, 1.0), (1.0, -1.0))
    score, _, share, _, _ = score_windows(x, torch.zeros_like(x), ONES, spec, tail=2)
    # (1, 1): 2 - 1 - 1 + 2 = 2; (1, -1): 2 + 1 + 1 + 2 = 6: errors against the usual relation count more
    assert float(score[0]) == 6.0
    assert [round(float(v), 3) for v in share[0]] == [0.5, 0.5]
    mean = dataclasses.replace(spec, aggregate="mean")
    assert float(score_windows(x, torch.zeros_like(x), ONES, mean, tail=2)[0][0]) == (2.0 + 6.0) / 4


def test_precision_matrix_of_uncorrelated_errors_is_near_the_identity_and_ignores_missing_rows() -> None:
    z = np.random.default_rng(1).standard_normal((4000, 3))
    z[::7, 1] = np.nan
    p = precision_matrix(z)
    assert np.allclose(p, np.eye(3), atol=0.1)
    assert np.array_equal(precision_matrix(z[:5]), np.eye(3)), "too few rows: the diagonal"


def test_a_constant_feature_scores_a_bounded_event_where_it_changes_and_nothing_where_it_stays() -> None:
    spec = ScoreSpec(torch.zeros(2), torch.full((2,), 1e-4), "max", constant=torch.tensor([False, True]),
                     constant_z2=50.0)
    x = window((0.0, 0.0), (0.0, 0.0), (0.0, 1e6))  # the setpoint moves by a million
    score, per_feature, share, _, zmean = score_windows(x, torch.zeros_like(x), ONES, spec, tail=2)
    assert float(score[0]) == 50.0 and share[0].tolist() == [0.0, 1.0]
    assert float(zmean[0, 1]) == 0.0, "its error never enters the smoothed score"
    stays = window((0.0, 1e6), (0.0, 1e6), (0.0, 1e6))  # at its new value: no further event
    assert float(score_windows(stays, torch.zeros_like(stays), ONES, spec, tail=2)[0][0]) == 0.0


def test_smoothed_score_by_hand() -> None:
    assert smooth_decay(4, 4.0) == 0.5 and smooth_decay(4, 0.0) == 0.0
    e = smooth_update(torch.zeros(1, 2), torch.tensor([[2.0, -4.0]]), 0.5)
    e = smooth_update(e, torch.tensor([[2.0, -4.0]]), 0.5)
    assert e.tolist() == [[1.5, -3.0]]
    spec = ScoreSpec(torch.zeros(2), torch.ones(2), smooth_decay=0.5, smooth_std=torch.tensor([0.5, 2.0]),
                     smooth_weight=2.0)
    s, part = smooth_score(e, spec)
    assert part.tolist() == [[18.0, 4.5]] and s.tolist() == [18.0]


def test_the_smoothed_score_finds_a_small_lasting_offset_that_single_readings_hide() -> None:
    rng = np.random.default_rng(0)
    K, W, F = 200, 8, 3
    x = torch.tensor(rng.standard_normal((K, W, F)), dtype=torch.float32)  # errors of one unit of noise
    x[100:, :, 2] += 0.5  # from window 100 on, sensor 2 reads half a noise unit high
    mask = torch.ones(K, W, F, dtype=torch.bool)
    spec = ScoreSpec(torch.zeros(F), torch.ones(F), "max", smooth_decay=smooth_decay(4, 32.0),
                     smooth_std=torch.full((F,), 0.25), smooth_weight=1.0)
    score, _, _, _, zmean = score_windows(x, torch.zeros_like(x), mask, spec, tail=4)
    ewma, smoothed = torch.zeros(1, F), []
    for k in range(K):
        ewma = smooth_update(ewma, zmean[k:k + 1], spec.smooth_decay)
        smoothed.append(smooth_score(ewma, spec))
    s = torch.cat([v for v, _ in smoothed]).numpy()
    top = torch.cat([p for _, p in smoothed]).argmax(dim=1).numpy()
    point = score.numpy()
    before, during = slice(50, 100), slice(130, 200)
    assert np.median(point[during]) < 1.5 * np.median(point[before]), "single readings hardly move"
    assert np.median(s[during]) > 8 * np.median(s[before]), "the smoothed score does"
    assert (top[during] == 2).mean() > 0.9, "and names the sensor that moved"


def test_the_engine_smooths_each_stream_in_order_whatever_the_batching() -> None:
    art = random_artifact(window=8, hop=4, hidden=16)
    spec = dataclasses.replace(score_spec(art.manifest), smooth_decay=0.7, smooth_std=torch.ones(3) * 0.3)
    ts = T0 + 60.0 * np.arange(200)
    v = {s: sine_values(200, seed=i) for i, s in enumerate("ab")}
    one = Engine(art)
    one.spec = spec
    rows = np.array(["a", "b"] * 200, dtype=object)
    inter = np.stack([v["a"], v["b"]], axis=1).reshape(-1, 3)
    res = one.score_batch(readings(list(rows), np.repeat(ts, 2), inter)).windows
    split = Engine(art)
    split.spec = spec
    parts = [split.score_batch(readings(list(rows[i:i + 30]), np.repeat(ts, 2)[i:i + 30], inter[i:i + 30])).windows
             for i in range(0, 400, 30)]
    got = {(r, e): sc for p in parts for r, e, sc in zip(p.rows, p.end_ts, p.score, strict=True)}
    assert len(got) == len(res)
    assert all(abs(got[(r, e)] - sc) < 1e-4 * max(1.0, sc) for r, e, sc in zip(res.rows, res.end_ts, res.score,
                                                                               strict=True))
    plain = Engine(art).score_batch(readings(list(rows), np.repeat(ts, 2), inter)).windows
    assert (res.score >= plain.score - 1e-5).all() and (res.score > plain.score + 1e-3).any()


def test_the_smoothed_error_is_per_stream_state_that_resets_with_the_stream_and_restores() -> None:
    art = random_artifact(window=8, hop=4, hidden=16)
    eng = Engine(art)
    eng.spec = dataclasses.replace(score_spec(art.manifest), smooth_decay=0.5, smooth_std=torch.ones(3))
    v = sine_values(64, seed=1)
    v[:, 0] += 20.0
    eng.score_batch(readings("m", T0 + 60.0 * np.arange(64), v))
    assert float(eng.ewma[0].abs().sum()) > 0
    saved = eng.export_rows(np.array([0]))
    eng.score_batch(readings("m", T0 + 60.0 * 64 + 86400.0 + 60.0 * np.arange(4), v[:4]))  # back after a gap
    assert float(eng.ewma[0].abs().sum()) == 0.0
    old = {k: a for k, a in saved.items() if k != "ewma"}  # a checkpoint from before the smoothed score
    assert eng.import_rows(np.array([0]), old) == []
    assert float(eng.ewma[0].abs().sum()) == 0.0 and float(eng.count[0]) == 64
    assert eng.import_rows(np.array([0]), saved) == [] and torch.equal(eng.ewma[0], torch.as_tensor(saved["ewma"][0]))


def test_one_window_far_past_critical_raises_at_once_and_the_rest_still_waits_for_k_of_n() -> None:
    def run(cfg: AlertConfig, scores: list[float]) -> list[tuple[int, str, str]]:
        m = AlertMachine(cfg, capacity=1)
        n = len(scores)
        tr = m.update(np.zeros(n, np.int64), np.arange(n, dtype=float), np.array(scores), np.full(n, 10.0),
                      np.full(n, 20.0))
        return [(int(w), str(e), str(s)) for w, e, s in zip(tr.window, tr.event, tr.severity, strict=True)]

    spike = [1, 1, 45, 1, 1, 1, 1, 1]
    assert run(AlertConfig(k=2, n=3, clear_after=2), spike) == [], "off: one window never raises"
    on = AlertConfig(k=2, n=3, clear_after=2, immediate=2.0)
    assert run(on, spike) == [(2, "raised", "critical"), (4, "cleared", "critical")]
    assert run(on, [1, 1, 39, 1, 1]) == [], "below immediate x critical: k of n as before"
    assert run(on, [12, 12, 45, 1, 1, 1]) == [(1, "raised", "warning"), (2, "escalated", "critical"),
                                              (4, "cleared", "critical")]


def test_training_names_constant_features_floors_error_spreads_and_records_the_smoothed_score() -> None:
    fleet = simulate_fleet(n_streams=3, n_features=3, n_readings=400, normal_readings=400, seed=2)
    values = [fleet.values[s].copy() for s in range(3)]
    for v in values:
        v[:, 2] = 7.0  # a valve held at one position through all training
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=1, steps_per_epoch=2, covariance="full",
                         smooth_halflife=16.0)
    _, m = train_model(Series(list(fleet.features), list(fleet.streams), values), params, progress=False)
    assert m.constant_features == [fleet.features[2]]
    assert m.constant_z2 == 2.0 * max(m.calibration_scores) > 0
    assert min(m.error_std) >= ERROR_STD_FLOOR
    assert np.shape(m.error_precision) == (3, 3) and m.covariance == "full"
    assert m.smooth_halflife == 16.0 and len(m.smooth_std) == 3 and m.smooth_weight > 0


def test_held_out_rows_cycle_through_the_whole_span_and_no_training_chunk_touches_them() -> None:
    from detector.train import CAL, TRAIN, VAL, _chunk_starts, holdout_roles

    one = holdout_roles(100, TrainParams(holdout_blocks=1), chunk_len=10)
    assert (one[:70] == TRAIN).all() and (one[70:85] == VAL).all() and (one[85:] == CAL).all(), "the plain split"
    four = holdout_roles(400, TrainParams(holdout_blocks=4), chunk_len=20)
    for a in range(0, 400, 100):  # each quarter: 70 trained on, 15 validation, 15 calibration
        assert np.bincount(four[a:a + 100], minlength=3).tolist() == [70, 15, 15]
    assert len(np.unique(holdout_roles(100, TrainParams(holdout_blocks=4), chunk_len=30))) == 3
    few = holdout_roles(100, TrainParams(holdout_blocks=4), chunk_len=30)  # 70 trained rows hold two chunks
    assert (np.diff(np.flatnonzero(few == CAL)) > 1).sum() == 1, "two cycles, not four"
    starts = _chunk_starts(four == TRAIN, 20, 5)
    assert starts and all((four[st:st + 20] == TRAIN).all() for st, _ in starts)
    assert {st // 100 for st, _ in starts} == {0, 1, 2, 3}, "chunks come from every cycle"
    short = np.array([TRAIN] * 6 + [VAL] * 3 + [TRAIN] * 8 + [CAL] * 3)
    assert _chunk_starts(short == TRAIN, 20, 4) == [(9, 17)], "no full chunk: the longest run, padded"


def test_a_normal_stretch_after_a_fault_clears() -> None:
    from detector.config import Config
    from detector.datasets import LabelledFile
    from detector.evaluate import EVAL_PARAMS, run_file

    n, start, end = 1600, 900, 1100
    values = sine_values(n, seed=5)
    values[start:end, 2] += 1.0  # pressure (spread 0.35, noise 0.05) jumps by a lasting offset, then comes back
    labels = np.zeros(n, bool)
    labels[start:end] = True
    f = LabelledFile("sine", T0 + 60.0 * np.arange(n), values, ["temp", "vibration", "pressure"], labels,
                     [(start, end - 1)], 600, "first 600 rows")
    params = dataclasses.replace(EVAL_PARAMS, epochs=8, steps_per_epoch=20)
    res = run_file(f, Config(), params)
    assert res.pred[start:end].mean() > 0.5, "the fault is caught"
    # the fault leaves the window after `window` rows, the LSTM state settles, then `clear_after` windows pass
    after = end + 6 * params.window
    assert not res.pred[after:].any(), "and the same normal operation after it is not flagged"
    assert not res.pred[params.window:start].any(), "nor before it"


def test_a_model_alerts_on_few_of_its_own_training_rows() -> None:
    """SKAB valve1/0.csv: calibrated on its last 15 % only, 148 of its 400 training rows lay inside an alert;
    with the held-back rows spread over the span (`holdout_blocks` 4, not the default: docs/evaluation.md), none."""
    from detector.config import Config
    from detector.datasets import load_skab
    from detector.evaluate import EVAL_PARAMS, run_file
    from tests.helpers import SKAB_DATA

    f = next(x for x in load_skab(SKAB_DATA / "valve1") if x.name == "valve1/0.csv")
    res = run_file(f, Config(), dataclasses.replace(EVAL_PARAMS, holdout_blocks=4))
    assert res.pred[: f.train_rows].mean() <= 0.05, "at most 5 % of the rows it learnt from are in an alert"
