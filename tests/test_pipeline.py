"""The daemon's batch path with in-memory source and sink: alerts for faulty streams, dead letters, commits."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import orjson
import pytest
import torch

from consumers.base import Record, SinkError
from consumers.memory import IterSource, ListSink
from detector.artifact import Artifact
from detector.config import Config, parse_config
from detector.daemon import Daemon
from detector.pipeline import Pipeline, iso
from detector.train import Series, TrainParams, train_model
from tests.helpers import FEATURES, sine_values

T0 = 1_700_000_000.0
PARAMS = TrainParams(window=16, hop=4, hidden_size=24, epochs=6, steps_per_epoch=25, batch_size=32, name="t")


@pytest.fixture(scope="module")
def trained() -> Artifact:
    series = Series(FEATURES, [f"s{i}" for i in range(6)], [sine_values(700, seed=100 + i, phase=7 * i)
                                                             for i in range(6)])
    model, manifest = train_model(series, PARAMS, progress=False)
    return Artifact(model, manifest, None)  # type: ignore[arg-type]


def feed(n_streams: int, n: int, faulty: dict[int, int]) -> list[Record]:
    """JSON records of n readings per stream in time order; stream i in `faulty` gets a pressure shift."""
    vals = {}
    for s in range(n_streams):
        v = sine_values(n, seed=500 + s, phase=3 * s).astype(float)
        if s in faulty:
            v[faulty[s]:, 2] += 2.5  # pressure: +5 sigma of its normal range, and out of its usual cycle
        vals[s] = v
    out = []
    for t in range(n):
        for s in range(n_streams):
            values = dict(zip(FEATURES, vals[s][t].tolist(), strict=True))
            body = {"stream": f"m{s}", "ts": T0 + 60 * t, "values": values}
            out.append(Record("in", s % 3, t * n_streams + s, f"m{s}".encode(), orjson.dumps(body), 0))
    return out


def run(cfg: Config, art: Artifact, records: list[Record], batch: int = 97) -> tuple[ListSink, IterSource]:
    daemon = Daemon(cfg, Pipeline(cfg, art))
    src, sink = IterSource(records, batch_size=batch), ListSink()
    while not src.exhausted:
        b = src.poll_batch(0)
        if b:
            daemon.process(b, src, sink)
    daemon.commit(src, sink)
    return sink, src


def test_faulty_streams_raise_alerts_naming_the_sensor(trained: Artifact) -> None:
    cfg = parse_config({"alerts": {"k": 2, "n": 3}})
    faulty = {1: 300, 4: 350, 7: 250}
    sink, _ = run(cfg, trained, feed(10, 500, faulty))
    alerts = [orjson.loads(r.value) for r in sink.on(cfg.output.alerts_topic)]
    raised = [a for a in alerts if a["state"] == "raised"]
    streams = {a["stream"] for a in raised}
    assert {"m1", "m4", "m7"} <= streams
    assert len(streams - {"m1", "m4", "m7"}) <= 1, "at most one healthy stream may raise"
    for a in raised:
        if a["stream"] in ("m1", "m4", "m7"):
            start = T0 + 60 * faulty[int(a["stream"][1:])]
            assert a["top_features"][0]["name"] == "pressure"
            assert a["top_features"][0]["direction"] == "above"
            assert a["window_end"] >= a["window_start"]
            from datetime import datetime
            assert datetime.fromisoformat(a["first_seen"]).timestamp() >= start
    a = raised[0]
    assert set(a) >= {"alert_id", "stream", "model", "state", "severity", "score", "threshold", "window_start",
                      "window_end", "top_features", "first_seen", "input", "detector_version", "config_hash",
                      "threshold_policy", "model_version"}
    assert a["score"] >= a["threshold"]
    assert {"topic", "partition", "offset"} == set(a["input"])
    keys = {r.key for r in sink.on(cfg.output.alerts_topic)}
    assert keys == {x["stream"].encode() for x in alerts}


def test_the_drift_watch_counts_windows_above_the_calibrated_p99(trained: Artifact) -> None:
    cfg = Config()
    daemon = Daemon(cfg, Pipeline(cfg, trained))
    src, sink = IterSource(feed(6, 400, {2: 100}), batch_size=97), ListSink()
    scores = []
    while not src.exhausted:
        out = daemon.process(src.poll_batch(0), src, sink)
        scores.extend(out.windows.score.tolist() if out.windows is not None else [])
    p99 = trained.manifest.quantile(0.99)
    above = daemon.metrics.windows_above_p99._value.get()
    assert daemon.metrics.windows._value.get() == len(scores) > 0
    assert above == sum(s >= p99 for s in scores) and above >= 60, "stream m2 runs shifted for 300 readings"


def test_replay_gives_identical_alerts(trained: Artifact) -> None:
    cfg = Config()
    recs = feed(6, 400, {2: 200})
    first, _ = run(cfg, trained, recs, batch=50)
    second, _ = run(cfg, trained, recs, batch=333)
    assert [r.value for r in first.on(cfg.output.alerts_topic)] == [r.value for r in second.on(cfg.output.alerts_topic)]
    assert first.on(cfg.output.alerts_topic)


def test_bad_records_go_to_the_dead_letter_topic_and_scoring_goes_on(trained: Artifact) -> None:
    cfg = Config()
    good = feed(4, 200, {})
    bad_values = [b"{oops", b"", b'{"stream": "m0", "values": {}}', b'{"stream": "m0", "ts": 1, "values": {"x": 1}}',
                  b"\x89PNG\r\n"]
    mixed: list[Record] = []
    for i, r in enumerate(good):
        mixed.append(r)
        if i % 40 == 0:
            v = bad_values[(i // 40) % len(bad_values)]
            mixed.append(Record("in", 0, 10_000 + i, b"bad", v, 0))
    sink, src = run(cfg, trained, mixed)
    dlq = sink.on(cfg.output.dead_letter_topic)
    assert len(dlq) == len(mixed) - len(good)
    reasons = {dict(r.headers)["reason"].decode() for r in dlq}
    assert reasons == {"bad_json", "empty_value", "missing_timestamp", "unknown_feature"}
    assert all(dict(r.headers)["source"].startswith(b"in[0]@") for r in dlq)
    assert {r.value for r in dlq} == set(bad_values) - {b""} | {b""}
    clean_sink, _ = run(cfg, trained, good)
    alerts = cfg.output.alerts_topic
    assert [r.value for r in sink.on(alerts)] == [r.value for r in clean_sink.on(alerts)]
    assert src.committed == {("in", p): max(r.offset for r in mixed if r.partition == p) + 1 for p in range(3)}


def test_static_policy_applies_its_levels(trained: Artifact) -> None:
    cfg = parse_config({"thresholds": {"policy": "static", "static": {"warning": 1e9, "critical": 2e9}}})
    sink, _ = run(cfg, trained, feed(3, 300, {0: 100}))
    assert sink.on(cfg.output.alerts_topic) == []
    low = parse_config({"thresholds": {"policy": "static", "static": {"warning": 1e-6, "critical": 1e9}},
                        "alerts": {"k": 1, "n": 1}})
    sink, _ = run(low, trained, feed(3, 300, {}))
    raised = [orjson.loads(r.value) for r in sink.on(low.output.alerts_topic)]
    assert {a["stream"] for a in raised} == {"m0", "m1", "m2"}
    assert all(a["threshold_policy"] == "static" and a["threshold"] == 1e-6 for a in raised)


class FailingSink(ListSink):
    """A sink whose acknowledgements fail, as when the brokers are gone."""

    def flush(self, timeout_s: float) -> None:
        raise SinkError("record not acknowledged: NotEnoughReplicas")


def test_nothing_is_committed_when_alerts_are_not_acknowledged(trained: Artifact) -> None:
    cfg = parse_config({"delivery": {"commit_interval_ms": 0}})
    records = feed(4, 200, {1: 100})
    daemon = Daemon(cfg, Pipeline(cfg, trained))
    src, ok, failing = IterSource(records, batch_size=200), ListSink(), FailingSink()
    daemon.process(src.poll_batch(0), src, ok)
    committed = dict(src.committed)
    assert committed, "a batch whose records were acknowledged is committed"
    with pytest.raises(SinkError):
        daemon.process(src.poll_batch(0), src, failing)
    assert src.committed == committed, "the unacknowledged batch left the committed offsets where they were"


def test_warming_streams_neither_alert_nor_teach_the_thresholds(trained: Artifact) -> None:
    records = feed(4, 200, {1: 40})  # stream m1 is faulty from its 41st reading on
    first_raise = {}
    for warmup in (0, 120):
        cfg = parse_config({"alerts": {"warmup_readings": warmup}})
        sink, _ = run(cfg, trained, records)
        raised = [orjson.loads(r.value) for r in sink.on(cfg.output.alerts_topic)]
        raised = [a for a in raised if a["state"] == "raised" and a["stream"] == "m1"]
        assert raised, f"the fault is alerted (warmup {warmup})"
        first_raise[warmup] = raised[0]["input"]["offset"] // 4  # records are 4 streams per reading time
    assert first_raise[0] < 119 <= first_raise[120]


def test_a_persistent_shift_is_one_regime_change_and_the_alert_settles(trained: Artifact) -> None:
    records = feed(4, 800, {1: 200})  # m1's pressure moves to a new level for good at reading 200
    events = {}
    for enabled in (False, True):
        cfg = parse_config({"thresholds": {"policy": "rolling"}, "alerts": {"regime": {"enabled": enabled}}})
        sink, _ = run(cfg, trained, records)
        events[enabled] = [orjson.loads(r.value) for r in sink.on(cfg.output.alerts_topic)]
    def same(alerts: list[dict]) -> list[dict]:
        return [{k: v for k, v in a.items() if k != "config_hash"} for a in alerts if a["kind"] != "regime_change"]

    assert same(events[True]) == same(events[False]), "the regime change only reports"
    with_regime = events[True]
    changes = [a for a in with_regime if a["kind"] == "regime_change"]
    assert [a["stream"] for a in changes] == ["m1"], "one regime change, on the shifted stream only"
    assert changes[0]["input"]["offset"] // 4 >= 200
    m1 = [a["state"] for a in with_regime if a["stream"] == "m1" and a["kind"] == "anomaly"]
    assert m1 == ["raised", "cleared"], "one alert, closed once the rolling levels settle on the new level"
    assert "regime_change" not in {a["kind"] for a in events[False]}


def test_streams_in_maintenance_raise_no_alerts(trained: Artifact) -> None:
    records = feed(4, 200, {1: 100, 2: 100})  # m1 and m2 are faulty from reading 100 on
    fault_start = T0 + 60 * 100
    cfg = parse_config({"alerts": {"maintenance": [{"streams": "m1", "start": fault_start - 60,
                                                    "end": fault_start + 60 * 200}]}})
    sink, _ = run(cfg, trained, records)
    raised = {orjson.loads(r.value)["stream"] for r in sink.on(cfg.output.alerts_topic)
              if orjson.loads(r.value)["state"] == "raised"}
    assert "m2" in raised and "m1" not in raised, raised


def test_a_repeated_reading_reaches_no_stage(trained: Artifact) -> None:
    """A reading whose timestamp the stream already has is rejected before the sensor gate sees its value."""
    cfg = parse_config({"sensors": {"flatline_readings": 5}, "delivery": {"commit_interval_ms": 0}})
    clean = feed(2, 120, {})
    stuck = []
    for r in clean:
        body = orjson.loads(r.value)
        if 40 * 60 <= body["ts"] - T0 < 60 * 60:
            body["values"]["temp"] = 51.125  # stuck for 20 readings: one sensor_fault episode
        stuck.append(Record(r.topic, r.partition, r.offset, r.key, orjson.dumps(body), 0))
    noisy = []
    for r in stuck:
        noisy.append(r)
        body = orjson.loads(r.value)
        body["values"]["temp"] += 7.0  # the same instant again, with another value: would break the stuck run
        noisy.append(Record(r.topic, r.partition, r.offset, r.key, orjson.dumps(body), 0))
    noisy = [Record(r.topic, r.partition, i, r.key, r.value, 0) for i, r in enumerate(noisy)]  # offsets in order
    want, _ = run(cfg, trained, stuck)
    got, _ = run(cfg, trained, noisy)
    alerts = cfg.output.alerts_topic
    assert [orjson.loads(r.value)["kind"] for r in want.on(alerts)].count("sensor_fault") == 4
    def ids(sink: ListSink) -> list[tuple]:
        return [(a["alert_id"], a["kind"], a["state"], a["window_end"]) for a in map(orjson.loads,
                                                                                   (r.value for r in sink.on(alerts)))]

    repeated = [a for a in map(orjson.loads, (r.value for r in got.on(alerts)))
                if a.get("reason") == "duplicate_timestamp"]
    assert [(a["state"], a["feature"]) for a in repeated] == [("raised", "*")] * 2, "each stream's clock is flagged"
    flagged = {(a["alert_id"], a["kind"], a["state"], a["window_end"]) for a in repeated}
    assert sorted(i for i in ids(got) if i not in flagged) == sorted(ids(want)), "and nothing else changed"
    reasons = {dict(r.headers)["reason"] for r in got.on(cfg.output.dead_letter_topic)}
    assert reasons == {b"duplicate_timestamp"} and len(got.on(cfg.output.dead_letter_topic)) == len(stuck)


def test_a_released_row_serves_its_next_stream_by_that_streams_own_overrides_windows_and_mutes() -> None:
    from detector.control import Command
    from tests.helpers import random_artifact

    cfg = parse_config({"thresholds": {"overrides": [{"streams": "turbine-*", "policy": "static",
                                                      "static": {"warning": 20, "critical": 60}}]},
                        "alerts": {"maintenance": [{"streams": "pump-*", "daily": "00:00-23:59"}]}})
    pipe = Pipeline(cfg, random_artifact())
    pipe.mutes.apply(Command("mute", "pump-*"))
    pipe.engine.rows_for(np.array(["fan-1"], dtype=object))  # held all along: not every row is released
    rows = pipe.engine.rows_for(np.array(["turbine-1", "pump-1"], dtype=object))
    at = np.full(2, 1_700_000_000.0)

    def looks(r: np.ndarray) -> tuple[list[str], list[bool], list[bool]]:
        return ([pipe.threshold.policy_of(int(x)) for x in r], pipe.maintenance.active(r, at[: len(r)]).tolist(),
                pipe.mutes.muted(r, 0.0).tolist())

    assert looks(rows) == (["static", pipe.threshold.policies[0].name], [False, True], [False, True])
    pipe.release(rows)
    assert pipe.engine.live_streams == 1 and pipe.mutes.count(0.0) == 0 and not len(pipe.mutes.matching("pump-*"))
    again = pipe.engine.rows_for(np.array(["turbine-2", "pump-2"], dtype=object))
    assert again.tolist() == rows[::-1].tolist(), "the rows released last go first: each now holds the other kind"
    assert looks(again) == (["static", pipe.threshold.policies[0].name], [False, True], [False, True])
    assert pipe.mutes.count(0.0) == 1 and pipe.mutes.matching("pump-*").tolist() == [again[1]]


def test_a_stream_silent_past_forget_after_s_is_forgotten_unless_an_episode_is_open() -> None:
    from tests.helpers import random_artifact

    cfg = parse_config({"scoring": {"max_gap_s": 600, "forget_after_s": 600},
                        "thresholds": {"policy": "static", "static": {"warning": 1e9, "critical": 2e9},
                                       "overrides": [{"streams": "hot-*", "policy": "static",
                                                      "static": {"warning": 1e-9, "critical": 2e-9}}]},
                        "sensors": {"silent_after_s": 300}, "alerts": {"k": 1, "n": 1}})
    daemon = Daemon(cfg, Pipeline(cfg, random_artifact()))
    src, sink = IterSource([]), ListSink()
    daemon._last_commit = 1e18  # commits only when the test says
    v = sine_values(61, seed=3)
    last = {"quiet-1": 12, "hot-1": 12, "busy-1": 60}  # readings each sends; hot-1 always alerts (tiny levels)

    def batch(t: int, names: list[str]) -> list[Record]:
        return [Record("in", 0, 1000 * t + i, s.encode(), orjson.dumps(
            {"stream": s, "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v[t].tolist(), strict=True))}), 0)
            for i, s in enumerate(names)]

    for t in range(60):
        daemon.process(batch(t, [s for s, n in last.items() if t < n]), src, sink)
    pipe = daemon.pipeline
    engine = pipe.engine
    held = {engine.streams[r] for r in engine.live_rows().tolist()}
    assert held == {"hot-1", "busy-1"}, "quiet-1 went 48 minutes without a reading: forgotten"
    assert pipe.forgotten == [("quiet-1", "in", 0)] and engine.live_streams == 2
    silent = [(a["stream"], a["state"]) for a in map(lambda r: orjson.loads(r.value), sink.pending)
              if a.get("reason") == "silent"]
    assert ("quiet-1", "cleared") in silent and ("hot-1", "raised") in silent and ("hot-1", "cleared") not in silent
    daemon.commit(src, sink)
    assert pipe.forgotten == [] and daemon.metrics.forgotten_streams._value.get() == 1
    daemon.process(batch(60, ["quiet-1"]), src, sink)  # back: a new stream, its window started over
    row = int(engine.rows_for(np.array(["quiet-1"], dtype=object))[0])
    assert int(engine.readings_seen()[row]) == 1


def test_a_partition_read_far_behind_another_ages_none_of_its_streams() -> None:
    from tests.helpers import random_artifact

    cfg = parse_config({"scoring": {"max_gap_s": 600, "forget_after_s": 600}})
    pipe = Pipeline(cfg, random_artifact())
    v = sine_values(41, seed=4)

    def rec(stream: str, partition: int, t: int) -> Record:
        return Record("in", partition, t, stream.encode(), orjson.dumps(
            {"stream": stream, "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v[t].tolist(), strict=True))}), 0)

    pipe.process([rec("behind", 1, 0), rec("ahead", 0, 0)], now=2e9)
    for t in range(1, 40):  # a member catching up reads partition 0 forty minutes ahead of partition 1
        pipe.process([rec("ahead", 0, t)], now=2e9)
    assert pipe.engine.live_streams == 2 and pipe.forgotten == []
    pipe.process([rec("gone", 0, 0)], now=2e9)  # a stream 39 minutes behind the newest of its own partition
    pipe.process([rec("ahead", 0, 40)], now=2e9)
    assert pipe.forgotten == [("gone", "in", 0)], "partition 0's own newest reading ages its streams"
    assert pipe.engine.find(["behind", "gone"]).tolist()[1] == -1 and pipe.engine.find(["behind"])[0] >= 0


def test_a_shadow_model_leaves_the_live_alerts_byte_for_byte_and_publishes_its_own_to_the_shadow_topic(
        trained: Artifact, tmp_path, monkeypatch) -> None:
    import dataclasses

    from detector.artifact import check_shadow
    from detector.errors import DetectorError, ModelError

    cfg = parse_config({"model": {"shadow": "models/candidate"}})
    m = trained.manifest  # the candidate: the same weights, levels at a fifth of the live's, so it alerts more
    candidate = Artifact(trained.model, dataclasses.replace(
        m, name="candidate", model_version="candidate-1",
        calibration_scores=[0.2 * s for s in m.calibration_scores]), None)  # type: ignore[arg-type]
    recs = feed(6, 400, {2: 200, 4: 300})
    plain, _ = run(Config(), trained, recs, batch=61)
    monkeypatch.setattr("detector.daemon.AGREEMENT_EVERY_S", 0.0)  # measured at every batch, whatever its speed
    daemon = Daemon(cfg, Pipeline(cfg, trained), shadow=Pipeline(cfg, candidate))
    src, sink = IterSource(recs, batch_size=61), ListSink()
    while not src.exhausted:
        daemon.process(src.poll_batch(0), src, sink)
    daemon.commit(src, sink)
    assert [r.value for r in sink.on(cfg.output.alerts_topic)] == [r.value for r in plain.on(cfg.output.alerts_topic)]
    shadow = [orjson.loads(r.value) for r in sink.on("sensor-alerts-shadow")]
    live = [orjson.loads(r.value) for r in sink.on(cfg.output.alerts_topic)]
    assert shadow and {a["model_version"] for a in shadow} == {"candidate-1"}
    assert sum(a["state"] == "raised" for a in shadow) >= sum(a["state"] == "raised" for a in live)
    lines = daemon.metrics.render().decode().splitlines()
    counted = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("detector_shadow_alerts_total{")]
    assert sum(counted) == len(shadow)
    assert daemon.metrics.shadow_windows._value.get() == daemon.metrics.windows._value.get() > 0

    from detector.daemon import agreement
    names = [f"m{s}" for s in range(6)]

    def open_on(pipe: Pipeline) -> set[str]:
        return {n for n, r in zip(names, pipe.engine.find(names).tolist(), strict=True) if pipe.alerts.state[r] > 0}

    assert open_on(daemon.pipeline) != open_on(daemon.shadow), "the candidate alerts on more streams"
    assert agreement(daemon.pipeline, daemon.shadow) == pytest.approx(
        1 - len(open_on(daemon.pipeline) ^ open_on(daemon.shadow)) / 6)
    assert daemon.metrics.shadow_agreement._value.get() == agreement(daemon.pipeline, daemon.shadow) < 1.0

    daemon.rewind(src, sink, "test")  # a rebalance: the live streams come back from checkpoints, the shadow's cold
    assert daemon.shadow is not None and daemon.shadow.engine.live_streams == 0
    other = Artifact(trained.model, dataclasses.replace(m, features=["a", "b", "c", "d"]), None)  # type: ignore
    with pytest.raises(ModelError, match="a shadow must score the same readings"):
        check_shadow(other, trained)

    path = tmp_path / "config.yaml"  # a reload goes to both pipelines, or to neither
    path.write_text("model: {shadow: models/candidate}\nalerts: {k: 3, n: 4}\n")
    assert daemon.reload(path) and daemon.shadow.cfg.alerts.k == daemon.pipeline.cfg.alerts.k == 3
    path.write_text("model: {shadow: models/candidate}\nalerts: {k: 1, n: 4}\n")

    def refuse(new: Config) -> list[str]:
        raise DetectorError("the live pipeline refuses it")

    monkeypatch.setattr(daemon.pipeline, "reconfigure", refuse)
    assert not daemon.reload(path)
    assert daemon.shadow.cfg.alerts.k == daemon.pipeline.cfg.alerts.k == 3, "the shadow went back with the live one"


class SinkState:
    """The state topic as what a ListSink holds of it (newest last): enough for Daemon.commit and rewind."""

    topic = "state"

    def __init__(self, sink: ListSink) -> None:
        self.sink = sink

    def read_chunks(self, partitions: set[int], timeout_s: float, stop: object = None,
                    expect: Callable[[int], None] | None = None) -> Iterator[list]:
        records = [(r.key, r.value) for r in self.sink.on(self.topic)]
        if expect is not None:
            expect(len(records))
        yield records


def test_promote_makes_the_warm_shadow_live_and_rollback_brings_the_old_model_back(trained: Artifact) -> None:
    import dataclasses

    from detector.checkpoint import restore_chunks

    cfg = parse_config({"model": {"shadow": "models/candidate"}, "delivery": {"guarantee": "exactly_once"}})
    m = trained.manifest
    candidate = Artifact(trained.model, dataclasses.replace(
        m, name="candidate", model_version="candidate-1",
        calibration_scores=[0.5 * s for s in m.calibration_scores]), None)  # type: ignore[arg-type]
    recs = feed(6, 400, {2: 150, 4: 200})
    sink = ListSink()
    daemon = Daemon(cfg, Pipeline(cfg, trained), shadow=Pipeline(cfg, candidate), state=SinkState(sink))
    old, new = daemon.pipeline, daemon.shadow
    src = IterSource(recs[: 6 * 300], batch_size=61)
    while not src.exhausted:
        daemon.process(src.poll_batch(0), src, sink)
    daemon.commit(src, sink)
    before = len(sink.records)
    assert set(np.flatnonzero(old.alerts.state[:6] > 0)) == {2, 4} and (new.alerts.state[:6] > 0).sum() >= 2

    promote = Record("ctl", 0, 9, b"model:*", b'{"action": "promote", "streams": "*", "version": "candidate-1"}',
                     int(T0 * 1000))
    daemon.apply_control([promote], sink)
    assert daemon.pipeline is new and daemon.shadow is old
    assert "detector_model{role=\"live\",version=\"candidate-1\"} 1.0" in daemon.metrics.render().decode()
    daemon.commit(src, sink)
    out = [orjson.loads(r.value) for r in sink.records[before:] if r.topic == cfg.output.alerts_topic]
    assert sorted((a["stream"], a["state"], a["reason"], a["model_version"]) for a in out) == [
        ("m2", "cleared", "model_promoted", m.model_version), ("m4", "cleared", "model_promoted", m.model_version)]
    assert out[0]["input"] == {"topic": "ctl", "partition": 0, "offset": 9}
    assert out[0]["window_end"] == iso(T0 + 60 * 299) > out[0]["first_seen"], "the stream's newest reading"
    assert (old.alerts.state[:6] == 0).all() and (new.alerts.state[:6] == 0).all(), "no episode open on either"
    fresh = Pipeline(cfg, candidate)  # every stream's newest checkpoint is now the candidate's
    report = restore_chunks(fresh, SinkState(sink).read_chunks(set(), 0))
    assert report.restored == 6 and not report.skipped
    assert torch.equal(fresh.engine.h[:, :6], new.engine.h[:, :6]), "its warm state, not a cold start"

    src = IterSource(recs[6 * 300:], batch_size=61)
    mark = len(sink.records)
    while not src.exhausted:
        daemon.process(src.poll_batch(0), src, sink)
    daemon.commit(src, sink)
    live = [orjson.loads(r.value) for r in sink.records[mark:] if r.topic == cfg.output.alerts_topic]
    shadowed = [orjson.loads(r.value) for r in sink.records[mark:] if r.topic == "sensor-alerts-shadow"]
    assert {a["stream"] for a in live if a["state"] == "raised"} >= {"m2", "m4"}, "the lasting faults raise again"
    assert {a["model_version"] for a in live} == {"candidate-1"}
    assert {a["model_version"] for a in shadowed} <= {m.model_version}

    daemon.apply_control([Record("ctl", 0, 10, b"model:*", b'{"action": "rollback", "streams": "*"}', 0)], sink)
    assert daemon.pipeline is old
    rolled = [orjson.loads(r.value) for r in sink.pending if r.topic == cfg.output.alerts_topic]
    assert rolled and {(a["reason"], a["model_version"]) for a in rolled} == {("model_rolled_back", "candidate-1")}

    again = Daemon(cfg, Pipeline(cfg, trained), shadow=Pipeline(cfg, candidate))  # a restart reads the topic first
    quiet = ListSink()
    again.apply_control([promote], quiet, history=True)
    assert again.pipeline.manifest.model_version == "candidate-1" and quiet.pending == [] and quiet.records == []
    again.apply_control([Record("ctl", 0, 11, b"model:*", None, 0)], quiet, history=True)  # the key deleted
    assert again.pipeline.manifest.model_version == m.model_version
    again.apply_control([Record("ctl", 0, 12, b"model:*", b'{"action": "promote", "streams": "*", '
                                                             b'"version": "nobody"}', 0)], quiet)
    assert again.pipeline.manifest.model_version == m.model_version, "a version not loaded changes nothing"


class Assigned(IterSource):
    """An in-memory source that holds the three input partitions of `feed`."""

    def assignment(self) -> set[tuple[str, int]]:
        return {("in", 0), ("in", 1), ("in", 2)}


def test_a_crash_between_a_promotion_and_its_commit_clears_the_old_models_episodes_once(trained: Artifact) -> None:
    import dataclasses

    cfg = parse_config({"model": {"shadow": "models/candidate"}, "delivery": {"guarantee": "exactly_once"}})
    candidate = Artifact(trained.model, dataclasses.replace(trained.manifest, name="candidate",
                                                            model_version="candidate-1"), None)  # type: ignore
    sink = ListSink()

    def daemon() -> Daemon:
        return Daemon(cfg, Pipeline(cfg, trained), shadow=Pipeline(cfg, candidate), state=SinkState(sink),
                      control=IterSource([]))

    first = daemon()
    src = Assigned(feed(6, 300, {2: 150, 4: 200}), batch_size=61)
    while not src.exhausted:
        first.process(src.poll_batch(0), src, sink)
    first.commit(src, sink)  # the old model's checkpoints: m2 and m4 with an episode open
    promote = Record("ctl", 0, 9, b"model:*", b'{"action": "promote", "streams": "*", "version": "candidate-1"}', 0)
    first.apply_control([promote], sink)
    assert sink.pending, "the clears wait in the open transaction ..."
    sink.abort()  # ... which the crash aborts

    cleared = []
    for _ in range(2):  # a restart, and one more after it
        mark = len(sink.records)
        again = daemon()
        again.apply_control([promote], sink, history=True)  # the control topic, read at start
        assert again.pipeline.manifest.model_version == "candidate-1"
        again.rewind(src, sink, "start")
        again._follow_control(sink)
        again.commit(src, sink)
        cleared.append(sorted((a["stream"], a["reason"], a["model_version"]) for a in
                              map(orjson.loads, (r.value for r in sink.records[mark:]
                                                 if r.topic == cfg.output.alerts_topic))))
        assert again.pipeline.engine.live_streams == 0, "the candidate never mixes the old model's state in"
    old = trained.manifest.model_version
    assert cleared == [[("m2", "model_promoted", old), ("m4", "model_promoted", old)], []], "once, not again"


def test_a_stream_the_model_no_longer_describes_is_counted_and_named_as_drifting(
        trained: Artifact, caplog: pytest.LogCaptureFixture) -> None:
    cfg = Config()
    daemon = Daemon(cfg, Pipeline(cfg, trained))
    src, sink = IterSource(feed(6, 700, {2: 300}), batch_size=97), ListSink()  # m2 shifted from reading 300 on
    caplog.set_level("INFO", logger="detector.daemon")
    while not src.exhausted:
        daemon.process(src.poll_batch(0), src, sink)
    drift = daemon.pipeline.drift
    rows = daemon.pipeline.engine.find([f"m{s}" for s in range(6)])
    assert drift.drifting(rows).tolist() == [False, False, True, False, False, False], drift.share[rows]
    assert daemon.metrics.drifting_streams._value.get() == 1
    assert caplog.text.count("stream m2 drifting:") == 1, "named once, when it starts"
    assert (drift.windows[rows] >= 100).all() and drift.share[rows[0]] < 0.05
    daemon.pipeline.release(rows[2:3])  # forgotten: it starts again
    assert drift.windows[rows[2]] == 0 and not drift.drifting(rows[2:3])[0]
