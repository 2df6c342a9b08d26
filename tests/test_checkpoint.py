"""Checkpoints: a stream's whole state survives encode, decode and restore, and a replay never counts twice."""

from __future__ import annotations

import threading

import numpy as np
import orjson
import pytest
from safetensors.numpy import save as st_save

from consumers.base import Record, Stopped
from detector.artifact import Artifact
from detector.checkpoint import (
    _header,
    _spans,
    _split,
    _split_written,
    decode,
    encode,
    encode_many,
    restore,
    restore_chunks,
    snapshot,
)
from detector.config import Config, parse_config
from detector.pipeline import Pipeline
from tests.test_pipeline import feed, trained  # noqa: F401 (fixture)

CFG = {
    "alerts": {"k": 2, "n": 3, "regime": {"enabled": True, "min_windows": 5}},
    "thresholds": {"policy": "rolling", "rolling": {"min_history": 5},
                   "overrides": [{"streams": "m1*", "policy": "evt", "evt": {"drift_window": 5}}]},
    "sensors": {"flatline_readings": 6, "silent_after_s": 900},
}


def run(pipe: Pipeline, records: list[Record], batch: int = 101) -> tuple[list[dict], list[tuple]]:
    """Alerts and (stream, end_ts, score) of every window, batch by batch."""
    alerts, windows = [], []
    for i in range(0, len(records), batch):
        out = pipe.process(records[i : i + batch], now=2e9)
        alerts += out.alerts
        ws = out.windows
        windows += [(pipe.engine.streams[int(r)], float(t), float(s)) for r, t, s in zip(ws.rows, ws.end_ts, ws.score,
                                                                                            strict=True)]
    return alerts, windows


def identity(alert: dict) -> tuple:
    """What must be identical between two runs over the same input."""
    return alert["window_end"], alert["stream"], alert["kind"], alert["state"], alert["alert_id"], \
        tuple(alert["input"].values())


def stuck(records: list[Record]) -> list[Record]:
    """Stream m2's first sensor frozen for a stretch, so the gate's state matters too."""
    out = []
    for r in records:
        body = orjson.loads(r.value)
        if body["stream"] == "m2" and 200 * 60 <= body["ts"] - 1_700_000_000 < 260 * 60:
            body["values"]["temp"] = 51.125
            r = Record(r.topic, r.partition, r.offset, r.key, orjson.dumps(body), r.timestamp_ms)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def cfg() -> Config:
    return parse_config(CFG)


def test_encode_decode_round_trip() -> None:
    arrays = {"engine.h": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "alerts.state": np.array([2], np.int8),
              "gate.open": np.array([[True, False]])}
    meta, back = decode(encode("pump-1", arrays, {"model_version": "v1", "topic": "in", "partition": "3"}))
    assert meta["stream"] == "pump-1" and meta["partition"] == "3" and meta["model_version"] == "v1"
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)


@pytest.mark.parametrize("value", [b"", b"garbage that is not safetensors", st_save({"x": np.zeros(1)})])
def test_decode_refuses_what_is_not_a_checkpoint(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode(value)


def test_restore_then_replay_equals_an_uninterrupted_run(trained: Artifact, cfg: Config) -> None:  # noqa: F811
    records = stuck(feed(12, 420, {1: 250, 4: 300, 7: 200}))
    whole_alerts, whole_windows = run(Pipeline(cfg, trained), records)
    assert {a["kind"] for a in whole_alerts} >= {"anomaly", "sensor_fault"}, "the run exercises alerts and the gate"

    # first part, then a checkpoint of every stream, as the daemon writes it at a commit
    cut = len(records) * 2 // 5
    first = Pipeline(cfg, trained)
    a1, w1 = run(first, records[:cut])
    dirty = first.take_dirty()
    assert len(dirty) == 12 and len(first.take_dirty()) == 0
    values = [c.value for c in snapshot(first, dirty)]

    # a fresh process restores them, then reads again from an earlier offset (the last commit was older):
    # what the state already holds is skipped, so every window is scored exactly as in the uninterrupted run
    second = Pipeline(cfg, trained)
    report = restore(second, values)
    assert report.restored == 12 and report.misfit == [] and report.skipped == {}
    replay_from = cut - 300
    a2, w2 = run(second, records[replay_from:])
    # the same alerts; scores and levels agree to float tolerance (the model runs batches of another shape)
    mine, theirs = sorted(a1 + a2, key=identity), sorted(whole_alerts, key=identity)
    assert [identity(a) for a in mine] == [identity(a) for a in theirs]
    np.testing.assert_allclose([a.get("score", 0) for a in mine], [a.get("score", 0) for a in theirs], rtol=1e-5)
    got, whole_windows = sorted(w1 + w2), sorted(whole_windows)  # batches cut elsewhere interleave streams otherwise
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in whole_windows]
    np.testing.assert_allclose([x for *_, x in got], [x for *_, x in whole_windows], rtol=1e-5)


