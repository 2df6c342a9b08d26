"""The daemon: Kafka source -> pipeline -> alert and dead-letter sinks, committing only what is durable.

Checkpoint order for every batch, kept in this order:
  1. run the batch through the pipeline (decode, window and model, score, threshold, alert);
  2. send its alerts and dead-letter records, and flush: wait until Kafka acknowledged every one (acks=all);
  3. commit each input partition's `last offset + 1`.
A failure in 1 or 2 commits nothing: the batch is read again after a restart (at least once).
SIGTERM or SIGINT sets the stop flag: the batch in hand is finished, flushed and committed, the consumer
leaves the group, and the process exits 0. A second SIGINT falls back to Python's default handler.
SIGHUP, or an edit of the config file, reloads its thresholds, alerts and sensors sections between two
batches, keeping every stream's state; an invalid file is rejected with its errors logged.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from consumers.base import Offsets, Record, Sink, SinkError, Source
from consumers.kafka import KafkaSink, KafkaSource
from detector.artifact import check_features, load_artifact
from detector.config import Config, config_hash, load_config
from detector.engine import pick_device
from detector.errors import ConfigError, DetectorError
from detector.logs import OncePerKind
from detector.metrics import HealthServer, Metrics
from detector.pipeline import BatchOutput, Pipeline, encode_alert

__all__ = ["Daemon", "kafka_client_settings", "run_daemon"]

log = logging.getLogger(__name__)


def kafka_client_settings(cfg: Config) -> dict[str, Any]:
    """kafka-python keyword settings (security, timeouts) common to the consumer and producer."""
    k = cfg.kafka
    out: dict[str, Any] = {
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
        "request_timeout_ms": k.request_timeout_ms,
        "bootstrap_timeout_ms": k.connect_timeout_ms,
        "reconnect_backoff_max_ms": 10000,
    }
    if k.sasl_mechanism:
        out["sasl_mechanism"] = k.sasl_mechanism
        out["sasl_plain_username"] = k.sasl_username
        out["sasl_plain_password"] = k.sasl_password.get_secret_value() if k.sasl_password else None
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(k, name):
            out[name] = getattr(k, name)
    return out


def next_offsets(records: list[Record]) -> Offsets:
    """`last offset + 1` of each partition in the batch."""
    out: Offsets = {}
    for r in records:
        tp = (r.topic, r.partition)
        if r.offset + 1 > out.get(tp, -1):
            out[tp] = r.offset + 1
    return out


class Daemon:
    """Runs batches from a source through the pipeline into sinks until stopped."""

    def __init__(self, cfg: Config, pipeline: Pipeline, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.metrics = metrics or Metrics()
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self._once = OncePerKind()
        self.committed: Offsets = {}

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self.stop_event.set()

    def process(self, records: list[Record], source: Source, sink: Sink) -> BatchOutput:
        """Score one batch, publish its alerts and rejects, wait for acks, then commit its offsets."""
        t0 = time.monotonic()
        out = self.pipeline.process(records, now=time.time())
        topic_alerts, topic_dlq = self.cfg.output.alerts_topic, self.cfg.output.dead_letter_topic
        for alert in out.alerts:
            key, value = encode_alert(alert)
            sink.send(topic_alerts, key, value)
        seen: set[int] = set()
        for rej in out.rejects:
            if rej.index in seen:
                continue
            seen.add(rej.index)
            rec = records[rej.index]
            sink.send(topic_dlq, rec.key, rec.value or b"", [
                ("reason", rej.reason.encode()),
                ("detail", rej.detail.encode()[:1000]),
                ("source", f"{rec.topic}[{rec.partition}]@{rec.offset}".encode()),
            ])
            self.metrics.rejects.labels(rej.reason).inc()
            if self._once.first(rej.reason):
                log.warning("rejected record %s[%d]@%d to %s: %s (%s); further '%s' rejects are only counted",
                            rec.topic, rec.partition, rec.offset, topic_dlq, rej.reason, rej.detail, rej.reason,
                            extra={"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                                   "reason": rej.reason})
        sink.flush(self.cfg.runtime.shutdown_timeout_s * 4)
        offsets = next_offsets(records)
        source.commit(offsets)
        self.committed.update(offsets)

        m = self.metrics
        m.batch_size.observe(len(records))
        m.readings.inc(out.n_readings)
        m.windows.inc(0 if out.windows is None else len(out.windows))
        for alert in out.alerts:
            m.alerts.labels(alert["state"]).inc()
            if alert["kind"] == "regime_change":
                log.info("regime_change %s stream=%s score=%.2f", alert["alert_id"], alert["stream"], alert["score"],
                         extra={"stream": alert["stream"]})
                continue
            if alert["kind"] == "sensor_fault":
                log.info("sensor_fault %s %s stream=%s feature=%s reason=%s", alert["state"], alert["alert_id"],
                         alert["stream"], alert["feature"], alert["reason"], extra={"stream": alert["stream"]})
                continue
            log.info("alert %s %s stream=%s score=%.2f threshold=%.2f top=%s", alert["state"], alert["alert_id"],
                     alert["stream"], alert["score"], alert["threshold"], alert["top_features"][0]["name"],
                     extra={"stream": alert["stream"]})
        engine = self.pipeline.engine
        m.active_streams.set(len(engine.streams))
        m.warming_streams.set(int((engine.count[: len(engine.streams)] < self.cfg.alerts.warmup_readings).sum()))
        now_ms = time.time() * 1000
        for r in records[:: max(1, len(records) // 64)]:
            if r.timestamp_ms > 0:
                m.latency.observe(max(now_ms - r.timestamp_ms, 0) / 1000)
        m.step_seconds.observe(time.monotonic() - t0)
        return out

    def reload(self, path: str | Path) -> bool:
        """Load the config file again and apply its live sections; an invalid file changes nothing."""
        try:
            new = load_config(path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config reload rejected, the running config stays: %s: %s", exc.path, problem)
            return False
        try:
            changes = self.pipeline.reconfigure(new)
        except DetectorError as exc:
            log.error("config reload rejected, the running config stays: %s", exc)
            return False
        self.cfg = self.pipeline.cfg
        log.info("config reloaded from %s: %s; config %s", path, ", ".join(changes) or "no changes",
                 config_hash(self.cfg))
        return True

    def watch(self, path: str | Path) -> None:
        """Reload when the file changes on disk or SIGHUP arrives (checked between batches)."""
        self._watch_path = Path(path)
        self._watch_mtime = self._watch_path.stat().st_mtime_ns if self._watch_path.exists() else 0

    def _maybe_reload(self) -> None:
        path = getattr(self, "_watch_path", None)
        if path is None:
            return
        mtime = path.stat().st_mtime_ns if path.exists() else self._watch_mtime
        if self.reload_requested.is_set() or mtime != self._watch_mtime:
            self.reload_requested.clear()
            self._watch_mtime = mtime
            self.reload(path)

    def loop(self, source: Source, sink: Sink) -> None:
        """Poll and process batches until the stop flag is set."""
        timeout = self.cfg.input.poll_timeout_ms / 1000
        while not self.stop_event.is_set():
            self._maybe_reload()
            records = source.poll_batch(timeout)
            if records:
                self.process(records, source, sink)


def _connect(cfg: Config, stop: threading.Event) -> tuple[KafkaSource, KafkaSink] | None:
    """Connect the consumer and producer, retrying with backoff until connected or stopped."""
    client = kafka_client_settings(cfg)
    delay = 1.0
    while not stop.is_set():
        try:
            source = KafkaSource(cfg.kafka.bootstrap_servers, cfg.input.topics, cfg.input.group_id, client=client,
                                 auto_offset_reset=cfg.input.auto_offset_reset,
                                 max_poll_records=cfg.input.max_poll_records,
                                 session_timeout_ms=cfg.input.session_timeout_ms)
            try:
                sink = KafkaSink(cfg.kafka.bootstrap_servers, client=client)
            except Exception:
                source.close()
                raise
            log.info("connected to Kafka at %s; consuming %s as group %s", cfg.kafka.bootstrap_servers,
                     ",".join(cfg.input.topics), cfg.input.group_id)
            return source, sink
        except KafkaError as exc:
            log.warning("cannot reach Kafka at %s (%s); retrying in %.0f s (kafka.bootstrap_servers)",
                        cfg.kafka.bootstrap_servers, type(exc).__name__, delay)
            stop.wait(delay)
            delay = min(delay * 2, cfg.kafka.connect_retry_max_s)
    return None


def run_daemon(cfg: Config, stop: threading.Event | None = None, config_path: str | Path | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or `stop` is set); return the process exit code.

    With `config_path`, edits of that file (or SIGHUP) reload its thresholds, alerts and sensors sections.
    """
    device = pick_device(cfg.model.device)
    artifact = load_artifact(cfg.model.path, device)
    check_features(artifact, cfg.model.features)
    log.info("model %s (%s) on %s: %d features, window %d, hop %d; config %s",
             artifact.manifest.name, artifact.manifest.model_version, device, len(artifact.manifest.features),
             artifact.manifest.window, artifact.manifest.hop, config_hash(cfg))
    log.info("effective config: %s", cfg.masked())
    daemon = Daemon(cfg, Pipeline(cfg, artifact, str(device)))
    if config_path is not None:
        daemon.watch(config_path)
    if stop is not None:
        daemon.stop_event = stop
    if threading.current_thread() is threading.main_thread():
        _install_signals(daemon)
    with ExitStack() as stack:
        if cfg.metrics.enabled:
            health = HealthServer(daemon.metrics, cfg.metrics.host, cfg.metrics.port).start()
            stack.callback(health.close)
            log.info("metrics and health on http://%s:%d/metrics", cfg.metrics.host, health.port)
        else:
            health = None
        conn = _connect(cfg, daemon.stop_event)
        if conn is None:
            log.info("stopped before connecting")
            return 0
        source, sink = conn
        stack.callback(source.close)
        stack.callback(sink.close)
        if health:
            health.ready.set()
            stack.callback(health.ready.clear)
        daemon.metrics.ready.set(1)
        try:
            daemon.loop(source, sink)
        except SinkError as exc:
            log.error("alerts or dead-letter records were not acknowledged (%s); exiting without committing "
                      "the batch, which will be read again", exc)
            return 1
        log.info("stopping: last batch flushed and committed (%s)",
                 ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(daemon.committed.items())) or "nothing read")
    return 0


def _install_signals(daemon: Daemon) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the batch in hand", signal.Signals(signum).name)
        daemon.stop()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_hup(_signum: int, _frame: object) -> None:
        daemon.reload_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
