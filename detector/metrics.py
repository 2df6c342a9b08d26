"""Prometheus metrics and the /healthz and /readyz endpoints, served on one small HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "HealthServer"]


class Metrics:
    """The daemon's metrics, on a registry of its own (so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.readings = Counter("detector_readings_total", "Readings decoded from input records", registry=r)
        self.shadow_agreement = Gauge(
            "detector_shadow_agreement", "Of the streams both the live and the shadow model hold, the share on "
            "which they agree whether an anomaly episode is open (measured every 10 s)", registry=r)
        self.drifting_streams = Gauge(
            "detector_drifting_streams", "Streams held whose recent windows score at or above the live model's "
            "calibrated 0.99 quantile in 5 % or more of cases (weighted, half-life 200 windows, after 100 windows; "
            "not checkpointed)", registry=r)
        self.model = Gauge("detector_model", "The model versions loaded: 1 per version, by role (live: its alerts "
                           "reach operators; shadow: model.shadow, or the model a promotion replaced)",
                           ["version", "role"], registry=r)
        self.windows = Counter("detector_windows_scored_total", "Windows scored by the model", registry=r)
        self.shadow_alerts = Counter("detector_shadow_alerts_total", "Alert transitions the shadow model "
                                     "(model.shadow) would have published, by kind and state", ["kind", "state"],
                                     registry=r)
        self.shadow_windows = Counter("detector_shadow_windows_scored_total", "Windows the shadow model scored",
                                      registry=r)
        self.shadow_windows_above_p99 = Counter(
            "detector_shadow_windows_above_calibration_p99_total", "Windows the shadow model scored at or above its "
            "own calibrated 0.99 quantile", registry=r)
        self.windows_above_p99 = Counter(
            "detector_windows_above_calibration_p99_total", "Windows scored at or above the model's calibrated 0.99 "
            "quantile: about 1 % of the windows while the data look like the calibration's (model drift watch)",
            registry=r)
        self.rejects = Counter("detector_rejected_total", "Records sent to the dead-letter topic",
                               ["reason"], registry=r)
        self.dead_letters_cut = Counter("detector_dead_letters_cut_total", "Dead letters cut to a prefix to fit the "
                                        "dead-letter topic (headers value_bytes, value_sha256)", registry=r)
        self.dead_letters_refused = Counter("detector_dead_letters_refused_total", "Dead letters Kafka refused for "
                                            "good, by error: dropped", ["error"], registry=r)
        self.alerts = Counter("detector_alerts_total", "Alert transitions published, by kind and state",
                              ["kind", "state"], registry=r)
        self.replayed = Counter("detector_replayed_readings_total",
                                "Readings read again after a restore and skipped: the restored state holds them",
                                registry=r)
        self.batch_size = Histogram("detector_batch_records", "Records per poll batch",
                                    buckets=(1, 10, 100, 500, 1000, 5000, 20000, 100000), registry=r)
        self.step_seconds = Histogram("detector_batch_seconds", "Wall time to process one batch end to end",
                                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), registry=r)
        self.latency = Histogram("detector_record_latency_seconds",
                                 "From a record's Kafka timestamp to its batch being committed",
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.active_streams = Gauge("detector_active_streams", "Streams held in the state table", registry=r)
        self.warming_streams = Gauge("detector_warming_streams", "Streams still in their warm-up (no alerts yet)",
                                     registry=r)
        self.lag = Gauge("detector_consumer_lag", "Messages behind the end of an assigned partition",
                         ["topic", "partition"], registry=r)
        self.ready = Gauge("detector_ready", "1 when connected, restored and consuming", registry=r)
        self.commits = Counter("detector_commits_total", "Commits (offsets with alerts and checkpoints)", registry=r)
        self.commit_seconds = Histogram("detector_commit_seconds", "Wall time of a commit: checkpoints written, "
                                        "everything acknowledged, offsets committed",
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), registry=r)
        self.checkpoints = Counter("detector_checkpoints_total", "Per-stream checkpoint records written", registry=r)
        self.checkpoint_bytes = Gauge("detector_checkpoint_bytes", "Bytes of checkpoint records at the last commit",
                                      registry=r)
        self.last_commit = time.time()
        self.checkpoint_age = Gauge("detector_checkpoint_age_seconds", "Seconds since the last commit and checkpoint",
                                    registry=r)
        self.checkpoint_age.set_function(lambda: time.time() - self.last_commit)
        self.restore_seconds = Histogram("detector_restore_seconds", "Time to restore the state of assigned partitions",
                                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120), registry=r)
        self.restored_streams = Counter("detector_restored_streams_total", "Streams restored from checkpoints",
                                        registry=r)
        self.forgotten_streams = Counter("detector_forgotten_streams_total",
                                         "Streams forgotten after scoring.forget_after_s of silence", registry=r)
        self.control_commands = Counter("detector_control_commands_total",
                                        "Operators' commands read from the control topic (mute, unmute, ack, invalid)",
                                        ["action"], registry=r)
        self.muted_streams = Gauge("detector_muted_streams", "Streams held here that an operator has muted now",
                                   registry=r)
        self.rewinds = Counter("detector_rewinds_total", "Returns to the last commit (rebalance or failed commit)",
                               ["reason"], registry=r)
        self.handovers = Counter("detector_handovers_total", "Revocations: what was handed over to the next owner "
                                 "(committed, nothing_pending, failed, busy)", ["result"], registry=r)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class HealthServer:
    """Serves /metrics, /healthz (process alive) and /readyz (consuming) on host:port in a thread."""

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 9108) -> None:
        self.ready_check: Callable[[], bool] = lambda: False  # what /readyz answers (the daemon sets it)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._send(200, b"ok\n")
                elif self.path == "/readyz":
                    ok = owner.ready_check()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        """Start serving in the background."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
