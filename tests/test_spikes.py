"""The spike score: hand-computed excursions, the levels training sets, and a spike raising at once in the daemon's
pipeline, named on its sensor."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
import torch

from consumers.base import Record
from consumers.memory import IterSource, ListSink
from detector.artifact import Artifact, load_artifact, save_artifact
from detector.config import Config, parse_config
from detector.daemon import Daemon
from detector.engine import Engine
from detector.pipeline import Pipeline
from detector.spikes import FLOOR, MARGIN, SIDE, fit_spikes, isolated, noise_scale, spike_parts, spike_z
from detector.train import Series, TrainParams, train_model
from tests.helpers import readings

T0 = 1_700_000_000.0
ONES = torch.tensor([1.0, 1.0])


def test_a_reading_beyond_both_neighbouring_medians_scores_and_a_step_or_a_ramp_does_not() -> None:
    x = torch.zeros(1, 2 * SIDE + 1, 2)
    x[0, :, 1] = torch.arange(2 * SIDE + 1, dtype=torch.float32) * 5.0  # a steep ramp on sensor 1
    x[0, SIDE, 0] = -7.0  # sensor 0 reads 7 low at the middle reading
    x[0, SIDE + 2, 0] = 1.0  # one neighbour after it off too: the median of the six after it is 0
    present = torch.ones_like(x, dtype=torch.bool)
    assert spike_z(x, present, torch.tensor([2.0, 1.0])).tolist() == [[[-3.5, 0.0]]]  # 7 low, noise 2; ramp 0
    step = torch.zeros(1, 2 * SIDE + 1, 1)
    step[0, SIDE:] = 9.0  # a level shift at the middle reading lies on the side after it: 0
    assert spike_z(step, torch.ones_like(step, dtype=torch.bool), torch.tensor([1.0])).tolist() == [[[0.0]]]
    present[0, SIDE, 0] = False  # a held value is not a reading
    assert spike_z(x, present, torch.tensor([2.0, 1.0])).tolist() == [[[0.0, 0.0]]]
    assert spike_z(x, torch.ones_like(present), torch.tensor([0.0, 1.0])).tolist() == [[[0.0, 0.0]]]  # no noise
    assert spike_z(x[:, 1:], present[:, 1:], ONES).shape == (1, 0, 2)  # too short for both sides


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    x = torch.zeros(1, 2 * SIDE + 1, 1)
    x[0, :SIDE, 0] = torch.tensor([0.0, 0.0, 0.0, 2.0, 2.0, 2.0])  # median before: 1
    x[0, SIDE, 0] = 10.0  # after: six zeros, median 0
    assert spike_z(x, torch.ones_like(x, dtype=torch.bool), torch.tensor([1.0])).tolist() == [[[9.0]]]


def test_noise_is_estimated_from_first_differences_and_ignores_a_smooth_signal() -> None:
    rng = np.random.default_rng(4)
    t = np.arange(5000)
    x = np.stack([20 * np.sin(2 * np.pi * t / 2000) + rng.normal(0, 0.5, 5000), rng.normal(0, 3.0, 5000)], 1)
    x[::7, 0] = np.nan  # gaps leave differences out, they do not break the estimate
    got = noise_scale(x)
    assert abs(got[0] - 0.5) < 0.03 and abs(got[1] - 3.0) < 0.15


def test_a_move_of_several_sensors_at_once_is_not_a_spike() -> None:
    z = torch.tensor([[8.0, 0.5, 2.9], [8.0, 3.0, 0.0], [8.0, 9.0, 0.0]])
    scored = torch.tensor([True, True, True])
    assert isolated(z, scored)[:, 0].tolist() == [True, False, False]
    assert isolated(z, torch.tensor([True, False, True]))[:, 0].tolist() == [True, True, True]  # 1 not scored


def test_levels_are_a_margin_over_the_largest_isolated_excursion_in_training_and_never_under_the_floor() -> None:
    rng = np.random.default_rng(5)
    n = 400
    x = rng.normal(0, 1.0, (n, 3)).clip(-2.5, 2.5)  # bounded noise: no excursion of its own reaches the floor
    x[:, 2] = 4.0  # a constant sensor
    x[200, 0] += 12.0  # one isolated excursion on sensor 0 in training
    x[300, :2] += 20.0  # the machine moves: both sensors at once, not isolated
    present = np.ones_like(x, dtype=bool)
    noise, level = fit_spikes([(x.astype(np.float32), present)], np.array([False, False, True]))
    assert noise[2] == 0 and level[2] == 0, "a constant sensor is not scored"
    z = spike_z(torch.from_numpy(x).float()[None], torch.from_numpy(present)[None], torch.tensor(noise).float())[0]
    assert abs(level[0] - MARGIN * float(z[200 - SIDE, 0].abs())) < 1e-4
    assert level[1] == FLOOR


def test_window_parts_judge_the_readings_whose_both_sides_are_in_the_window() -> None:
    W, hop = 2 * SIDE + 8, 4
    x = torch.zeros(2, W, 2)
    x[0, W - SIDE - 2, 1] = -12.0  # judged at this window (one of its `hop` readings before the newest SIDE)
    x[1, W - 2, 1] = 12.0  # too new: its after-side is not in yet
    ratio, sign = spike_parts(x, torch.ones_like(x, dtype=torch.bool), ONES, torch.tensor([6.0, 6.0]), hop)
    assert ratio.tolist() == [[0.0, 2.0], [0.0, 0.0]] and sign[0, 1] == -1


def _fleet(n: int, seed: int) -> tuple[list[str], list[np.ndarray]]:
    """Three pumps whose flow and pressure follow a slowly varying speed, with white sensor noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    out = []
    for k, nominal in enumerate((1500.0, 3000.0, 2200.0)):
        speed = 0.8 + 0.15 * np.sin(2 * np.pi * (t + 40 * k) / 300)
        out.append(np.stack([nominal * speed + rng.normal(0, 2.0, n), 100 * speed + rng.normal(0, 0.5, n),
                             1.0 + 4.0 * speed**2 + rng.normal(0, 0.02, n)], axis=1).astype(np.float32))
    return ["pump-a", "pump-b", "pump-c"], out