def test_checkpoints_follow_the_input_partition(trained: Artifact, cfg: Config) -> None:  # noqa: F811
    pipe = Pipeline(cfg, trained)
    run(pipe, feed(6, 40, {}))
    cps = snapshot(pipe, pipe.take_dirty())
    assert {(c.stream, c.topic, c.partition) for c in cps} == {(f"m{s}", "in", s % 3) for s in range(6)}
    assert sorted(pipe.streams_at(pipe.rows_on({("in", 1)}))) == ["m1", "m4"]


def test_a_restore_gives_up_when_the_stop_flag_is_set(trained: Artifact, cfg: Config) -> None:  # noqa: F811
    pipe = Pipeline(cfg, trained)
    run(pipe, feed(6, 40, {}))
    values = [c.value for c in snapshot(pipe, pipe.take_dirty())]
    stop = threading.Event()
    assert restore(Pipeline(cfg, trained), values, stop=stop).restored == 6
    stop.set()  # SIGTERM: decoding 100,000 checkpoints takes seconds, and the daemon must exit within a few
    with pytest.raises(Stopped):
        restore(Pipeline(cfg, trained), values, stop=stop)


def test_a_checkpoint_of_another_model_or_layout_leaves_the_stream_fresh(trained: Artifact, cfg: Config) -> None:  # noqa: F811
    pipe = Pipeline(cfg, trained)
    run(pipe, feed(2, 40, {}))
    good = snapshot(pipe, pipe.take_dirty())
    meta, arrays = decode(good[0].value)
    other_model = encode(meta["stream"], arrays, {**meta, "model_version": "someone-else"})
    arrays["engine.h"] = arrays["engine.h"][:, :, :3]  # a model with another hidden size
    other_layout = encode(meta["stream"], arrays, meta)
    fresh = Pipeline(cfg, trained)
    report = restore(fresh, [other_model, b"junk", other_layout])
    assert report.skipped == {"other_model": 1, "unreadable": 1}
    assert report.restored == 1 and "engine.h" in report.misfit
    row = fresh.engine.rows_for(np.array([meta["stream"]], dtype=object))
    assert fresh.engine.count[row].tolist() == [0] and fresh.engine.last_ts[row].tolist() == [-np.inf]


def test_encode_many_is_safetensors_row_by_row() -> None:
    arrays = {"engine.h": np.arange(12, dtype=np.float32).reshape(2, 2, 3), "alerts.state": np.array([2, 0], np.int8),
              "gate.open": np.array([[True, False], [False, True]]), "pipeline.in_offset": np.array([7, 9])}
    metas = [{"stream": "a", "model_version": "v", "topic": "in", "partition": "0"},
             {"stream": "b", "model_version": "v", "topic": "in", "partition": "3"}]
    for i, value in enumerate(encode_many(arrays, metas)):
        meta, back = decode(value)
        assert meta == {"format": "detector-state/1", **metas[i]}
        for k, v in arrays.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v[i : i + 1]), k


def test_the_header_fast_path_reads_what_a_whole_parse_reads() -> None:
    arrays = {"engine.h": np.zeros((2, 3), np.float32), "alerts.state": np.array([2, 0], np.int8)}
    metas = [{"stream": 'odd},"id\\"}', "model_version": "v", "topic": "in", "partition": "0"},
             {"stream": "pumpe-ü", "model_version": "v", "topic": "in", "partition": "1"}]
    for value in encode_many(arrays, metas):
        fast = _split_written(value)
        assert fast is not None
        header, start = _header(value)
        meta = header.pop("__metadata__")
        assert fast[0] == meta and fast[2] == start
        assert _spans(fast[1]) == _spans(orjson.dumps(header, option=orjson.OPT_SORT_KEYS))
        assert _split(value) == fast
    nested = st_save({"x": np.zeros((1, 2), np.float32)}, metadata={"stream": "a", "format": "detector-state/1"})
    assert _split(nested)[0]["stream"] == "a"  # safetensors' own writer: parsed whole
    broken = b'{"__metadata__":{"stream":{"a":"b"},"format":"x"},"t":{}}'
    assert _split_written(len(broken).to_bytes(8, "little") + broken) is None  # not flat: never a wrong split


