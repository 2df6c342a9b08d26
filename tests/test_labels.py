"""Stream labels: overrides and maintenance windows select streams by label, resolved again on a reload."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from detector.config import parse_config
from detector.errors import ConfigError
from detector.labels import Labeler, StreamMatch
from detector.maintenance import MaintenanceSchedule
from detector.pipeline import Pipeline
from detector.threshold import build_threshold
from tests.helpers import random_artifact
from tests.test_pipeline import T0, feed

LABELS = {"labels": [{"streams": "pump-*", "labels": {"kind": "pump", "site": "north"}},
                     {"streams": "pump-9*", "labels": {"site": "south"}},
                     {"streams": "fan-*", "labels": {"kind": "fan", "site": "south"}}]}


def test_every_matching_entry_adds_its_labels_and_a_later_one_wins() -> None:
    lab = Labeler(parse_config({"streams": LABELS}).streams.labels)
    assert lab("pump-1") == {"kind": "pump", "site": "north"}
    assert lab("pump-91") == {"kind": "pump", "site": "south"}
    assert lab("fan-1") == {"kind": "fan", "site": "south"} and lab("valve-1") == {}
    assert StreamMatch(None, {"kind": "pump", "site": "south"}).matches("pump-91", lab("pump-91"))
    assert not StreamMatch(None, {"kind": "pump", "site": "south"}).matches("pump-1", lab("pump-1"))
    assert not StreamMatch("fan-*", {"kind": "pump"}).matches("fan-1", lab("fan-1")), "both must match"


def test_overrides_select_streams_by_label_by_glob_or_by_both() -> None:
    art = random_artifact()
    cfg = parse_config({"streams": LABELS, "thresholds": {
        "policy": "static", "static": {"warning": 5, "critical": 9}, "overrides": [
            {"streams": "pump-9*", "labels": {"site": "north"}, "policy": "static",  # never: pump-9* is south
             "static": {"warning": 1, "critical": 2}},
            {"labels": {"kind": "pump", "site": "south"}, "policy": "static",
             "static": {"warning": 30, "critical": 60}},
            {"labels": {"kind": "pump"}, "policy": "rolling"},
            {"streams": "fan-*", "policy": "static", "static": {"warning": 7, "critical": 8}},
        ]}})
    names: list[str] = []
    t = build_threshold(cfg.thresholds, art.manifest, names, labels=Labeler(cfg.streams.labels))
    names.extend(["pump-1", "pump-91", "fan-1", "valve-1"])  # streams appear after the policy was built
    w, c = t.levels(np.arange(4))
    assert w.tolist() == [art.manifest.quantile(0.999), 30.0, 7.0, 5.0]
    assert [t.policy_of(r) for r in range(4)] == ["rolling", "static", "static", "static"]


def test_an_override_or_a_label_entry_must_select_something() -> None:
    with pytest.raises(ConfigError, match=r"thresholds.overrides.0: give streams \(a glob on the stream id\), "
                                          r"labels"):
        parse_config({"thresholds": {"overrides": [{"policy": "static"}]}})
    with pytest.raises(ConfigError, match=r"streams.labels.0.labels: Dictionary should have at least 1 item"):
        parse_config({"streams": {"labels": [{"streams": "pump-*", "labels": {}}]}})
    with pytest.raises(ConfigError, match=r"streams.labels.0.streams: Field required"):
        parse_config({"streams": {"labels": [{"labels": {"kind": "pump"}}]}})
    with pytest.raises(ConfigError, match=r"streams.labels.0.labels.rack: Input should be a valid string"):
        parse_config({"streams": {"labels": [{"streams": "*", "labels": {"rack": 3}}]}})
    with pytest.raises(ConfigError, match=r"alerts.maintenance.0.labels.kind: Input should be a valid string"):
        parse_config({"alerts": {"maintenance": [{"labels": {"kind": None}, "daily": "01:00-02:00"}]}})


def test_maintenance_windows_select_streams_by_label() -> None:
    cfg = parse_config({"streams": LABELS, "alerts": {"maintenance": [
        {"labels": {"site": "south"}, "daily": "23:00-01:00"},
        {"streams": "pump-*", "labels": {"site": "north"}, "daily": "12:00-13:00"}]}})
    s = MaintenanceSchedule(cfg.alerts.maintenance, ["pump-1", "pump-91", "fan-1", "valve-1"],
                            Labeler(cfg.streams.labels))
    rows = np.array([0, 1, 2, 3, 0, 1])
    at = np.array([23.5, 23.5, 23.5, 23.5, 12.5, 12.5]) * 3600
    assert s.active(rows, at).tolist() == [False, True, True, False, True, False]


def test_a_reload_resolves_every_stream_again_and_alerts_name_the_policy_in_force() -> None:
    art = random_artifact()
    overrides = {"policy": "static", "static": {"warning": 1e6, "critical": 2e6},
                 "overrides": [{"labels": {"kind": "loud"}, "policy": "rolling",
                                "rolling": {"history": 50, "min_history": 5}}]}
    def loud(glob: str) -> dict:
        return {"labels": [{"streams": glob, "labels": {"kind": "loud"}}]}

    cfg = parse_config({"thresholds": overrides, "streams": loud("m1")})
    pipe = Pipeline(cfg, art)
    pipe.process(feed(3, 60, {}), now=2e9)
    assert [pipe.threshold.policy_of(r) for r in range(3)] == ["static", "rolling", "static"]
    learned = pipe.threshold.export_rows(np.arange(3))
    w_before = pipe.threshold.levels(np.arange(3))[0]
    assert w_before[0] == 1e6 and w_before[1] < 1e6

    new = parse_config({"thresholds": overrides, "streams": loud("m[02]")})
    assert pipe.reconfigure(new) == ["streams"]
    assert [pipe.threshold.policy_of(r) for r in range(3)] == ["rolling", "static", "rolling"]
    kept = pipe.threshold.export_rows(np.arange(3))
    assert np.array_equal(kept["1.buf"][1], learned["1.buf"][1], equal_nan=True), "what m1 learned is kept"
    w_after = pipe.threshold.levels(np.arange(3))[0]
    assert w_after[1] == 1e6 and w_after[0] < 1e6

    # the alerts a batch raises now name the policy the new labels select
    pipe.reconfigure(parse_config({"thresholds": {**overrides, "overrides": [
        {"labels": {"kind": "loud"}, "policy": "calibrated", "calibrated": {"scale": 1e-6}}]},
        "streams": loud("m2")}))
    records = [r for r in feed(3, 80, {}) if orjson.loads(r.value)["ts"] >= T0 + 60 * 60]
    out = pipe.process(records, now=2e9)
    raised = [a for a in out.alerts if a["kind"] == "anomaly" and a["state"] == "raised"]
    assert {a["stream"] for a in raised} == {"m2"} and raised[0]["threshold_policy"] == "calibrated"
    assert raised[0]["threshold"] < 1e-3