def _records(names: list[str], values: list[np.ndarray]) -> list[Record]:
    out = []
    for t in range(len(values[0])):
        for s, v in zip(names, values, strict=True):
            body = {"stream": s, "ts": T0 + 60.0 * t, "values": dict(zip(("speed", "flow", "pressure"),
                                                                         v[t].tolist(), strict=True))}
            out.append(Record("in", 0, len(out), s.encode(), orjson.dumps(body)))
    return out


PARAMS = TrainParams(window=16, hop=4, hidden_size=8, epochs=2, steps_per_epoch=5, spikes=True, seed=0)


@pytest.fixture(scope="module")
def trained() -> tuple:
    """Three pumps' model with the spike score, and the stream names."""
    names, train = _fleet(1200, seed=1)
    model, m = train_model(Series(["speed", "flow", "pressure"], names, train), PARAMS, progress=False)
    return names, model, m


def _spiked() -> list[np.ndarray]:
    """The test fleet, with pump-b's flow two readings 12 noise spreads high at readings 200 and 201."""
    _, test = _fleet(400, seed=2)
    test[1][200:202, 1] += 12 * 0.5
    return test


def test_a_spike_of_two_readings_raises_at_once_and_names_its_sensor(tmp_path, trained) -> None:
    names, model, m = trained
    params = PARAMS
    assert len(m.spike_level) == 3 and all(v >= FLOOR for v in m.spike_level)
    assert abs(m.spike_noise[1] * m.scaler_std[1] - 0.5) < 0.1, "noise in the model's units: flow's 0.5"
    art = load_artifact(save_artifact(tmp_path / "m", model, m))
    assert art.manifest.spike_level == m.spike_level

    test = _spiked()  # pump-b's flow: two readings 12 noise spreads high, nothing else moves
    cfg = parse_config({"alerts": {"k": 2, "n": 3}})

    def run(a: Artifact, c: Config = cfg) -> list[dict]:
        daemon = Daemon(c, Pipeline(c, a, "cpu"))
        source, sink = IterSource(_records(names, test), batch_size=3 * 4), ListSink()
        while not source.exhausted:
            batch = source.poll_batch(0)
            if batch:
                daemon.process(batch, source, sink)
        daemon.commit(source, sink)
        return [orjson.loads(r.value) for r in sink.on(c.output.alerts_topic)]

    alerts = [a for a in run(art) if a["kind"] == "anomaly" and a["state"] == "raised"]
    assert [a["stream"] for a in alerts] == ["pump-b"]
    raised = alerts[0]
    assert raised["top_features"][0]["name"] == "flow" and raised["top_features"][0]["direction"] == "above"
    assert raised["severity"] == "warning"
    delay = (_epoch(raised["first_seen"]) - (T0 + 60.0 * 200)) / 60
    assert SIDE <= delay < SIDE + 2 * params.hop, "judged when its after-side is in, at the next window"
    plain = Artifact(model, _without_spikes(m), tmp_path)
    assert not [a for a in run(plain) if a["kind"] == "anomaly"], "the window score alone does not see it"
    waits = parse_config({"alerts": {"k": 2, "n": 3, "spikes": False}})
    assert not [a for a in run(art, waits) if a["kind"] == "anomaly"], "alerts.spikes false: k of n as any window"


def test_with_a_spike_weight_the_excursion_enters_the_window_score(tmp_path, trained) -> None:
    names, model, m = trained
    test = _spiked()
    ts = T0 + 60.0 * np.arange(400)
    batch = readings(np.repeat(names, 400).tolist(), np.tile(ts, 3), np.concatenate(test))

    def windows(weight: float):  # noqa: ANN202
        engine = Engine(Artifact(model, dataclasses.replace(m, spike_weight=weight), tmp_path))
        ws = engine.score_batch(batch).windows
        return ws, engine.streams

    plain, streams = windows(0.0)
    weighted, _ = windows(m.quantile(0.999))
    assert (weighted.spike == plain.spike).all() and plain.spike.sum() >= 1
    hit = np.flatnonzero(plain.spike)
    assert {streams[r] for r in plain.rows[hit]} == {"pump-b"}
    assert (weighted.score[hit] >= m.quantile(0.999)).all(), "an excursion at its level scores at least the weight"
    assert (weighted.score[hit] > plain.score[hit]).all()
    assert (weighted.score >= plain.score).all(), "the window score is never lowered"


def _without_spikes(m):  # noqa: ANN001, ANN202
    return dataclasses.replace(m, spike_noise=[], spike_level=[])


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_window_too_short_for_both_sides_trains_no_spike_score() -> None:
    names, train = _fleet(300, seed=3)
    short = TrainParams(window=8, hop=4, hidden_size=8, epochs=1, steps_per_epoch=2, spikes=True, seed=0)
    _, m = train_model(Series(["speed", "flow", "pressure"], names, train), short, progress=False)
    assert m.spike_level == [] and m.spike_noise == []