def test_bulk_restore_reads_records_of_either_writer_and_refuses_broken_ones(trained: Artifact, cfg: Config) -> None:  # noqa: F811
    pipe = Pipeline(cfg, trained)
    run(pipe, feed(3, 40, {}))
    rows = pipe.take_dirty()
    bulk = [c.value for c in snapshot(pipe, rows)]
    one_by_one = [encode(*[(m["stream"], a, m) for m, a in [decode(v)]][0]) for v in bulk]  # safetensors' own writer
    assert one_by_one != bulk
    for values in (bulk, one_by_one):
        fresh = Pipeline(cfg, trained)
        assert restore(fresh, values).restored == 3
        back = fresh.export_rows(fresh.engine.rows_for(np.array(pipe.streams_at(rows), dtype=object)))
        for k, v in pipe.export_rows(rows).items():
            np.testing.assert_array_equal(back[k], v, err_msg=k)
    rng = np.random.default_rng(0)
    meta, arrays = decode(bulk[0])
    broken = [bulk[0][:40], bulk[0][:-8], bulk[0] + b"\x00" * 8,
              encode(meta["stream"], arrays, {**meta, "partition": "x"})]  # a partition that is not a number
    for _ in range(200):  # any byte of the header or the data changed: restored as written, or refused; never a crash
        v = bytearray(bulk[0])
        v[int(rng.integers(0, len(v)))] = int(rng.integers(0, 256))
        broken.append(bytes(v))
    target, unreadable = Pipeline(cfg, trained), 0
    for v in broken:
        report = restore(target, [v])
        assert report.restored + sum(report.skipped.values()) == 1, report
        unreadable += report.skipped.get("unreadable", 0)
    assert unreadable >= 3


def test_a_restore_as_fetched_keeps_each_keys_newest_record(trained: Artifact, cfg: Config) -> None:  # noqa: F811
    pipe = Pipeline(cfg, trained)
    records = feed(3, 40, {})
    run(pipe, records[: len(records) // 2])
    older = {c.stream: c.value for c in snapshot(pipe, pipe.take_dirty())}
    run(pipe, records[len(records) // 2:])
    newer = {c.stream: c.value for c in snapshot(pipe, pipe.take_dirty())}
    meta, arrays = decode(newer["m2"])
    other_model = encode("m2", arrays, {**meta, "model_version": "someone-else"})
    chunks = [[(s.encode(), v) for s, v in older.items()],  # every stream, as of reading 20
              [(b"m0", newer["m0"]), (b"m1", None), (b"m2", other_model)]]  # m0 newer; m1 deleted; m2 unusable
    fresh = Pipeline(cfg, trained)
    report = restore_chunks(fresh, iter(chunks))
    assert report.restored == 1 and report.skipped == {"other_model": 1}
    assert fresh.engine.live_streams == 1 and fresh.streams_at(fresh.engine.live_rows()) == ["m0"]
    row = fresh.engine.find(["m0"])
    for k, v in pipe.export_rows(pipe.engine.find(["m0"])).items():  # m0 as of reading 40
        np.testing.assert_array_equal(fresh.export_rows(row)[k], v, err_msg=k)
    assert fresh.engine.find(["m1", "m2"]).tolist() == [-1, -1]


def test_a_table_reserved_for_a_restore_leaves_the_pipelines_arrays_at_the_rows_in_use(trained: Artifact,  # noqa: F811
                                                                                      cfg: Config) -> None:
    pipe = Pipeline(cfg, trained)
    run(pipe, feed(3, 40, {}))
    fresh = Pipeline(cfg, trained)
    fresh.engine.reserve(100_000)  # what an uncompacted state topic's record count can tell a restore
    assert fresh.engine.capacity >= 100_000
    report = restore_chunks(fresh, iter([[(c.stream.encode(), c.value) for c in snapshot(pipe, pipe.take_dirty())]]))
    assert report.restored == 3
    alerts, windows = run(fresh, feed(5, 60, {})[5 * 40:])  # the three go on, two new streams arrive
    assert windows and {s for s, _, _ in windows} >= {"m3", "m4"}
    # the pipeline's own per-stream arrays and its alert machine's hold one growth step of rows (256), not the
    # 100,000 reserved: numpy would write every one of those rows, and a restore would pay for them
    assert fresh.engine.rows_used == 5 and len(fresh.dirty) == 256 and fresh.alerts.capacity == 256
    assert all(len(getattr(fresh, name)) == 256 for name in fresh.row_fields())
