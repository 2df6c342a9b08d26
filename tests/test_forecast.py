"""The forecast head and score: hand-computed scores, what training stores, and the engine's use of it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from detector.artifact import load_artifact, save_artifact
from detector.engine import Engine
from detector.errors import ModelError
from detector.forecast import forecast_scores, forecast_z
from detector.train import Series, TrainParams, train_model
from tests.helpers import readings
from tests.test_relations import T0, two_pumps

PARAMS = TrainParams(window=8, hop=4, hidden_size=16, epochs=12, steps_per_epoch=20, relations=False, forecast=True,
                     seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    names, v = two_pumps(1500, seed=1)
    model, m = train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]), PARAMS, progress=False)
    return load_artifact(save_artifact(tmp_path_factory.mktemp("fc") / "m", model, m))


def test_forecast_errors_and_window_scores_by_hand() -> None:
    pred = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    x = torch.tensor([[0.5, 0.0], [2.0, 0.5], [0.0, 300.0]])
    counted = torch.tensor([[False, False], [True, True], [True, True]])  # the first reading has none before it
    z = forecast_z(pred, x, counted, torch.tensor([0.5, 0.25]))
    assert torch.isnan(z[0]).all() and z[1].tolist() == [2.0, 2.0] and z[2].tolist() == [0.0, 100.0]  # capped
    raw, part, zmean = forecast_scores(z[None])
    assert part.tolist() == [[2.0, 5002.0]] and raw.tolist() == [5002.0]  # mean z^2 over counted readings
    assert zmean.tolist() == [[1.0, 51.0]]


def test_training_stores_the_head_and_its_spread_and_a_model_without_one_has_none(trained, tmp_path) -> None:
    m = trained.manifest
    assert trained.model.forecasts and len(m.forecast_std) == 3 and m.forecast_weight > 0
    assert all(0.0 < s < 0.5 for s in m.forecast_std), "a trained forecast is far better than the feature's spread"
    names, v = two_pumps(300, seed=1)
    plain, pm = train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]),
                            dataclasses.replace(PARAMS, forecast=False, epochs=1), progress=False,
                            init=trained.model)  # a forecasting model as the start: the head is dropped
    assert not plain.forecasts and pm.forecast_weight == 0 and pm.forecast_std == []
    art = load_artifact(save_artifact(tmp_path / "plain", plain, pm))
    assert not art.model.forecasts and "fz" not in Engine(art).export_rows(np.array([0]))
    bad = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    save_artifact(tmp_path / "bad", trained.model, trained.manifest)
    bad = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    bad["forecast_std"] = [1.0]
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="forecast_std must hold 3 spreads"):
        load_artifact(tmp_path / "bad")


def test_a_spike_raises_the_forecast_score_and_the_score_does_not_depend_on_batching(trained) -> None:
    _, test = two_pumps(600, seed=2)
    test[1, 300:303, 0] += 250.0  # pump-b's speed reads 10 % high for three readings
    ts = T0 + 60.0 * np.arange(600)
    engine = Engine(trained)
    w = engine.score_batch(readings("pump-b", ts, test[1])).windows
    end = (w.end_ts - T0) / 60.0
    normal = w.score[(end > 40) & (end < 295)]
    spike = w.score[(end >= 300) & (end < 310)]
    assert spike.max() > 1.5 * normal.max(), (spike.max(), normal.max())
    at = int(np.argmax(np.where((end >= 300) & (end < 310), w.score, 0)))
    assert w.share[at].argmax() == 0, "the spiking sensor is named"
    plain = Engine(dataclasses.replace(trained, manifest=dataclasses.replace(
        trained.manifest, forecast_weight=0.0, forecast_std=[])))
    p = plain.score_batch(readings("pump-b", ts, test[1])).windows.score
    assert (w.score >= p - 1e-4).all() and spike.max() > 2 * p[(end >= 300) & (end < 310)].max()

    one = Engine(trained)  # one reading per batch: each window's newest errors come from the state table
    scores = [s for t in range(600) for s in one.score_batch(readings("pump-b", ts[t:t + 1], test[1][t:t + 1]))
              .windows.score]
    assert np.allclose(scores, w.score, rtol=1e-5, atol=1e-5)

    first = Engine(trained)  # a restore carries the newest errors; a checkpoint without them starts them fresh
    first.score_batch(readings("pump-b", ts[:301], test[1][:301]))
    state = first.export_rows(np.array([0]))
    assert state["fz"].shape == (1, 4, 3) and np.isfinite(state["fz"][0, -1]).all()
    again = Engine(trained)
    assert again.import_rows(again.rows_for(np.array(["pump-b"], dtype=object)), state) == []
    rest = again.score_batch(readings("pump-b", ts[301:], test[1][301:])).windows.score
    assert np.allclose(rest, w.score[-len(rest):], rtol=1e-5, atol=1e-5)
    older = {k: v for k, v in state.items() if k != "fz"}
    fresh = Engine(trained)
    assert fresh.import_rows(fresh.rows_for(np.array(["pump-b"], dtype=object)), older) == []
    assert torch.isnan(fresh.fz[0]).all()
