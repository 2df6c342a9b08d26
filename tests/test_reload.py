"""Hot reload: live sections change without losing stream state; an invalid edit changes nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from consumers.memory import IterSource, ListSink
from detector.config import load_config, parse_config
from detector.daemon import Daemon
from detector.pipeline import Pipeline
from tests.helpers import random_artifact
from tests.test_pipeline import feed


def test_reconfigure_applies_live_sections_and_keeps_state() -> None:
    art = random_artifact()
    cfg = parse_config({"thresholds": {"policy": "static", "static": {"warning": 5, "critical": 9}}})
    pipe = Pipeline(cfg, art)
    pipe.process(feed(3, 40, {}), now=2e9)
    streams = list(pipe.engine.streams)
    h = pipe.engine.h[:, :len(streams)].clone()  # the rows in use (the rest is unwritten memory)
    new = parse_config({"thresholds": {"policy": "static", "static": {"warning": 50, "critical": 90}},
                        "alerts": {"k": 1, "n": 2}, "kafka": {"bootstrap_servers": "elsewhere:9092"}})
    changes = pipe.reconfigure(new)
    assert changes == ["kafka (takes effect after a restart)", "thresholds", "alerts"]
    assert pipe.threshold.levels(np.array([0]))[0][0] == 50.0 and pipe.alerts.cfg.k == 1
    assert pipe.cfg.kafka.bootstrap_servers == cfg.kafka.bootstrap_servers, "restart-only sections stay"
    assert pipe.engine.streams == streams, "every stream is kept"
    assert bool((pipe.engine.h[:, :len(streams)] == h).all()), "and its state"


def test_daemon_reloads_on_file_change_or_request_and_rejects_bad_edits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("thresholds: {policy: static, static: {warning: 5, critical: 9}}\n")
    daemon = Daemon(load_config(path), Pipeline(load_config(path), random_artifact()))
    daemon.watch(path)
    src, sink = IterSource(feed(2, 20, {}), batch_size=10), ListSink()
    daemon.process(src.poll_batch(0), src, sink)
    caplog.set_level(logging.INFO, logger="detector.daemon")

    path.write_text("thresholds: {policy: static, static: {warning: 7, critical: 9}}\n")
    os.utime(path, ns=(1, 10**18))  # make sure the modification time moves
    daemon._maybe_reload()
    assert daemon.cfg.thresholds.static.warning == 7 and "config reloaded" in caplog.text

    path.write_text("thresholds: {policy: static, static: {warning: -1}}\nalerts: {k: 9}\n")
    daemon.reload_requested.set()  # what SIGHUP does
    daemon._maybe_reload()
    assert daemon.cfg.thresholds.static.warning == 7, "the running config stays"
    assert "config reload rejected" in caplog.text and "thresholds.static.warning" in caplog.text
    assert "alerts: k (9) must be <= n (3)" in caplog.text, "every problem is logged"
    assert not daemon.reload_requested.is_set()
    daemon.process(src.poll_batch(0), src, sink)  # and it goes on


def test_a_threshold_reload_keeps_what_the_rolling_policy_learned() -> None:
    art = random_artifact()
    rolling = {"policy": "rolling", "rolling": {"history": 50, "min_history": 5, "warning_k": 8.0}}
    pipe = Pipeline(parse_config({"thresholds": rolling}), art)
    pipe.process(feed(3, 120, {}), now=2e9)
    rows = np.arange(3)
    learned = pipe.threshold.export_rows(rows)
    assert (learned["n"] > 5).all(), "each stream has a history"
    before = pipe.threshold.levels(rows)[0]
    pipe.reconfigure(parse_config({"thresholds": {**rolling, "rolling": {**rolling["rolling"], "warning_k": 4.0}}}))
    assert np.array_equal(pipe.threshold.export_rows(rows)["buf"], learned["buf"], equal_nan=True), "history kept"
    after = pipe.threshold.levels(rows)[0]
    assert (after < before).all() or (after == pipe.threshold.base.levels(rows)[0]).all(), "the new k applies"
    pipe.reconfigure(parse_config({"thresholds": {**rolling, "rolling": {**rolling["rolling"], "history": 80}}}))
    assert (pipe.threshold.export_rows(rows)["n"] == 0).all(), "another history length starts afresh"
