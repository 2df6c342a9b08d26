"""The data-quality gate: stuck and out-of-range values become sensor faults and never reach the score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from consumers.base import Record
from detector.config import parse_config
from detector.errors import ModelError
from detector.pipeline import Pipeline
from detector.sensors import SensorGate, longest_runs
from tests.helpers import FEATURES, random_artifact


def test_a_stuck_sensor_opens_one_episode_and_closes_it_across_batches() -> None:
    gate = SensorGate(["a", "b"], flatline_readings=5)
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(40, 2))
    vals[10:25, 1] = vals[9, 1]  # b repeats the value of reading 9 for readings 9..24: 16 in a row
    rows, ts = np.zeros(40, np.int64), np.arange(40.0)
    events = []
    cleaned_all = []
    for a in range(0, 40, 7):  # batches cut across the episode
        cleaned, ev = gate.check(rows[a:a + 7], ts[a:a + 7], vals[a:a + 7])
        cleaned_all.append(cleaned)
        events += [(str(ev.state[i]), str(ev.reason[i]), int(ev.feature[i]), float(ev.ts[i]), float(ev.raised_at[i]))
                   for i in range(len(ev))]
    assert events == [("raised", "flatline", 1, 13.0, 13.0), ("cleared", "flatline", 1, 25.0, 13.0)]
    cleaned = np.concatenate(cleaned_all)
    assert np.isnan(cleaned[13:25, 1]).all() and not np.isnan(cleaned[:13, 1]).any()
    assert not np.isnan(cleaned[:, 0]).any(), "the healthy sensor is untouched"


def test_out_of_range_values_are_removed_per_stream() -> None:
    gate = SensorGate(["a", "b"], limits={"a": (0.0, 10.0)})
    rows = np.array([0, 1, 0, 1])
    cleaned, ev = gate.check(rows, np.array([1.0, 1.0, 2.0, 2.0]),
                             np.array([[5.0, 1.0], [50.0, 1.0], [6.0, 1.0], [7.0, 1.0]]))
    assert np.isnan(cleaned[1, 0]) and not np.isnan(cleaned[[0, 2, 3], 0]).any()
    assert list(zip(ev.rows.tolist(), ev.state.tolist(), ev.reason.tolist(), strict=True)) == [
        (1, "raised", "out_of_range"), (1, "cleared", "out_of_range")]
    with pytest.raises(ModelError, match="sensors.limits: 'zz' is not one of the model's features"):
        SensorGate(["a"], limits={"zz": (0.0, 1.0)})


def test_pipeline_sends_sensor_fault_alerts_and_keeps_stuck_values_out_of_the_score() -> None:
    art = random_artifact()
    cfg = parse_config({"sensors": {"flatline_readings": 6}})
    pipe = Pipeline(cfg, art)
    rng = np.random.default_rng(1)
    records = []
    for t in range(120):
        v = {f: float(x) for f, x in zip(FEATURES, rng.normal(size=3) + [50.0, 1.0, 3.0], strict=True)}
        if 40 <= t < 90:
            v[FEATURES[2]] = 3.25  # stuck
        body = {"stream": "p1", "ts": 1.7e9 + 60 * t, "values": v}
        records.append(Record("in", 0, t, b"p1", orjson.dumps(body), 0))
    alerts = []
    for a in range(0, 120, 16):
        alerts += pipe.process(records[a:a + 16], now=2e9).alerts
    faults = [a for a in alerts if a["kind"] == "sensor_fault"]
    assert [(a["state"], a["feature"], a["reason"]) for a in faults] == [
        ("raised", FEATURES[2], "flatline"), ("cleared", FEATURES[2], "flatline")]
    assert faults[0]["alert_id"] == faults[1]["alert_id"]
    assert faults[0]["input"]["offset"] == 45 and faults[1]["input"]["offset"] == 90


def test_sensor_settings_are_checked() -> None:
    from detector.errors import ConfigError

    with pytest.raises(ConfigError, match="sensors.flatline_readings: must be 0 \\(off\\) or at least 2"):
        parse_config({"sensors": {"flatline_readings": 1}})
    with pytest.raises(ConfigError, match="low < high"):
        parse_config({"sensors": {"limits": {"temp": [5, 1]}}})
    with pytest.raises(ConfigError, match="sensors.missing.temp: Input should be 'hold', 'zero', 'anomalous' or "
                                          "'interpolate'"):
        parse_config({"sensors": {"missing": {"temp": "spline"}}})


def test_a_stream_that_falls_silent_is_one_sensor_fault_episode() -> None:
    art = random_artifact()
    pipe = Pipeline(parse_config({"sensors": {"silent_after_s": 600}}), art)
    rng = np.random.default_rng(2)
    records = []
    for t in range(150):
        for s in range(3):
            if s == 2 and 50 <= t < 100:
                continue  # p2 sends nothing for 50 minutes
            v = {f: float(x) for f, x in zip(FEATURES, rng.normal(size=3) + [50.0, 1.0, 3.0], strict=True)}
            body = {"stream": f"p{s}", "ts": 1.7e9 + 60 * t, "values": v}
            records.append(Record("in", 0, len(records), f"p{s}".encode(), orjson.dumps(body), 0))
    alerts = []
    for a in range(0, len(records), 25):
        alerts += pipe.process(records[a:a + 25], now=2e9).alerts
    silent = [a for a in alerts if a["kind"] == "sensor_fault"]
    assert [(a["stream"], a["state"], a["reason"], a["feature"]) for a in silent] == [
        ("p2", "raised", "silent", "*"), ("p2", "cleared", "silent", "*")]
    assert silent[0]["alert_id"] == silent[1]["alert_id"]
    assert silent[0]["first_seen"] == "2023-11-14T23:02:20.000Z"  # p2's last reading before the silence (t=49)


def test_missing_value_policies_per_feature() -> None:
    gate = SensorGate(["a", "b", "c"], missing={"a": "zero", "b": "anomalous"})  # c: hold (the default)
    vals = np.array([[1.0, 1.0, 1.0], [np.nan, np.nan, np.nan], [np.nan, np.nan, np.nan], [2.0, 2.0, 2.0]])
    cleaned, ev = gate.check(np.zeros(4, np.int64), np.arange(4.0), vals)
    assert cleaned[1:3, 0].tolist() == [0.0, 0.0], "zero: a missing value reads as 0"
    assert np.isnan(cleaned[1:3, 1]).all() and np.isnan(cleaned[1:3, 2]).all()
    assert list(zip(ev.state.tolist(), ev.reason.tolist(), ev.feature.tolist(), ev.ts.tolist(), strict=True)) == [
        ("raised", "missing", 1, 1.0), ("cleared", "missing", 1, 3.0)], "anomalous: one episode; hold: none"
    with pytest.raises(ModelError, match="sensors.missing: 'x' is not one of the model's features"):
        SensorGate(["a"], missing={"x": "zero"})


def _reading(stream: str, ts: float, offset: int) -> Record:
    body = {"stream": stream, "ts": ts, "values": dict.fromkeys(FEATURES, 1.0 + offset / 64)}  # never stuck
    return Record("in", 0, offset, stream.encode(), orjson.dumps(body), 0)


@pytest.mark.parametrize("on", [True, False])
def test_late_and_repeated_readings_raise_a_sensor_fault_until_the_stream_is_in_order(on: bool) -> None:
    cfg = parse_config({"sensors": {"timestamp_faults": on}})
    pipe = Pipeline(cfg, random_artifact())
    t0 = 1_700_000_000.0
    batches = [
        [_reading("a", t0 + i, i) for i in range(10)] + [_reading("b", t0 + i, 10 + i) for i in range(10)],
        [_reading("a", t0 + 5, 20), _reading("a", t0 + 11, 21), _reading("b", t0 + 10, 22)],  # a: one late
        [_reading("a", t0 + 11, 23), _reading("b", t0 + 11, 24)],  # a: a repeated time, while still open
        [_reading("a", t0 + 12, 25), _reading("b", t0 + 12, 26)],  # a: in order again
    ]
    out = [pipe.process(b, now=t0 + 100) for b in batches]
    faults = [[(a["stream"], a["state"], a["reason"], a["alert_id"], a["input"]["offset"]) for a in o.alerts
               if a["kind"] == "sensor_fault"] for o in out]
    rejects = [sorted(r.reason for r in o.rejects) for o in out]
    assert rejects == [[], ["late"], ["duplicate_timestamp"], []], "dead-lettered either way"
    if not on:
        assert faults == [[], [], [], []]
        return
    assert faults[0] == [] and faults[2] == []
    (raised,), (cleared,) = faults[1], faults[3]
    assert raised[:3] == ("a", "raised", "late") and raised[4] == 20, "raised by the late reading, naming its record"
    assert cleared[:3] == ("a", "cleared", "late") and cleared[3] == raised[3] and cleared[4] == 25
    # the open episode is per-stream state: checkpointed with the rest
    state = pipe.export_rows(np.array([0]))
    assert "order.since" in state and "order.reason" in state


def _events(ev: object) -> list[tuple]:
    return [(str(ev.state[i]), str(ev.reason[i]), int(ev.feature[i]), float(ev.ts[i]))  # type: ignore[attr-defined]
            for i in range(len(ev))]  # type: ignore[arg-type]


def _in_batches(gate: SensorGate, vals: np.ndarray, size: int) -> tuple[np.ndarray, list[tuple]]:
    rows, ts = np.zeros(len(vals), np.int64), np.arange(float(len(vals)))
    cleaned, events = [], []
    for a in range(0, len(vals), size):
        c, ev = gate.check(rows[a:a + size], ts[a:a + size], vals[a:a + size])
        cleaned.append(c)
        events += _events(ev)
    return np.concatenate(cleaned), events


@pytest.mark.parametrize("size", [7, 1, 100])
def test_gaps_inside_a_stuck_run_neither_end_it_nor_clear_its_episode(size: int) -> None:
    gate = SensorGate(["a", "b"], flatline_readings=5)
    vals = np.random.default_rng(3).normal(size=(60, 2))
    vals[10:45, 1] = vals[9, 1]  # b frozen at reading 9's value until reading 44
    for gap in (np.s_[15], np.s_[20:23], np.s_[28:35], np.s_[43:45]):  # 28..34: a whole batch of 7 without b
        vals[gap, 1] = np.nan
    cleaned, events = _in_batches(gate, vals, size)
    assert events == [("raised", "flatline", 1, 13.0), ("cleared", "flatline", 1, 45.0)], \
        "one fault, one episode: raised at the 5th equal value, cleared by the first different present value"
    assert np.isnan(cleaned[13:45, 1]).all() and not np.isnan(cleaned[np.r_[0:13, 45:60], 1]).any()
    assert not np.isnan(cleaned[:, 0]).any()


def test_a_run_counts_present_values_only_and_resumes_after_a_gap() -> None:
    gate = SensorGate(["a"], flatline_readings=5)
    vals = np.array([[1.0], [2.0], [2.0], [np.nan], [np.nan], [np.nan], [2.0], [2.0], [np.nan], [2.0], [3.0]])
    _, events = _in_batches(gate, vals, 4)
    assert events == [("raised", "flatline", 0, 9.0), ("cleared", "flatline", 0, 10.0)], \
        "the 5th present 2.0 (reading 9) makes it stuck, the gaps between did not count"


def test_gaps_inside_an_out_of_range_stretch_do_not_split_its_episode() -> None:
    gate = SensorGate(["a"], limits={"a": (0.0, 10.0)})
    vals = np.array([[5.0], [50.0], [np.nan], [60.0], [np.nan], [np.nan], [5.0], [np.nan], [6.0]])
    _, events = _in_batches(gate, vals, 2)
    assert events == [("raised", "out_of_range", 0, 1.0), ("cleared", "out_of_range", 0, 6.0)]


def _quantised(n_runs: int, run: int) -> np.ndarray:
    """A sensor that alternates between two levels, `run` equal readings each: its longest training run is `run`."""
    return np.repeat(np.arange(n_runs) % 2 * 0.5 + 20.0, run)


def test_a_quantised_sensor_is_stuck_only_past_twice_its_longest_training_run() -> None:
    rng = np.random.default_rng(4)
    train = np.column_stack([_quantised(20, 30), rng.normal(size=600)])
    train[[40, 100, 101], 0] = np.nan  # gaps in training do not end a run either
    longest = longest_runs([train])
    assert longest == [30, 1]
    live = np.column_stack([np.r_[np.full(20, 7.0), 8.0, np.full(70, 7.5), 9.0], rng.normal(size=92)])
    _, events = _in_batches(SensorGate(["q", "n"], flatline_readings=10, longest=longest), live, 16)
    assert events == [("raised", "flatline", 0, 21.0 + 60), ("cleared", "flatline", 0, 91.0)], \
        "a run of 20 is within what training showed; the 61st equal value (2 x 30 + 1) of a run of 70 is stuck"
    _, events = _in_batches(SensorGate(["q", "n"], flatline_readings=10), live, 16)
    assert events[0] == ("raised", "flatline", 0, 9.0), "without the training runs, 10 equal values would do"


def test_a_sensor_constant_through_training_is_never_stuck() -> None:
    rng = np.random.default_rng(5)
    setpoint = np.column_stack([np.full(500, 3.0), rng.normal(size=500)])
    setpoint[7, 0] = np.nan
    varying = np.column_stack([rng.normal(size=300), rng.normal(size=300)])
    longest = longest_runs([varying, setpoint])
    assert longest == [-1, 1], "held at one value in one stream's training rows: a setpoint"
    live = np.column_stack([np.full(5000, 3.0), rng.normal(size=5000)])
    live[3000:, 1] = live[2999, 1]
    _, events = _in_batches(SensorGate(["valve", "n"], flatline_readings=10, longest=longest), live, 500)
    assert events == [("raised", "flatline", 1, 3008.0)], "the setpoint never; the noisy sensor as usual"


def test_the_shipped_config_checks_for_stuck_sensors() -> None:
    from detector.config import Config, load_config

    shipped = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    assert shipped.sensors.flatline_readings == Config().sensors.flatline_readings >= 2


def test_a_trained_model_with_the_default_config_flags_a_stuck_sensor_once_and_spares_quantised_ones() -> None:
    """Through training and the pipeline: the gate allows what the training rows showed, and gaps do not split."""
    from detector.artifact import Artifact
    from detector.config import Config
    from detector.train import Series, TrainParams, train_model

    rng = np.random.default_rng(6)
    n = 600
    train = [np.column_stack([rng.normal(50.0, 1.0, n), _quantised(n // 20, 20), np.full(n, 3.0)]) for _ in range(2)]
    params = TrainParams(window=8, hop=4, hidden_size=8, epochs=1, steps_per_epoch=5, name="t")
    model, manifest = train_model(Series(list(FEATURES), ["p0", "p1"], train), params, progress=False)
    assert manifest.longest_runs == [1, 20, -1]
    pipe = Pipeline(Config(), Artifact(model, manifest, Path(".")))
    records = []
    for t in range(300):
        v = {FEATURES[0]: float(rng.normal(50.0, 1.0)), FEATURES[1]: 20.0 if t % 70 < 35 else 20.5, FEATURES[2]: 3.0}
        if 100 <= t < 200:
            v[FEATURES[0]] = 49.75  # stuck, with the value absent now and then
            if t % 9 == 0 or 150 <= t < 160:
                del v[FEATURES[0]]
        body = {"stream": "p1", "ts": 1.7e9 + 60 * t, "values": v}
        records.append(Record("in", 0, t, b"p1", orjson.dumps(body), 0))
    alerts = []
    for a in range(0, len(records), 16):
        alerts += pipe.process(records[a:a + 16], now=2e9).alerts
    faults = [(a["state"], a["feature"], a["reason"], a["input"]["offset"]) for a in alerts
              if a["kind"] == "sensor_fault"]
    assert faults == [("raised", FEATURES[0], "flatline", 110), ("cleared", FEATURES[0], "flatline", 200)], \
        "runs of 35 of a sensor that ran 20 in training stay under 41; the setpoint is never stuck"
