"""Training from files, the artifact folder (safe load), and the errors a user can cause."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from detector.artifact import Artifact, load_artifact, save_artifact
from detector.cli import main
from detector.engine import Engine
from detector.errors import DataError, ModelError
from detector.train import Series, TrainParams, load_series, train_model
from tests.helpers import FEATURES, random_artifact, readings, sine_values

SMALL = ["--window", "8", "--hop", "4", "--hidden", "8", "--epochs", "2", "--quiet"]


def write_history(path: Path, n: int = 300, streams: int = 3) -> pd.DataFrame:
    frames = []
    for s in range(streams):
        v = sine_values(n, seed=s)
        df = pd.DataFrame(v, columns=FEATURES)
        df.insert(0, "machine", f"pump-{s}")
        df.insert(0, "time", pd.date_range("2024-01-01", periods=n, freq="min", tz="UTC").astype(str))
        frames.append(df)
    out = pd.concat(frames).sample(frac=1.0, random_state=0)  # shuffled: load_series must sort
    if path.suffix == ".parquet":
        out.to_parquet(path)
    else:
        out.to_csv(path, index=False)
    return out


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_train_cli_writes_a_complete_artifact(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / f"hist{suffix}"
    write_history(data)
    out = tmp_path / "model"
    rc = main(["train", "--data", str(data), "--out", str(out), "--timestamp-col", "time", "--stream-col",
               "machine", *SMALL])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["features"] == FEATURES
    assert manifest["window"] == 8 and manifest["hop"] == 4 and manifest["hidden_size"] == 8
    assert len(manifest["calibration_levels"]) == len(manifest["calibration_scores"])
    assert manifest["calibration_scores"] == sorted(manifest["calibration_scores"])
    assert manifest["training"]["streams"] == 3 and manifest["training"]["calibration_windows"] > 0
    assert (out / "model.safetensors").is_file()
    art = load_artifact(out)
    assert not art.model.training


def test_series_are_sorted_per_stream(tmp_path: Path) -> None:
    data = tmp_path / "h.csv"
    df = write_history(data, n=50, streams=2)
    s = load_series(data, None, ts_col="time", stream_col="machine")
    assert s.streams == ["pump-0", "pump-1"] and s.features == FEATURES
    want = df[df.machine == "pump-1"].sort_values("time")[FEATURES].to_numpy(np.float32)
    assert np.array_equal(s.values[1], want)


def test_data_errors_name_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "h.csv"
    write_history(data, n=50)
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "m")]) == 2
    assert "nope.csv: data file not found" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m")]) == 2
    assert "no column 'timestamp' (columns are: time, machine, temp" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--timestamp-col", "time",
                 "--stream-col", "machine", "--features", "temp,humidity"]) == 2
    assert "feature column(s) humidity not found" in capsys.readouterr().err
    with pytest.raises(DataError, match="at least window"):
        train_model(load_series(data, None, "time", "machine"), TrainParams(window=64, hop=16))


def test_saved_model_scores_identically_after_reload(tmp_path: Path) -> None:
    art = random_artifact()
    save_artifact(tmp_path / "m", art.model, art.manifest)
    again = load_artifact(tmp_path / "m")
    ts = 1.7e9 + np.arange(40.0)
    v = sine_values(40, 1)
    a = Engine(art).score_batch(readings("x", ts, v)).windows.score
    b = Engine(again).score_batch(readings("x", ts, v)).windows.score
    assert np.array_equal(a, b)


def test_model_folder_errors(tmp_path: Path) -> None:
    art = random_artifact()
    with pytest.raises(ModelError, match="model folder not found"):
        load_artifact(tmp_path / "none")
    folder = save_artifact(tmp_path / "m", art.model, art.manifest)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.safetensors: missing"):
        load_artifact(folder)
    other = random_artifact(hidden=32)
    save_artifact(folder, other.model, art.manifest)  # weights of another shape than the manifest says
    with pytest.raises(ModelError, match="weights do not fit the manifest"):
        load_artifact(folder)
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(m | {"format_version": 99}))
    with pytest.raises(ModelError, match="format_version 99 is not supported"):
        load_artifact(folder)
    (folder / "manifest.json").write_text(json.dumps(m | {"score_aggregate": "median"}))
    with pytest.raises(ModelError, match="score_aggregate 'median' is not one of max, mean"):
        load_artifact(folder)


def train_each(tmp_path: Path, flag: str, values: tuple[str, ...]) -> dict[str, Artifact]:
    """Train one small model from the CLI per value of `flag`, on the same history; load each."""
    data = tmp_path / "hist.csv"
    write_history(data)
    arts = {}
    for v in values:
        out = tmp_path / v
        assert main(["train", "--data", str(data), "--out", str(out), "--timestamp-col", "time", "--stream-col",
                     "machine", flag, v, *SMALL]) == 0
        arts[v] = load_artifact(out)
    return arts


def test_score_aggregate_is_chosen_at_training_and_calibrated_with_it(tmp_path: Path) -> None:
    quantiles = {}
    for how, art in train_each(tmp_path, "--score", ("max", "mean")).items():
        assert art.manifest.score_aggregate == how
        quantiles[how] = art.manifest.quantile(0.99)
    assert quantiles["max"] > quantiles["mean"], "the largest error in a window exceeds the mean error"


def test_error_scale_input_scores_errors_in_units_of_the_training_spread(tmp_path: Path) -> None:
    arts = train_each(tmp_path, "--error-scale", ("calibration", "input"))
    for scale, art in arts.items():
        assert art.manifest.training["params"]["error_scale"] == scale
    cal, inp = arts["calibration"].manifest, arts["input"].manifest
    assert inp.error_mean == [0.0] * len(FEATURES) and inp.error_std == [1.0] * len(FEATURES)
    assert all(s < 1.0 for s in cal.error_std), "a fitted model's errors spread less than its inputs"
    assert cal.error_mean != inp.error_mean
    assert inp.quantile(0.99) < cal.quantile(0.99), "unstandardised errors of a fitted model are small"
    # the adaptation's level 1 under input: a validation window's mean squared error per feature, well under 1
    assert cal.adapt_base == [] and len(inp.adapt_base) == len(FEATURES)
    assert all(1e-4 <= b < 0.5 for b in inp.adapt_base), inp.adapt_base
    # with no statistics fitted on the validation part, its windows join the calibration: about twice as many
    assert 1.8 * cal.training["calibration_windows"] <= inp.training["calibration_windows"] <= (
        2.2 * cal.training["calibration_windows"])
    with pytest.raises(DataError, match="error_scale must be one of calibration, input"):
        train_model(Series(FEATURES, ["a"], [sine_values(300, seed=1)]), TrainParams(error_scale="z"),
                    progress=False)


def test_weights_are_not_a_pickle(tmp_path: Path) -> None:
    art = random_artifact()
    folder = save_artifact(tmp_path / "m", art.model, art.manifest)
    head = (folder / "model.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK"), "not a pickle or a torch zip"
    torch.save({"x": 1}, folder / "model.safetensors")  # a pickle in disguise is refused, never unpickled
    with pytest.raises(ModelError):
        load_artifact(folder)


def test_date_strings_put_rows_in_time_order(tmp_path: Path) -> None:
    data = tmp_path / "dates.csv"
    data.write_text("timestamp,stream,temp\n2024-01-01T00:01:00Z,a,1.0\n2024-01-01T00:00:00Z,a,2.0\n")
    series = load_series(data)
    assert series.values[0][:, 0].tolist() == [2.0, 1.0], "rows are put in time order"


def test_denoising_corrupts_one_feature_of_a_share_of_chunks() -> None:
    from detector.train import _corrupt

    x = np.random.default_rng(1).normal(size=(200, 40, 3)).astype(np.float32)
    before = x.copy()
    out = _corrupt(x, np.ones(3, np.float32), np.random.default_rng(0), 0.5)
    assert (x == before).all(), "the clean chunks are left as they were"
    changed = (out != x).any(axis=1)  # (chunk, feature)
    assert 0.35 < changed.any(axis=1).mean() < 0.65
    assert changed.sum(axis=1).max() == 1, "a corrupted chunk has one faulty feature"
    with pytest.raises(DataError, match="corrupt must be between 0 and 1"):
        train_model(Series(FEATURES, ["a"], [sine_values(300, seed=1)]), TrainParams(corrupt=1.5), progress=False)


def test_training_can_start_from_a_given_model_and_leaves_it_unchanged() -> None:
    from detector.model import LSTMAutoencoder

    data = Series(FEATURES, ["a"], [sine_values(400, seed=2)])
    params = TrainParams(window=16, hop=4, hidden_size=8, epochs=1, steps_per_epoch=2, batch_size=4, lr=0.0)
    init = LSTMAutoencoder(len(FEATURES), 8, 1, 16)
    model, _ = train_model(data, params, progress=False, init=init)
    assert model is not init
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values(), strict=True))
    with pytest.raises(DataError, match="the starting model has features, hidden size, layers and window"):
        train_model(data, replace(params, hidden_size=16), progress=False, init=init)


def test_the_manifest_records_each_features_longest_training_run(tmp_path: Path) -> None:
    art = random_artifact()
    folder = save_artifact(tmp_path / "m", art.model, replace(art.manifest, longest_runs=[1, 30, -1]))
    assert load_artifact(folder).manifest.longest_runs == [1, 30, -1]
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "longest_runs"}))
    assert load_artifact(folder).manifest.longest_runs == [], "a model saved before the field loads"
    (folder / "manifest.json").write_text(json.dumps(m | {"longest_runs": [1, 2]}))
    with pytest.raises(ModelError, match="longest_runs has 2 entries for 3 features"):
        load_artifact(folder)
