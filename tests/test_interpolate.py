"""The `interpolate` missing-value policy: held back until the next value, filled linearly, order kept, bounded."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from consumers.base import Record
from detector.config import parse_config
from detector.decode import Readings
from detector.errors import ConfigError
from detector.interpolate import Interpolator
from detector.pipeline import Pipeline
from tests.helpers import FEATURES, random_artifact

NAN = np.nan


def batch(streams: list[str], ts: list[float], values: list[list[float]], first_source: int = 0) -> Readings:
    return Readings(np.array(streams, object), np.array(ts, float), np.array(values, np.float32),
                    np.arange(first_source, first_source + len(ts)))


def test_a_gap_is_filled_linearly_in_event_time_once_the_next_value_arrives() -> None:
    it = Interpolator(np.array([True, False, False]))
    rows = np.zeros(4, np.int64)
    out, _ = it.release(batch(["a"] * 4, [0, 10, 40, 50], [[1, 1, 1], [NAN, 2, 2], [NAN, NAN, 3], [NAN, 4, 4]]),
                        rows)
    assert out.ts.tolist() == [0.0] and int(it.n[0]) == 3, "the three readings after the gap wait"
    out, r = it.release(batch(["a"], [100], [[11, 5, 5]], first_source=7), np.zeros(1, np.int64))
    assert out.ts.tolist() == [10, 40, 50, 100] and r.tolist() == [0] * 4
    assert out.values[:, 0].tolist() == pytest.approx([2.0, 5.0, 6.0, 11.0]), "linear in event time from 1 to 11"
    assert np.isnan(out.values[1, 1]), "a feature under hold is left to the engine"
    assert out.source.tolist() == [7] * 4, "released readings name the record that completed the gap"
    assert int(it.n[0]) == 0


def test_each_stream_keeps_its_order_and_the_others_are_not_held() -> None:
    it = Interpolator(np.array([True, False, False]))
    streams = ["a", "b", "a", "b", "a"]
    rows = np.array([0, 1, 0, 1, 0])
    out, r = it.release(batch(streams, [0, 0, 1, 1, 2], [[1, 0, 0], [1, 0, 0], [NAN, 0, 0], [2, 0, 0], [NAN, 0, 0]]),
                        rows)
    assert list(zip(r.tolist(), out.ts.tolist(), strict=True)) == [(0, 0.0), (1, 0.0), (1, 1.0)]
    out, r = it.release(batch(["b", "a", "b", "a"], [2, 3, 3, 4], [[3, 0, 0], [4, 0, 0], [NAN, 0, 0], [NAN, 0, 0]],
                              first_source=10), np.array([1, 0, 1, 0]))
    got = list(zip(r.tolist(), out.ts.tolist(), out.values[:, 0].tolist(), out.source.tolist(), strict=True))
    assert got == [(0, 1.0, 2.0, 11), (0, 2.0, 3.0, 11), (0, 3.0, 4.0, 11), (1, 2.0, 3.0, 10)]
    assert it.n[:2].tolist() == [1, 1], "each stream's new gap waits in turn"


def test_the_delay_is_bounded_and_then_the_value_is_held() -> None:
    it = Interpolator(np.array([True, False, False]), max_readings=3)
    out, _ = it.release(batch(["a"] * 4, [0, 1, 2, 3], [[1, 0, 0], [NAN, 0, 0], [NAN, 0, 0], [NAN, 0, 0]]),
                        np.zeros(4, np.int64))
    assert out.ts.tolist() == [0.0] and int(it.n[0]) == 3
    out, _ = it.release(batch(["a"], [4], [[NAN, 0, 0]]), np.zeros(1, np.int64))
    assert out.ts.tolist() == [1, 2, 3, 4] and np.isnan(out.values[:, 0]).all(), "over the bound: released, unfilled"
    assert int(it.n[0]) == 0
    out, _ = it.release(batch(["a"], [5], [[6, 0, 0]]), np.zeros(1, np.int64))
    assert out.values[:, 0].tolist() == [6.0]


def test_a_stream_that_never_had_the_value_is_not_held() -> None:
    it = Interpolator(np.array([True, False, False]))
    out, _ = it.release(batch(["a"] * 2, [0, 1], [[NAN, 0, 0], [5, 0, 0]]), np.zeros(2, np.int64))
    assert out.ts.tolist() == [0, 1] and np.isnan(out.values[0, 0]), "nothing to interpolate from: left missing"


T0 = 1_700_000_000.0


def records(n: int, gaps: dict[int, range]) -> list[Record]:
    """Readings of streams m0..m2, one a minute; stream s misses temp at the readings in gaps[s]."""
    out = []
    for t in range(n):
        for s in range(3):
            values = {"temp": 50 + 5 * float(np.sin(t / 7 + s)), "vibration": 1.0 + 0.01 * (t % 5), "pressure": 3.0}
            if t in gaps.get(s, ()):
                del values["temp"]
            body = {"stream": f"m{s}", "ts": T0 + 60 * t, "values": values}
            out.append(Record("in", s, t * 3 + s, f"m{s}".encode(), orjson.dumps(body), 0))
    return out


CFG = {"sensors": {"missing": {"temp": "interpolate"}, "interpolate_max_readings": 8},
       "thresholds": {"policy": "static", "static": {"warning": 1e-3, "critical": 1e6}}, "alerts": {"k": 1, "n": 1}}


def scores(outs: list) -> list[tuple[int, float, float]]:
    return sorted((int(r), float(t), round(float(s), 5)) for o in outs
                  for r, t, s in zip(o.windows.rows, o.windows.end_ts, o.windows.score, strict=True))


def test_pipeline_interpolates_and_alerts_name_a_record_of_the_batch() -> None:
    recs = records(60, {0: range(20, 25), 1: range(30, 45)})
    pipe = Pipeline(parse_config(CFG), random_artifact())
    seen: list[float] = []
    for i in range(0, len(recs), 21):
        part = recs[i:i + 21]
        out = pipe.process(part, now=2e9)
        offsets = {r.offset for r in part}
        assert all(a["input"]["offset"] in offsets for a in out.alerts), "every alert names a record of the batch"
        assert set(out.readings.source.tolist()) <= set(range(len(part)))
        seen += [float(t) for s, t in zip(out.readings.streams, out.readings.ts, strict=True) if s == "m0"]
    assert seen == sorted(seen) and len(seen) == 60, "m0's readings all arrive, in order"
    assert pipe.interp is not None and pipe.interp.holding() == 0
    # m1's gap (15 readings) is longer than the bound (8): released with the value held, not interpolated
    assert pipe.engine.count[1] == 60


def test_a_restore_mid_gap_gives_the_same_result_as_no_restore() -> None:
    art = random_artifact()
    recs = records(60, {0: range(20, 26), 2: range(21, 24)})
    cut = 23 * 3  # after reading 22: m0 and m2 hold readings
    whole = Pipeline(parse_config(CFG), art)
    expected = scores([whole.process(recs[:cut], now=2e9), whole.process(recs[cut:], now=2e9)])

    first = Pipeline(parse_config(CFG), art)
    before = first.process(recs[:cut], now=2e9)
    assert first.interp is not None and first.interp.n[:3].tolist() == [3, 0, 2], "mid-gap"
    rows = np.arange(len(first.engine.streams))
    state = first.export_rows(rows)
    assert "interp.held_v" in state
    second = Pipeline(parse_config(CFG), art)
    second.engine.rows_for(np.array(first.streams_at(rows), object))
    assert not second.import_rows(rows, state), "every field fits"
    assert scores([before, second.process(recs[cut:], now=2e9)]) == expected


def test_a_reload_keeps_the_held_readings() -> None:
    art = random_artifact()
    recs = records(40, {0: range(20, 24)})
    cut = 22 * 3
    whole = Pipeline(parse_config(CFG), art)
    expected = scores([whole.process(recs[:cut], now=2e9), whole.process(recs[cut:], now=2e9)])
    pipe = Pipeline(parse_config(CFG), art)
    out = pipe.process(recs[:cut], now=2e9)
    assert pipe.interp is not None and pipe.interp.n[0] == 2
    changes = pipe.reconfigure(parse_config({**CFG, "sensors": {**CFG["sensors"], "interpolate_max_readings": 9}}))
    assert changes == ["sensors"] and pipe.interp.n[0] == 2 and pipe.interp.max_readings == 9
    assert scores([out, pipe.process(recs[cut:], now=2e9)]) == expected

    pipe = Pipeline(parse_config(CFG), art)
    pipe.process(recs[:cut], now=2e9)
    pipe.reconfigure(parse_config({k: v for k, v in CFG.items() if k != "sensors"}))
    assert pipe.interp is not None, "no feature interpolates now, but the held readings are still released"
    out = pipe.process(recs[cut:cut + 3], now=2e9)
    assert sorted(out.readings.ts[out.readings.streams == "m0"].tolist()) == [T0 + 60 * t for t in (20, 21, 22)]
    pipe.process(recs[cut + 3:], now=2e9)
    assert pipe.interp.holding() == 0


def test_a_reading_not_after_the_held_ones_is_late() -> None:
    pipe = Pipeline(parse_config(CFG), random_artifact())
    recs = records(30, {0: range(20, 25)})
    pipe.process(recs[:22 * 3], now=2e9)
    again = dataclasses.replace(recs[21 * 3], offset=10_000)  # m0's reading 21 once more: it is held, not yet scored
    out = pipe.process([again], now=2e9)
    assert [r.reason for r in out.rejects] == ["duplicate_timestamp"]


def test_interpolate_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"sensors.interpolate_max_readings: Input should be greater than or equal"):
        parse_config({"sensors": {"interpolate_max_readings": 0}})
    with pytest.raises(ConfigError, match=r"sensors.missing.temp: Input should be 'hold', 'zero', 'anomalous' or "
                                          r"'interpolate'"):
        parse_config({"sensors": {"missing": {"temp": "spline"}}})
    assert FEATURES[0] == "temp"


def held_checkpoint(art: object, recs: list[Record], cut: int) -> tuple[np.ndarray, dict, list[str]]:
    """The state of a pipeline that interpolates, checkpointed while m0 holds readings for a gap."""
    first = Pipeline(parse_config(CFG), art)
    first.process(recs[:cut], now=2e9)
    assert first.interp is not None and first.interp.n[0] == 2
    rows = np.arange(len(first.engine.streams))
    return rows, first.export_rows(rows), first.streams_at(rows)


@pytest.mark.parametrize("sensors", [{}, {"missing": {"temp": "interpolate"}, "interpolate_max_readings": 3},
                                     {"missing": {"temp": "interpolate"}, "interpolate_max_readings": 20}],
                         ids=["interpolates-nothing", "smaller-bound", "larger-bound"])
def test_a_restore_under_another_interpolate_config_keeps_the_held_readings(sensors: dict) -> None:
    art = random_artifact()
    recs = records(40, {0: range(20, 24)})
    cut = 22 * 3
    rows, state, streams = held_checkpoint(art, recs, cut)
    cfg = {k: v for k, v in CFG.items() if k != "sensors"}
    second = Pipeline(parse_config({**cfg, "sensors": sensors} if sensors else cfg), art)
    second.engine.rows_for(np.array(streams, object))
    assert not second.import_rows(rows, state), "every field fits"
    assert second.interp is not None and second.interp.holding() == 2
    m0 = [float(t) for o in (second.process(recs[cut:], now=2e9),)
          for s, t in zip(o.readings.streams, o.readings.ts, strict=True) if s == "m0"]
    assert m0 == [T0 + 60 * t for t in range(20, 40)], "the two held readings go on first, in order"
