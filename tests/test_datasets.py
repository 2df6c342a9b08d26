"""Labelled-data loaders against the real NAB and SKAB files (read in place) and small generic CSVs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from detector.datasets import (
    LabelledFile,
    load_dataset,
    load_labelled_csv,
    load_nab,
    load_skab,
    load_skab_anomaly_free,
)
from detector.errors import DataError
from tests.helpers import SKAB_SLICES, skab_layout

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NAB, SKAB = DATA / "NAB", DATA / "SKAB"
MACHINE = "realKnownCause/machine_temperature_system_failure.csv"
SENSORS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
           "Voltage", "Volume Flow RateRMS"]


@pytest.fixture(scope="module")
def data() -> Path:
    if not (NAB / "labels" / "combined_windows.json").is_file() or not (SKAB / "valve1").is_dir():
        pytest.fail(f"the labelled benchmark data is missing: expected NAB/ and SKAB/ under {DATA}")
    return DATA


@pytest.fixture(scope="module")
def nab(data: Path) -> list[LabelledFile]:
    return load_nab(NAB)  # all 58 files take about half a second


def check_shape(f: LabelledFile) -> None:
    n = len(f.timestamps)
    assert f.timestamps.dtype == np.float64 and f.timestamps.shape == (n,)
    assert f.values.dtype == np.float32 and f.values.shape == (n, len(f.features))
    assert f.labels.dtype == bool and f.labels.shape == (n,)
    assert 0 <= f.train_rows <= n
    for a, b in f.windows:
        assert 0 <= a <= b < n and f.labels[a : b + 1].all()
    assert int(f.labels.sum()) == sum(b - a + 1 for a, b in f.windows)


# --- NAB ----------------------------------------------------------------------------------------------------------


def test_nab_files_sorted_with_shapes_and_the_probationary_rule(nab: list[LabelledFile]) -> None:
    assert len(nab) == 58 and sum(len(f.labels) for f in nab) == 365_558  # the README's counts
    names = [f.name for f in nab]
    assert names == sorted(names) and MACHINE in names
    for f in nab:
        check_shape(f)
        assert f.features == ["value"]
        assert f.train_rows == min(math.floor(0.15 * len(f.labels)), 750)
        assert f.protocol.startswith("nab:")
        assert np.isfinite(f.timestamps).all() and f.timestamps[0] > 1e9  # epoch seconds, not ms or us
    by = {f.name: f for f in nab}
    assert by["realKnownCause/nyc_taxi.csv"].train_rows == 750  # 10,320 rows: 0.15 * T = 1548 > 750
    assert by["realTraffic/TravelTime_387.csv"].train_rows == 375  # 2,500 rows: floor(375.0)


def test_nab_timestamps_in_file_order(nab: list[LabelledFile]) -> None:
    f = {x.name: x for x in nab}["realKnownCause/nyc_taxi.csv"]
    assert (np.diff(f.timestamps) == 1800).all()  # half-hourly, strictly increasing
    raw = pd.read_csv(NAB / "data" / MACHINE)
    m = {x.name: x for x in nab}[MACHINE]
    assert m.timestamps[0] == pd.Timestamp(raw["timestamp"].iloc[0], tz="UTC").timestamp()
    assert np.allclose(m.values[:, 0], raw["value"].to_numpy(), rtol=1e-6)
    # the file itself steps back one hour at row 10149 (02:55 -> 02:00): rows are kept in file order, as NAB
    # scores them, so the published per-row results line up
    assert m.timestamps[10149] - m.timestamps[10148] == -3300


def test_nab_machine_temperature_windows_agree_with_the_label_file(nab: list[LabelledFile]) -> None:
    spans = json.loads((NAB / "labels" / "combined_windows.json").read_text())[MACHINE]
    f = {x.name: x for x in nab}[MACHINE]
    assert len(spans) == 4 and len(f.windows) == 4 and len(f.labels) == 22_695
    raw = pd.to_datetime(pd.read_csv(NAB / "data" / MACHINE)["timestamp"], utc=True)
    expect = np.zeros(len(raw), dtype=bool)
    for (start, end), (a, b) in zip(spans, f.windows, strict=True):
        t0, t1 = pd.Timestamp(start, tz="UTC"), pd.Timestamp(end, tz="UTC")
        rows = np.flatnonzero(((raw >= t0) & (raw <= t1)).to_numpy())
        assert (a, b) == (rows[0], rows[-1])
        assert f.timestamps[a] == t0.timestamp() and f.timestamps[b] == t1.timestamp()
        expect[rows] = True
    assert (f.labels == expect).all()
    # each window spans 10% of the rows over 4 anomalies: 22,695 * 0.1 / 4 = 567 rows
    assert [b - a + 1 for a, b in f.windows] == [567] * 4
    assert f.windows[0] == (2126, 2692)


def test_nab_limit_and_files_without_windows(data: Path) -> None:
    files = load_nab(NAB, limit=3)
    assert [f.name for f in files] == ["artificialNoAnomaly/art_daily_no_noise.csv",
                                       "artificialNoAnomaly/art_daily_perfect_square_wave.csv",
                                       "artificialNoAnomaly/art_daily_small_noise.csv"]
    for f in files:
        check_shape(f)
        assert f.windows == [] and not f.labels.any() and f.train_rows == 604  # floor(0.15 * 4032)


# --- SKAB ---------------------------------------------------------------------------------------------------------


def test_skab_labels_features_and_protocol(data: Path) -> None:
    files = load_skab(SKAB, limit=2)
    assert [f.name for f in files] == ["valve1/0.csv", "valve1/1.csv"]
    for f in files:
        check_shape(f)
        raw = pd.read_csv(SKAB / f.name, sep=";")
        assert f.features == SENSORS == [c for c in raw.columns if c not in ("datetime", "anomaly", "changepoint")]
        assert len(f.labels) == len(raw)
        assert (f.labels == (raw["anomaly"].to_numpy() == 1)).all()
        assert f.train_rows == 400 and f.protocol == "skab: first 400 rows"
        assert (np.diff(f.timestamps) > 0).all()
        assert f.timestamps[0] == pd.Timestamp(raw["datetime"].iloc[0], tz="UTC").timestamp()
        assert np.allclose(f.values, raw[SENSORS].to_numpy(), rtol=1e-6)
        assert len(f.windows) == 1 and f.windows[0][0] > f.train_rows  # one valve closure, after training
    assert len(files[0].labels) == 1147 and files[0].windows == [(573, 973)]


def test_skab_numeric_order_and_load_dataset_from_the_folder_above(data: Path) -> None:
    names = [f.name for f in load_dataset(DATA, "skab", limit=12)]
    assert names == [f"valve1/{i}.csv" for i in range(12)]  # 10.csv after 9.csv, not after 1.csv
    assert [f.name for f in load_dataset(NAB, "nab", limit=1)] == [f.name for f in load_dataset(DATA, "NAB", limit=1)]


def test_skab_anomaly_free(data: Path) -> None:
    f = load_skab_anomaly_free(SKAB)
    check_shape(f)
    assert f.name == "anomaly-free/anomaly-free.csv" and f.features == SENSORS
    assert len(f.labels) == 9405 and f.train_rows == 9405 and not f.labels.any() and f.windows == []


def test_skab_reads_every_labelled_folder_and_names_files_by_folder(tmp_path: Path) -> None:
    root = skab_layout(tmp_path)  # valve1/0.csv, valve2/0.csv (the same name), other/9.csv, anomaly-free/
    for where in (root, tmp_path):  # the data folder, or the folder above it
        files = load_skab(where)
        assert [f.name for f in files] == ["other/9.csv", "valve1/0.csv", "valve2/0.csv"]  # no anomaly-free
        for f in files:  # each name holds its own file's rows, not those of a namesake in another folder
            raw = pd.read_csv(SKAB / SKAB_SLICES[f.name], sep=";", nrows=700)
            assert np.allclose(f.values, raw[SENSORS].to_numpy(), rtol=1e-6)
            assert (f.labels == (raw["anomaly"].to_numpy() == 1)).all() and f.train_rows == 400
    assert [f.name for f in load_dataset(root, "skab", limit=2)] == ["other/9.csv", "valve1/0.csv"]


def test_skab_one_subfolder_reads_just_that_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = skab_layout(tmp_path)
    assert [f.name for f in load_skab(root / "valve2")] == ["valve2/0.csv"]
    assert [f.name for f in load_skab(f"{root / 'other'}/")] == ["other/9.csv"]
    monkeypatch.chdir(root / "valve2")
    assert [f.name for f in load_dataset(".", "skab")] == ["valve2/0.csv"]  # the folder's real name
    assert load_skab_anomaly_free(".").name == "anomaly-free/anomaly-free.csv"  # found beside the subfolder
    with pytest.raises(DataError, match="anomaly-free: SKAB's anomaly-free recording has no labelled anomalies"):
        load_skab(root / "anomaly-free")


# --- generic CSV --------------------------------------------------------------------------------------------------


def test_csv_comma_with_defaults(tmp_path: Path) -> None:
    p = tmp_path / "plant.csv"
    p.write_text("timestamp,temp,site,vib,label\n"
                 "2024-01-01T00:00:00Z,1.5,a,0.1,0\n"
                 "2024-01-01T00:01:00Z,,a,0.2,1\n"
                 "2024-01-01T00:02:00Z,2.5,a,0.3,1\n"
                 "2024-01-01T00:03:00Z,3.5,a,0.4,0\n"
                 "2024-01-01T00:04:00Z,4.5,a,0.5,1\n")
    [f] = load_labelled_csv(p)
    check_shape(f)
    assert f.name == "plant.csv" and f.features == ["temp", "vib"]  # every numeric column but timestamp/label
    assert np.isnan(f.values[1, 0]) and f.values[2, 0] == 2.5
    assert (f.timestamps == 1704067200.0 + 60 * np.arange(5)).all()
    assert f.labels.tolist() == [False, True, True, False, True] and f.windows == [(1, 2), (4, 4)]
    assert f.train_rows == 0  # floor(0.15 * 5)
    [g] = load_labelled_csv(p, features=["vib"], train_rows=2)
    assert g.features == ["vib"] and g.values.shape == (5, 1) and g.train_rows == 2


def test_csv_semicolon_epoch_seconds_sorted_and_named_columns(tmp_path: Path) -> None:
    p = tmp_path / "semi.csv"
    p.write_text("t;a;b;fault\n30;3;30;1\n10;1;10;0\n20;2;20;1\n40;4;40;0\n")
    [f] = load_labelled_csv(p, timestamp_col="t", label_col="fault", train_fraction=0.5)
    assert f.features == ["a", "b"]
    assert f.timestamps.tolist() == [10.0, 20.0, 30.0, 40.0]  # sorted by time, rows move together
    assert f.values[:, 0].tolist() == [1, 2, 3, 4] and f.labels.tolist() == [False, True, True, False]
    assert f.windows == [(1, 2)] and f.train_rows == 2


def test_csv_folder_and_load_dataset(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.csv", "a.csv", "sub/c.csv"):
        (tmp_path / name).write_text("timestamp,x,label\n1,0.5,0\n2,0.7,1\n")
    files = load_labelled_csv(tmp_path)
    assert [f.name for f in files] == ["a.csv", "b.csv", "sub/c.csv"]
    assert [f.name for f in load_dataset(tmp_path, "csv", limit=2)] == ["a.csv", "b.csv"]


def test_csv_errors_name_the_file_and_column(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("timestamp,x,label\n1,0.5,0\n2,0.7,1\n")
    with pytest.raises(DataError, match=r"x\.csv: no column 'fault' \(columns are: timestamp, x, label"):
        load_labelled_csv(p, label_col="fault")
    with pytest.raises(DataError, match=r"x\.csv: no column 'ts'"):
        load_labelled_csv(p, timestamp_col="ts")
    with pytest.raises(DataError, match=r"x\.csv: no column 'y'"):
        load_labelled_csv(p, features=["x", "y"])
    with pytest.raises(DataError, match=r"nope\.csv: data file not found"):
        load_labelled_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="3 train rows"):
        load_labelled_csv(p, train_rows=3)
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,x,label\n1,0.5,0\n2,0.7,2\n")
    with pytest.raises(DataError, match=r"bad\.csv: label column 'label' must hold 0 or 1"):
        load_labelled_csv(bad)
    bad.write_text("timestamp,x,label\nyesterday,0.5,0\n")
    with pytest.raises(DataError, match=r"bad\.csv: column 'timestamp' has a value that is neither"):
        load_labelled_csv(bad)
    bad.write_text("timestamp,x,label\n1,hot,0\n")
    with pytest.raises(DataError, match=r"bad\.csv: feature column 'x' must hold numbers"):
        load_labelled_csv(bad, features=["x"])
    with pytest.raises(DataError, match=r"bad\.csv: no numeric feature columns"):
        load_labelled_csv(bad)
    with pytest.raises(DataError, match="unknown data format 'parquet'"):
        load_dataset(p, "parquet")


def test_benchmark_folders_that_are_wrong_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a NAB folder"):
        load_nab(tmp_path)
    with pytest.raises(DataError, match="not a SKAB folder"):
        load_skab(tmp_path)
    with pytest.raises(DataError, match="not a SKAB folder"):
        load_dataset(tmp_path, "skab")
