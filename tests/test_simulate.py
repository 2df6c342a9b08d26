"""The simulated fleet: deterministic, physically shaped, few gaps, faults exactly where they are said."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from detector.simulate import (
    FAULT_KINDS,
    FEATURES,
    NOISE_SIGMA,
    Fault,
    Fleet,
    fleet_records,
    fleet_to_frame,
    simulate_fleet,
)

S, F, T, NORMAL = 50, 8, 5000, 2000


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return simulate_fleet(S, F, T, normal_readings=NORMAL, seed=3)


@pytest.fixture(scope="module")
def clean() -> Fleet:
    return simulate_fleet(S, F, T, normal_readings=NORMAL, seed=3, fault_fraction=0.0)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


def longest_run(mask: np.ndarray) -> int:
    """The longest run of True along the last axis."""
    best = 0
    for row in mask.reshape(-1, mask.shape[-1]):
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        best = max(best, int((ends - starts).max(initial=0)))
    return best


def test_longest_run_helper() -> None:
    assert longest_run(np.array([[0, 1, 1, 0, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], bool)) == 3
    assert longest_run(np.zeros((2, 5), bool)) == 0


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a = simulate_fleet(12, 8, 1500, normal_readings=600, seed=11)
    b = simulate_fleet(12, 8, 1500, normal_readings=600, seed=11)
    c = simulate_fleet(12, 8, 1500, normal_readings=600, seed=12)
    assert same(a.values, b.values) and a.faults == b.faults and a.streams == b.streams
    assert same(a.timestamps, b.timestamps)
    assert not same(a.values, c.values)
    assert [(f.stream, f.kind, f.start) for f in a.faults] != [(f.stream, f.kind, f.start) for f in c.faults]


def test_shapes_dtypes_and_timestamps(fleet: Fleet) -> None:
    assert fleet.values.shape == (S, T, F) and fleet.values.dtype == np.float32
    assert fleet.timestamps.shape == (T,) and fleet.timestamps.dtype == np.float64
    assert fleet.timestamps[0] == 1_700_000_000.0
    assert np.all(np.diff(fleet.timestamps) == 60.0)
    assert fleet.features == list(FEATURES) and len(set(fleet.streams)) == S
    assert all(s.startswith("pump-") for s in fleet.streams) and fleet.normal_until == NORMAL
    small = simulate_fleet(3, 2, 50, normal_readings=10, step_seconds=10.0, start=0.0, seed=1)
    assert small.values.shape == (3, 50, 2) and small.features == ["temp", "vibration_x"]
    assert small.timestamps[-1] == 490.0


def test_values_are_physically_plausible(clean: Fleet) -> None:
    v = {f: clean.values[:, :, i] for i, f in enumerate(clean.features)}
    lo_hi = {"temp": (5, 90), "vibration_x": (0.2, 6), "vibration_y": (0.1, 6), "pressure": (0.5, 10),
             "flow": (20, 250), "current": (5, 80), "rpm": (700, 3100), "voltage": (370, 430)}
    for f, (lo, hi) in lo_hi.items():
        assert lo < np.nanmin(v[f]) and np.nanmax(v[f]) < hi, f
    s = 5  # sensors that physics ties together move together
    for a, b in [("rpm", "flow"), ("rpm", "pressure"), ("rpm", "current"), ("rpm", "vibration_x"),
                 ("current", "temp")]:
        x, y = v[a][s], v[b][s]
        ok = ~np.isnan(x) & ~np.isnan(y)
        assert np.corrcoef(x[ok], y[ok])[0, 1] > 0.6, (a, b)


def test_noise_has_the_documented_scale(clean: Fleet) -> None:
    # the signal is smooth at the reading scale: first differences are noise (sigma * sqrt 2) but at ramps
    for i, f in enumerate(clean.features):
        d = np.diff(clean.values[:, :NORMAL, i].astype(np.float64), axis=1)
        mad = np.nanmedian(np.abs(d - np.nanmedian(d, axis=1, keepdims=True)), axis=1)
        est = float(np.median(1.4826 * mad / math.sqrt(2)))
        assert 0.8 * NOISE_SIGMA[f] < est < 1.3 * NOISE_SIGMA[f], (f, est)


def test_normal_period_has_no_faults_and_few_gaps(fleet: Fleet) -> None:
    assert all(f.start >= fleet.normal_until for f in fleet.faults)
    nan = np.isnan(fleet.values)
    frac = nan[:, :NORMAL].mean()
    assert 0 < frac < 0.01
    per_stream = nan.any(axis=(1, 2))
    assert 3 <= per_stream.sum() <= S - 10  # gaps only in some streams
    # no whole-reading gap longer than a few readings
    whole = nan.all(axis=2)
    assert whole.any()  # they do happen, in the default fleet
    assert longest_run(whole) <= 3
    # every stream has most of each feature
    assert nan.mean(axis=1).max() < 0.05


def test_fault_count_and_kinds(fleet: Fleet) -> None:
    assert len(fleet.faults) == 25
    assert len({f.stream for f in fleet.faults}) == 25  # one fault per faulty stream
    assert Counter(f.kind for f in fleet.faults) == {k: 5 for k in FAULT_KINDS}
    for f in fleet.faults:
        assert isinstance(f, Fault) and f.kind in FAULT_KINDS and f.stream in fleet.streams
        assert NORMAL <= f.start < f.end <= T and f.start <= T - 200
        assert f.features and set(f.features) <= set(fleet.features)
    for frac, n in [(0.0, 0), (0.2, 10), (1.0, 50)]:
        faults = simulate_fleet(S, F, 1200, normal_readings=500, fault_fraction=frac, seed=3).faults
        assert len(faults) == n
        if n >= 5:
            assert {f.kind for f in faults} == set(FAULT_KINDS)
    # a run with no room after the normal period has no faults
    assert simulate_fleet(5, 8, 300, normal_readings=300, seed=0).faults == []
    assert simulate_fleet(5, 8, 100, seed=0).normal_until == 100


def test_faults_change_exactly_their_span_and_features(fleet: Fleet, clean: Fleet) -> None:
    faulty = {f.stream: f for f in fleet.faults}
    for s, stream in enumerate(fleet.streams):
        got, ref = fleet.values[s], clean.values[s]
        assert same(np.isnan(got), np.isnan(ref))  # gaps do not depend on faults
        if stream not in faulty:
            assert same(got, ref)
            continue
        f = faulty[stream]
        assert same(got[: f.start], ref[: f.start]) and same(got[f.end:], ref[f.end:])
        others = [i for i, name in enumerate(fleet.features) if name not in f.features]
        assert same(got[f.start:f.end, others], ref[f.start:f.end, others])
        for name in f.features:
            i = fleet.features.index(name)
            sigma = NOISE_SIGMA[name]
            dev = (got[f.start:f.end, i] - ref[f.start:f.end, i]).astype(np.float64)
            dev = dev[~np.isnan(dev)]
            assert len(dev) > 0
            if f.kind == "drift":  # creeps up, ends clearly abnormal
                assert np.mean(dev) > 2.0 * sigma
                assert np.mean(dev[-max(1, len(dev) // 10):]) > 5.0 * sigma
                assert np.all(dev > 0)
            elif f.kind in ("spike", "level_shift"):  # far off, but not absurdly
                assert 5.0 * sigma < np.min(np.abs(dev)) and np.max(np.abs(dev)) < 15.0 * sigma
            elif f.kind == "noise_burst":
                assert np.std(dev) > 2.5 * sigma
                assert np.mean(np.abs(dev)) < 10.0 * sigma
            else:  # stuck: frozen at the last value before the fault, while the real signal moves
                span = got[f.start:f.end, i]
                assert np.nanmin(span) == np.nanmax(span)
                last = fleet.values[s, f.start - 1, i]
                assert np.nanmax(span) == last or np.isnan(last)
                real = ref[f.start:f.end, i]
                assert np.nanmax(real) - np.nanmin(real) > 6.0 * sigma


def test_daily_cycle_in_temperature(clean: Fleet) -> None:
    day = int(86400 / 60)

    def acf(x: np.ndarray, lag: int) -> float:
        x = np.where(np.isnan(x), np.nanmean(x), x).astype(np.float64)
        return float(np.corrcoef(x[:-lag], x[lag:])[0, 1])

    temp = clean.values[:, :, clean.features.index("temp")]
    at_day = np.array([acf(temp[s], day) for s in range(S)])
    at_half = np.array([acf(temp[s], day // 2) for s in range(S)])
    assert np.median(at_day) > 0.7 and np.mean(at_day > 0.5) > 0.8
    assert np.median(at_half) < 0.0


def test_fleet_records(fleet: Fleet) -> None:
    small = simulate_fleet(6, 5, 400, normal_readings=200, seed=4)
    recs = list(fleet_records(small))
    present = ~np.isnan(small.values).all(axis=2)  # a reading with no value at all is not sent
    assert len(recs) == int(present.sum()) and len(recs) > 0.99 * 6 * 400
    ts = [r["ts"] for r in recs]
    assert ts == sorted(ts)
    order = {s: i for i, s in enumerate(small.streams)}
    t_index = {float(t): i for i, t in enumerate(small.timestamps)}
    seen = set()
    for r in recs:
        assert set(r) == {"stream", "ts", "values"} and isinstance(r["ts"], float) and r["values"]
        s, t = order[r["stream"]], t_index[r["ts"]]
        seen.add((s, t))
        assert all(isinstance(v, float) and math.isfinite(v) for v in r["values"].values())
        row = small.values[s, t]
        assert set(r["values"]) == {f for f, v in zip(small.features, row, strict=True) if not np.isnan(v)}
        for f, v in r["values"].items():
            assert np.float32(v) == row[small.features.index(f)]
    assert len(seen) == len(recs)
    # time order: all streams at t before any at t + 1
    assert [t_index[r["ts"]] for r in recs] == sorted(t_index[r["ts"]] for r in recs)
    part = list(fleet_records(small, 100, 110))
    assert {t_index[r["ts"]] for r in part} == set(range(100, 110))
    first = list(fleet_records(fleet, 0, 40))
    assert len(first) == int((~np.isnan(fleet.values[:, :40]).all(axis=2)).sum())
    with pytest.raises(ValueError):
        next(fleet_records(small, 10, 5))


def test_fleet_records_complete_when_no_whole_reading_gap() -> None:
    small = simulate_fleet(4, 8, 300, normal_readings=150, seed=2)
    assert not np.isnan(small.values).all(axis=2).any()
    assert len(list(fleet_records(small))) == 4 * 300


def test_fleet_to_frame() -> None:
    small = simulate_fleet(5, 4, 300, normal_readings=150, seed=6)
    df = fleet_to_frame(small)
    assert list(df.columns) == ["timestamp", "stream", *small.features]
    assert len(df) == 5 * 300
    assert df["timestamp"].is_monotonic_increasing
    assert int(df[small.features].isna().to_numpy().sum()) == int(np.isnan(small.values).sum())
    row = df.iloc[7]  # time 1, stream 2
    assert row["stream"] == small.streams[2] and row["timestamp"] == small.timestamps[1]
    assert same(row[small.features].to_numpy(np.float32), small.values[2, 1])
    part = fleet_to_frame(small, 10, 20)
    assert len(part) == 50 and part["timestamp"].iloc[0] == small.timestamps[10]
    assert same(part[part["stream"] == small.streams[3]][small.features].to_numpy(np.float32),
                small.values[3, 10:20])


def test_regime_changes_move_the_operating_point_of_fault_free_streams_for_good(fleet: Fleet) -> None:
    shifted = simulate_fleet(S, F, T, normal_readings=NORMAL, seed=3, n_regimes=3)
    assert fleet.regimes == [] and len(shifted.regimes) == 3
    assert shifted.faults == fleet.faults, "the faults do not move"
    faulty = {f.stream for f in fleet.faults}
    moved = {r.stream: r for r in shifted.regimes}
    assert not faulty & set(moved), "a regime change never falls on a faulty stream"
    p, q = fleet.features.index("pressure"), fleet.features.index("flow")
    for s, stream in enumerate(fleet.streams):
        got, ref = shifted.values[s], fleet.values[s]
        if stream not in moved:
            assert same(got, ref)
            continue
        r = moved[stream]
        assert NORMAL < r.start < T - 1000 and r.features == ("pressure", "flow")
        assert same(got[: r.start], ref[: r.start])
        others = [i for i in range(F) if i not in (p, q)]
        assert same(got[:, others], ref[:, others]), "only the valve's sensors move"
        later = slice(r.start + 20, T)
        assert np.nanmin(got[later, p] - ref[later, p]) > 2.4, "pressure up by 2.5 bar or more, to the end"
        assert np.nanmax(got[later, q] / ref[later, q]) < 0.71, "flow down by 30 % or more, to the end"
    with pytest.raises(ValueError, match="n_regimes"):
        simulate_fleet(10, 8, 500, normal_readings=200, n_regimes=6)  # 5 of 10 streams are faulty


def test_invalid_arguments() -> None:
    for kwargs in [{"n_streams": 0}, {"n_features": 9}, {"n_features": 0}, {"fault_fraction": 1.5},
                   {"normal_readings": -1}, {"step_seconds": 0.0}]:
        with pytest.raises(ValueError):
            simulate_fleet(**{"n_readings": 100, **kwargs})
