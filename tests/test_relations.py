"""The cross-sensor relation score: hand-computed residuals, what training stores, and the engine's use of it."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.artifact import Artifact, load_artifact, save_artifact
from detector.config import parse_config
from detector.engine import Engine
from detector.errors import DataError
from detector.pipeline import Pipeline
from detector.relations import (
    TAIL_QUANTILE,
    Relations,
    even_tails,
    fit_relations,
    relation_scores,
    relation_z,
    stream_scales,
)
from detector.train import Series, TrainParams, train_model
from tests.helpers import readings

T0 = 1_700_000_000.0


def by_hand() -> Relations:
    """Two sensors, each predicted as the other, residual spread 0.5."""
    return Relations(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.zeros(2, 2), torch.zeros(2),
                     torch.tensor([0.5, 0.5]), torch.tensor([True, True]))


def test_relation_residuals_and_window_scores_by_hand() -> None:
    u = torch.tensor([[[1.0, 1.0], [2.0, 1.0]]])  # the second reading breaks the relation
    assert relation_z(u, by_hand()).tolist() == [[[0.0, 0.0], [2.0, -2.0]]]
    raw, part, zmean = relation_scores(u, torch.ones(1, 2, 2, dtype=torch.bool), by_hand())
    assert part.tolist() == [[2.0, 2.0]] and raw.tolist() == [2.0]  # mean z^2 over the readings, largest sensor
    assert zmean.tolist() == [[1.0, -1.0]]  # sensor 0 reads high against the other, sensor 1 low
    present = torch.tensor([[[True, True], [False, True]]])  # sensor 0 missing in the second reading:
    raw, part, _ = relation_scores(u, present, by_hand())  # no whole relation there, so nothing of it counts
    assert part.tolist() == [[0.0, 0.0]] and raw.tolist() == [0.0]
    off = dataclasses.replace(by_hand(), use=torch.tensor([True, False]))
    assert relation_scores(u, torch.ones(1, 2, 2, dtype=torch.bool), off)[1].tolist() == [[2.0, 0.0]]


def test_fit_recovers_a_square_law_and_leaves_out_constant_and_single_sensors() -> None:
    rng = np.random.default_rng(3)
    speed = rng.uniform(0.5, 1.5, 3000)  # one sign: speed follows from its square too
    u = np.stack([speed + 0.05 * rng.standard_normal(3000), 0.5 * speed**2 + 0.05 * rng.standard_normal(3000),
                  np.zeros(3000)], axis=1)
    u[::50, 1] = np.nan  # rows with a missing value are left out of the fit
    rel = fit_relations(u, constant=np.array([False, False, True]))
    assert rel.use.tolist() == [True, True, False]
    assert float(rel.resid_std[1]) < 0.1
    on_law = relation_z(torch.tensor([[1.2, 0.72, 0.0]]), rel)  # exactly on the square law: no residual to speak of
    assert float(on_law[0, 1].abs()) < 1.0 and float(relation_z(torch.tensor([[1.2, 1.22, 0.0]]), rel)[0, 1]) > 4.0
    assert float(rel.lin[0, 2]) == 0.0 and float(rel.quad[0, 2]) == 0.0, "a constant sensor predicts nothing"
    assert not fit_relations(u[:, :1]).use.any(), "one sensor has no others to be predicted from"
    mean, std = stream_scales(np.array([[1.0, 2.0], [3.0, 2.0]]))
    assert mean.tolist() == [2.0, 2.0] and std.tolist() == [1.0, 0.002]


def test_even_tails_puts_every_sensors_window_tail_on_the_median() -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal(8000)
    lag = np.convolve(a, np.ones(12) / 12, mode="same")  # sensor 2 follows a late: its residual runs wide at times
    u = np.stack([a + 0.1 * rng.standard_normal(8000), a + 0.1 * rng.standard_normal(8000),
                  lag + 0.1 * rng.standard_normal(8000)], axis=1)
    blocks = [u[:4000], u[4000:]]
    rel = fit_relations(u)

    def tails(r: Relations) -> np.ndarray:
        parts = [relation_scores(torch.from_numpy(b).float().reshape(-1, 8, 3), torch.ones(500, 8, 3, dtype=torch.bool),
                                 r)[1].numpy() for b in blocks]
        return np.quantile(np.concatenate(parts), TAIL_QUANTILE, axis=0)

    before, after = tails(rel), tails(even_tails(rel, blocks, 8))
    assert before.max() / before.min() > 1.5, before
    assert np.allclose(after, np.median(before), rtol=1e-3), (before, after)
    assert even_tails(rel, [], 8) is rel, "nothing to measure: unchanged"


def two_pumps(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Two unlike machines (other speeds and flows) whose flow and pressure follow speed; (2, n, 3) speed, flow,
    pressure."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    out = []
    for nominal, flow in ((1500.0, 60.0), (3000.0, 200.0)):
        speed = 0.8 + 0.15 * np.sin(2 * np.pi * t / 90) + 0.03 * np.sin(2 * np.pi * t / 23)
        out.append(np.stack([nominal * speed + rng.normal(0, 2.0, n), flow * speed + rng.normal(0, 0.3, n),
                             1.0 + 4.0 * speed**2 + rng.normal(0, 0.02, n)], axis=1))
    return ["pump-a", "pump-b"], np.stack(out).astype(np.float32)


def test_training_stores_each_streams_scale_and_the_engine_scores_a_lasting_broken_relation(tmp_path) -> None:
    names, v = two_pumps(900, seed=1)
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=2, steps_per_epoch=5, relations=True, seed=0)
    model, m = train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]), params, progress=False)
    assert m.relation_streams == names and np.shape(m.relation_mean) == (2, 3) and m.relation_weight > 0
    assert abs(m.relation_mean[1][1] / m.relation_mean[0][1] - 200 / 60) < 0.05, "each stream on its own scale"
    art = load_artifact(save_artifact(tmp_path / "m", model, m))  # the fields survive the round trip
    assert art.manifest.relation_lin == m.relation_lin

    _, test = two_pumps(600, seed=2)
    test[1, 300:, 1] += 6.0  # pump-b's flow reads 20 noise spreads high from reading 300 on, and stays there
    critical = m.quantile(0.9999)
    plain = Artifact(model, dataclasses.replace(m, relation_weight=0.0), tmp_path)

    def scores(art: Artifact, stream: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = Engine(art).score_batch(readings(stream, T0 + 60.0 * np.arange(600), test[1])).windows
        return w.score, w.end_ts, w.share

    s, end, share = scores(art, "pump-b")
    late = end >= T0 + 60.0 * 400  # long after the jump: the autoencoder has had time to follow the new level
    assert (s[late] > critical).all(), "the lasting shift keeps the relation score past critical"
    assert (share[late].argmax(axis=1) == 1).all(), "and names the flow sensor (speed and pressure still agree)"
    normal = s[(end > T0 + 60.0 * 40) & (end < T0 + 60.0 * 300)]
    assert s[late].min() > 2 * normal.max(), "far above anything the normal rows before it give"
    p, _, _ = scores(plain, "pump-b")
    assert (s >= p - 1e-4).all()
    stranger, _, _ = scores(art, "pump-z")  # not in training: no scale, so no relation score
    assert np.allclose(stranger, p, rtol=1e-5)

    first = Engine(art)  # a restore (rows_for, then import_rows) keeps the stream's scale: it is the model's
    first.score_batch(readings("pump-b", T0 + 60.0 * np.arange(40), test[1][:40]))
    again = Engine(art)
    rows = again.rows_for(np.array(["pump-b"], dtype=object))
    assert again.import_rows(rows, first.export_rows(np.array([0]))) == []
    assert bool(again.rel_known[rows[0]]) and torch.equal(again.rel_scale[rows[0]], first.rel_scale[0])
    assert "rel_scale" not in first.export_rows(np.array([0])), "never checkpointed"
    again.release(rows)  # the row goes to the next new stream, which is not the model's: no scale of pump-b
    assert again.rows_for(np.array(["pump-z"], dtype=object)).tolist() == rows.tolist()
    assert not bool(again.rel_known[rows[0]]) and float(again.rel_scale[rows[0]].min()) == 1.0


def test_adaptation_does_not_learn_a_sensor_that_left_its_relations_but_learns_a_consistent_move() -> None:
    names, v = two_pumps(900, seed=1)
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=2, steps_per_epoch=5, relations=True, seed=0)
    model, m = train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]), params, progress=False)
    art = Artifact(model, m, Path("."))
    _, test = two_pumps(900, seed=2)
    gain = test[1].copy()
    gain[300:, 1] *= 1.3  # pump-b's flow reads 30 % high from reading 300 on: a broken relation, a fault
    moved = test[1].copy()  # the pump runs 25 % faster from reading 300 on, flow and pressure following it
    moved[300:, :2] *= 1.25
    moved[300:, 2] = 1.0 + (moved[300:, 2] - 1.0) * 1.25**2

    def levels(values: np.ndarray, gate: bool) -> np.ndarray:
        engine = Engine(art, adapt_halflife=10, adapt_gate=gate)
        engine.score_batch(readings("pump-b", T0 + 60.0 * np.arange(300), values[:300]))
        before = engine.level[0].numpy().copy()
        engine.score_batch(readings("pump-b", T0 + 60.0 * np.arange(300, 900), values[300:]))
        return np.stack([before, engine.level[0].numpy()])

    gated, plain = levels(gain, True), levels(gain, False)
    assert plain[1, 1] > 2.0, "without the gate the flow's error level learns the fault"
    assert gated[1, 1] <= gated[0, 1] + 0.05, "with it, the flow keeps the level it had before the fault"
    for gate in (True, False):  # the relations still hold: the adaptation learns the new operating point
        after = levels(moved, gate)[1]
        assert (after > 1.5).all(), after
    assert Engine(art, adapt_halflife=10).adapt_gate
    assert not Engine(Artifact(model, dataclasses.replace(m, relation_weight=0.0), Path(".")),
                      adapt_halflife=10).adapt_gate, "no relations, nothing to gate by"


def test_stream_scale_puts_each_known_stream_on_its_own_scale_and_warns_of_a_stranger(caplog) -> None:
    names, v = two_pumps(900, seed=1)
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=2, steps_per_epoch=5, relations=False,
                         stream_scale=True, seed=0)
    model, m = train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]), params, progress=False)
    assert m.stream_scaled and m.relation_streams == names and m.relation_weight == 0
    mean, std = stream_scales(v[1][:630])  # the trained-on rows: the first 70 % (validation, calibration after)
    assert np.allclose(m.relation_mean[1], mean, rtol=1e-5) and np.allclose(m.relation_std[1], std, rtol=1e-5)
    art = Artifact(model, m, Path("."))
    engine = Engine(art)
    engine.score_batch(readings("pump-b", T0 + 60.0 * np.arange(100), v[1][:100]))
    seen = engine.last_val[0].numpy()
    assert np.allclose(seen, (v[1][99] - mean) / std, atol=1e-4), "the model's input is the stream on its own scale"
    with caplog.at_level("WARNING", logger="detector.engine"):
        engine.score_batch(readings("pump-z", T0 + 60.0 * np.arange(100), v[1][:100]))
    assert "not in the training data of a model trained with --stream-scale (e.g. pump-z)" in caplog.text
    stranger = engine.last_val[1].numpy()
    assert np.allclose(stranger, (v[1][99] - m.scaler_mean) / np.array(m.scaler_std), atol=1e-4)


def test_a_stream_not_in_training_learns_its_own_scale_and_then_gets_the_relation_score() -> None:
    names, v = two_pumps(900, seed=1)
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=2, steps_per_epoch=5, relations=True, seed=0)
    model, m = train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]), params, progress=False)
    art = Artifact(model, m, Path("."))
    _, test = two_pumps(600, seed=2)
    test[1, 300:, 1] += 6.0  # the flow of a pump like pump-b reads 20 noise spreads high from reading 300 on
    ts = T0 + 60.0 * np.arange(600)
    critical = m.quantile(0.9999)

    engine = Engine(art, learn_scale=200)
    engine.score_batch(readings("pump-z", ts[:150], test[1][:150]))
    assert not bool(engine.rel_known[0]), "150 readings: still learning"
    engine.score_batch(readings("pump-z", ts[150:200], test[1][150:200]))
    mean, std = stream_scales(test[1][:200].astype(np.float64))
    assert bool(engine.rel_known[0])
    assert np.allclose(engine.rel_shift[0].numpy(), (mean - m.scaler_mean) / np.array(m.scaler_std), atol=1e-4)
    assert np.allclose(engine.rel_scale[0].numpy(), std / np.array(m.scaler_std), rtol=1e-4)
    w = engine.score_batch(readings("pump-z", ts[200:], test[1][200:])).windows
    late = w.end_ts >= T0 + 60.0 * 400
    assert (w.score[late] > critical).all(), "the lasting shift is now scored past critical, as on a known stream"
    assert (w.share[late].argmax(axis=1) == 1).all(), "and names the flow sensor"
    plain = Engine(art).score_batch(readings("pump-z", ts, test[1])).windows  # no learning: the autoencoder alone
    assert (plain.score[plain.end_ts >= T0 + 60.0 * 400] <= critical).mean() > 0.5

    state = engine.export_rows(np.array([0]))
    assert state["ls_n"][0].tolist() == [200.0] * 3, "a learnt scale stays as learnt"
    engine.reset(np.array([0]))  # back after a gap: the window starts over, the scale stays
    assert bool(engine.rel_known[0]) and engine.export_rows(np.array([0]))["ls_n"][0].tolist() == [200.0] * 3

    again = Engine(art, learn_scale=200)  # a restore: the checkpointed sums give the scale back
    rows = again.rows_for(np.array(["pump-z"], dtype=object))
    assert not bool(again.rel_known[rows[0]])
    assert again.import_rows(rows, state) == []
    assert bool(again.rel_known[rows[0]]) and torch.equal(again.rel_scale[rows[0]], engine.rel_scale[0])
    older = {k: v for k, v in state.items() if not k.startswith("ls_")}  # a checkpoint from before: learns anew
    fresh = Engine(art, learn_scale=200)
    rows = fresh.rows_for(np.array(["pump-z"], dtype=object))
    assert fresh.import_rows(rows, older) == [] and not bool(fresh.rel_known[rows[0]])
    assert "ls_n" not in Engine(art).export_rows(np.array([0])), "off: no tables"
    cfg = parse_config({"scoring": {"learn_scale_readings": 200}})
    assert Pipeline(cfg, art).engine.learn_scale == 200, "the daemon's pipeline takes the key"
    assert Engine(Artifact(model, dataclasses.replace(m, relation_weight=0.0), Path(".")),
                  learn_scale=200).learn_scale == 0, "nothing to learn a scale for"


def test_a_stream_scaled_model_sees_a_stranger_on_its_learnt_scale_from_a_fresh_window() -> None:
    names, v = two_pumps(900, seed=1)
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=2, steps_per_epoch=5, relations=False,
                         stream_scale=True, seed=0)
    model, m = train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]), params, progress=False)
    art = Artifact(model, m, Path("."))
    _, test = two_pumps(900, seed=2)
    # a third pump at another duty point: half again pump-b's speed, twice its flow, 3 bar more pressure
    other = (test[1] * np.array([1.5, 2.0, 1.0]) + np.array([0.0, 0.0, 3.0])).astype(np.float32)
    ts = T0 + 60.0 * np.arange(900)
    engine = Engine(art, learn_scale=200)
    engine.score_batch(readings("pump-z", ts[:200], other[:200]))
    assert bool(engine.rel_known[0]) and int(engine.count[0]) == 0, "learnt: its window starts over"
    w = engine.score_batch(readings("pump-z", ts[200:], other[200:])).windows
    mean, std = stream_scales(other[:200].astype(np.float64))
    assert np.allclose(engine.last_val[0].numpy(), (other[899] - mean) / std, atol=1e-3)
    known = Engine(art).score_batch(readings("pump-b", ts, test[1])).windows  # on its own scale, the same signal
    unlearnt = Engine(art).score_batch(readings("pump-z", ts, other)).windows
    again = Engine(art, learn_scale=200)  # a restore keeps the window on the learnt scale as it was
    rows = again.rows_for(np.array(["pump-z"], dtype=object))
    assert again.import_rows(rows, engine.export_rows(np.array([0]))) == []
    assert int(again.count[rows[0]]) == int(engine.count[0]) == 700 and bool(again.rel_known[rows[0]])
    assert torch.equal(again.buf[rows[0]], engine.buf[0])
    ratio = np.median(w.score) / np.median(known.score)
    assert 0.5 < ratio < 2.0, ratio
    assert np.median(unlearnt.score) > 5 * np.median(w.score), "on the fleet's scale it scores far off"


def test_relation_holdout_scores_only_the_relations_that_hold_on_the_validation_rows() -> None:
    names, v = two_pumps(900, seed=1)
    v[:, 700:, 2] += np.linspace(0.0, 0.5, 200)[None, :]  # pressure walks off its relation in the last rows
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=2, steps_per_epoch=5, relations=True, seed=0)
    uses = {}
    for bound in (0.0, 1.5):
        _, m = train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]),
                           replace(params, relation_holdout=bound), progress=False)
        uses[bound] = m.relation_use
        assert m.training["params"]["relation_holdout"] == bound
    assert uses[0.0] == [True, True, True], "off: every sensor scored"
    # pressure is not scored; flow, predicted from speed, still is (speed, which the fit predicts partly from
    # pressure, goes with it here: [False, True, False])
    assert uses[1.5][2] is False and uses[1.5][1] is True, uses[1.5]
    with pytest.raises(DataError, match="relation_holdout must be 0"):
        train_model(Series(["speed", "flow", "pressure"], names, [v[0], v[1]]), replace(params, relation_holdout=-1),
                    progress=False)


def test_only_the_sensors_that_drift_in_normal_operation_adapt_with_adapt_features_drifting() -> None:
    names, v = two_pumps(900, seed=1)
    rng = np.random.default_rng(4)
    temp = 40.0 + rng.normal(0, 0.2, (2, 900, 1))  # a temperature that follows no other sensor...
    temp[:, 630:, 0] += np.linspace(0.0, 3.0, 270)  # ...and walks off in the held-back rows (the last 30 %)
    v = np.concatenate([v, temp], axis=2).astype(np.float32)
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=2, steps_per_epoch=5, relations=True, seed=0)
    model, m = train_model(Series(["speed", "flow", "pressure", "temp"], names, [v[0], v[1]]), params,
                           progress=False)
    # the temperature, and any sensor whose prediction leant on it (here the pressure, the most precise one)
    assert "temp" in m.drifting_features and {"speed", "flow"}.isdisjoint(m.drifting_features), m.drifting_features
    assert m.relation_use == [f not in m.drifting_features for f in m.features], "drifting: no longer scored"
    art = Artifact(model, m, Path("."))
    _, test = two_pumps(600, seed=2)
    test = np.concatenate([test, 40.0 + rng.normal(0, 0.2, (2, 600, 1))], axis=2).astype(np.float32)
    moved = test[1].copy()
    moved[:, 1] *= 1.3  # pump-b's flow reads 30 % high, its temperature 2 degrees (ten noise spreads)
    moved[:, 3] += 2.0

    def levels(features: str) -> np.ndarray:
        engine = Engine(art, adapt_halflife=10, adapt_features=features, adapt_gate=False)
        engine.score_batch(readings("pump-b", T0 + 60.0 * np.arange(600), moved))
        return engine.level[0].numpy()

    every, drifting = levels("all"), levels("drifting")
    assert every[1] > 1.5 and every[3] > 1.5, every
    assert drifting[3] > 1.5 and drifting[[0, 1]].tolist() == [1.0, 1.0], drifting
    cfg = parse_config({"scoring": {"adapt_halflife_windows": 10, "adapt_features": "drifting"}})
    assert Pipeline(cfg, art, "cpu").engine._adapt_fixed.tolist() == [f not in m.drifting_features
                                                                       for f in m.features], "the config reaches it"
    steady = Artifact(model, dataclasses.replace(m, drifting_features=[]), Path("."))
    assert Engine(steady, adapt_halflife=10, adapt_features="drifting").adapt_rate == 0.0, "nothing drifts: off"
    with pytest.raises(ValueError, match="adapt_features must be one of all, drifting"):
        Engine(art, adapt_features="some")
