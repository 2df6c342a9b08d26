"""The daemon: Kafka source -> pipeline -> alert, dead-letter and checkpoint sinks, committing only what is durable.

Every batch runs through the pipeline (decode, window and model, score, threshold, alert) and its alerts and
dead letters are sent at once. Every `delivery.commit_interval_ms` (0: every batch) comes a commit:
  1. the state of every stream that changed is sent to the compacted state topic, to the partition its
     readings come from (so it follows its input partition to whichever member owns it);
  2. at_least_once: flush, wait until Kafka acknowledged every alert, dead letter and checkpoint (acks=all),
     then commit each input partition's `last offset + 1`;
     exactly_once: all of it, offsets included, commits as one transaction.
A failure before the commit commits nothing: the input is read again. A checkpoint may then be ahead of the
committed offsets (at_least_once); the pipeline skips readings its restored state already holds.

No single record stops the daemon: a dead letter is cut to fit the dead-letter topic (detector/deadletter.py),
and one that Kafka still refuses for good is counted and logged, not retried (exactly_once: the transaction
it failed is aborted and done again without it).

Partition assignment (start-up, a peer joining or leaving) is noticed after a poll: the open transaction is
aborted, every stream's state is dropped, the state of the streams of the partitions now assigned is
restored from the state topic, and the consumer goes back to their committed offsets. Only then is
anything scored, and only then is /readyz true. Before partitions are revoked, the consumer's listener runs
`handover` (on a worker thread, while this thread waits in poll): it checkpoints and commits what has been
processed, so the next owner starts exactly where this member stopped. Where that fails (the group moved on,
Kafka is away), the next owner replays at most one commit interval from the last commit.

SIGTERM or SIGINT sets the stop flag: the batch in hand is finished and committed, the consumer leaves the
group, and the process exits 0. The handlers are installed before anything else (detector/signals.py): during
start-up the daemon stops before connecting, and during a restore it gives the restore up between two fetches
and exits without committing anything. A second SIGINT falls back to Python's default handler. SIGHUP, or an edit
of the config file, reloads its thresholds, alerts and sensors sections between two batches, keeping every
stream's state; an invalid file is rejected with its errors logged.
"""

from __future__ import annotations

import gc
import logging
import math
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
from kafka.errors import KafkaError, SaslAuthenticationFailedError

from consumers.base import (
    Offsets,
    RebalanceError,
    Record,
    Sink,
    SinkError,
    SinkFenced,
    SinkTimeout,
    Source,
    Stopped,
)
from consumers.kafka import (
    ControlTopic,
    ControlTopicError,
    KafkaSink,
    KafkaSource,
    StateTopic,
    StateTopicError,
    max_message_bytes,
)
from detector.alert import NORMAL
from detector.artifact import check_features, check_shadow, load_artifact
from detector.checkpoint import restore_chunks, snapshot
from detector.config import Config, config_hash, load_config
from detector.control import MODEL_ACTIONS, BadCommand, Command, deleted, parse_command
from detector.deadletter import dead_letter
from detector.engine import pick_device, use_threads
from detector.errors import ConfigError, DetectorError
from detector.heap import release_free_heap
from detector.logs import OncePerKind
from detector.metrics import HealthServer, Metrics
from detector.pipeline import BatchOutput, Pipeline, encode_alert, iso
from detector.rows import take
from detector.signals import install_signals

__all__ = ["Daemon", "above_p99", "agreement", "kafka_client_settings", "run_daemon"]

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


AGREEMENT_EVERY_S = 10.0
"""How often the live and shadow models' agreement is measured (seconds of wall clock, between batches)."""


def agreement(live: Pipeline, shadow: Pipeline) -> float | None:
    """Of the streams both models hold, the share for which they agree on whether an anomaly episode is open
    (None: no stream in common)."""
    rows = live.engine.live_rows()
    other = shadow.engine.find([live.engine.streams[r] for r in rows.tolist()])
    both = other >= 0
    if not both.any():
        return None
    a = take(live.alerts.state, rows[both], 0) > NORMAL
    b = take(shadow.alerts.state, other[both], 0) > NORMAL
    return float((a == b).mean())


DRIFT_LOGGED = 5
"""Streams that start drifting in one batch named in the log, at most (the gauge counts them all)."""


def above_p99(pipeline: Pipeline, out: BatchOutput) -> int:
    """How many of the batch's windows scored at or above the calibrated 0.99 quantile (the drift watch)."""
    return int((out.windows.score >= pipeline.manifest.quantile(0.99)).sum()) if out.windows is not None else 0


class Daemon:
    """Runs batches from a source through the pipeline into sinks until stopped."""

    def __init__(self, cfg: Config, pipeline: Pipeline, metrics: Metrics | None = None,
                 state: StateTopic | None = None, control: Source | None = None,
                 shadow: Pipeline | None = None) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        # a candidate model scored beside the live one (model.shadow): its alerts go to the shadow topic only,
        # its state is never checkpointed (a restore or rebalance starts it cold)
        self.shadow = shadow
        self._primary = pipeline  # model.path's: live again after a rollback (`promote` swaps the two)
        self._switched: tuple[str, Record] | None = None  # the last switch of live model: its reason and command
        self._retired: list[dict[str, Any]] = []  # clears of the outgoing model's episodes found by a restore
        self.metrics = metrics or Metrics()
        self._show_models()
        self.state = state
        self.control = control  # operators' commands (ControlTopic), applied between batches
        self._control_restore = -math.inf  # the restore whose episodes the acks seen so far have reached
        # bad control commands dead-lettered in the open transaction (exactly_once): an abort loses their dead
        # letters, and the control topic is not read again, so they are sent again after the rewind
        self._control_dead: list[tuple[Record, BadCommand]] = []
        self._muted_counted = -math.inf
        self._agreement_at = -math.inf
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.ready = threading.Event()
        self._once = OncePerKind()
        self.committed: Offsets = {}
        self.pending: Offsets = {}  # processed, not yet committed
        self._last_commit = -math.inf
        self._generation: int | None = None
        self._group: object = None
        self._in_txn = False
        self.beat = time.monotonic()  # the loop's last turn
        self._rewound_at = -math.inf
        self._blocked = False  # a send waited for the brokers since the last flush
        self._work = threading.Lock()  # held while processing or committing; a hand-over waits for it
        self._io: tuple[Source, Sink] | None = None  # the source and sink of the running loop, for a hand-over
        self._fenced: SinkFenced | None = None  # a hand-over found the producer fenced: the loop deals with it
        self.stall_s = max(cfg.input.session_timeout_ms / 1000, 5.0)
        self.dead_letter_limit = 1_048_576  # the largest dead letter the sink and topic take (see run_daemon)
        self._refused: set[tuple[str, int, int]] = set()  # records whose dead letter Kafka refused: not sent again

    def is_ready(self) -> bool:
        """Restored and consuming, and the loop is turning (not stuck waiting on Kafka)."""
        return self.ready.is_set() and time.monotonic() - self.beat < self.stall_s

    @property
    def exactly_once(self) -> bool:
        """Whether alerts, checkpoints and offsets commit in one transaction."""
        return self.cfg.delivery.guarantee == "exactly_once"

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self.stop_event.set()

    def process(self, records: list[Record], source: Source, sink: Sink) -> BatchOutput:
        """Score one batch and send its alerts and rejects; commit when the commit interval has passed."""
        t0 = time.monotonic()
        if self.exactly_once and not self._in_txn:
            sink.begin()
            self._in_txn = True
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
            self._dead_letter(sink, rec, rej.reason, rej.detail, (rec.topic, rec.partition, rec.offset))
            self.metrics.rejects.labels(rej.reason).inc()
            if self._once.first(rej.reason):
                log.warning("rejected record %s[%d]@%d to %s: %s (%s); further '%s' rejects are only counted",
                            rec.topic, rec.partition, rec.offset, topic_dlq, rej.reason, rej.detail, rej.reason,
                            extra={"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                                   "reason": rej.reason})
        if self.cfg.output.scores_topic and out.windows is not None:
            self._send_scores(out, sink)
        if self.shadow is not None:
            self._score_shadow(records, sink)
        for tp, offset in next_offsets(records).items():
            self.pending[tp] = max(offset, self.pending.get(tp, 0))
        self._observe(records, out, t0)
        if time.monotonic() - self._last_commit >= self.cfg.delivery.commit_interval_ms / 1000:
            self.commit(source, sink)
        return out

    def _score_shadow(self, records: list[Record], sink: Sink) -> None:
        """Score the batch with the shadow model; its alerts go to the shadow topic (rejects: the live's did)."""
        assert self.shadow is not None
        out = self.shadow.process(records, now=time.time())
        topic = self.cfg.shadow_alerts_topic()
        for alert in out.alerts:
            sink.send(topic, *encode_alert(alert))
            self.metrics.shadow_alerts.labels(alert["kind"], alert["state"]).inc()
        if out.windows is not None and len(out.windows):
            self.metrics.shadow_windows.inc(len(out.windows))
            self.metrics.shadow_windows_above_p99.inc(above_p99(self.shadow, out))
        self.shadow.forgotten = []  # nothing of the shadow is checkpointed, so nothing to delete
        if time.monotonic() - self._agreement_at >= AGREEMENT_EVERY_S:  # it costs a lookup per stream
            self._agreement_at = time.monotonic()
            share = agreement(self.pipeline, self.shadow)
            if share is not None:
                self.metrics.shadow_agreement.set(share)

    def _dead_letter(self, sink: Sink, rec: Record, reason: str, detail: str,
                     tag: tuple[str, int, int] | None) -> None:
        """Send `rec` to the dead-letter topic, cut to fit it; not again once Kafka refused it (exactly_once)."""
        if tag is not None and tag in self._refused:
            return
        topic = self.cfg.output.dead_letter_topic
        letter = dead_letter(rec, reason, detail, self.dead_letter_limit)
        if letter.cut:
            self.metrics.dead_letters_cut.inc()
            if self._once.first("dead_letter_cut"):
                log.warning("dead letter of %s[%d]@%d cut to %d of its %d bytes to fit %s (%d bytes at most); its "
                            "headers value_bytes and value_sha256 describe the whole value; further cut dead letters "
                            "are only counted", rec.topic, rec.partition, rec.offset, len(letter.value),
                            len(rec.value or b""), topic, self.dead_letter_limit,
                            extra={"topic": rec.topic, "partition": rec.partition, "offset": rec.offset})
        sink.send_side(topic, letter.key, letter.value, letter.headers, tag)

    def on_refused(self, tag: object, exc: Exception) -> None:
        """Count and log a dead letter Kafka refused for good; the record is not dead-lettered again."""
        error = type(exc).__name__
        self.metrics.dead_letters_refused.labels(error).inc()
        if isinstance(tag, tuple):
            self._refused.add(tag)
        if self._once.first(f"dead_letter_refused:{error}"):
            where = f"{tag[0]}[{tag[1]}]@{tag[2]}" if isinstance(tag, tuple) else "a control command"
            log.error("dead letter of %s refused by Kafka (%s): dropped, counted in "
                      "detector_dead_letters_refused_total; check the dead-letter topic %s (write access, "
                      "max.message.bytes, and cleanup.policy: a compacted topic refuses records without a key); "
                      "further '%s' refusals are only counted", where, exc, self.cfg.output.dead_letter_topic, error)

    def _send_scores(self, out: BatchOutput, sink: Sink) -> None:
        ws, names, topic = out.windows, self.pipeline.engine.streams, self.cfg.output.scores_topic
        assert ws is not None and out.warning is not None and topic is not None
        for row, start, end, score, warning in zip(ws.rows.tolist(), ws.start_ts.tolist(), ws.end_ts.tolist(),
                                                   ws.score.tolist(), out.warning.tolist(), strict=True):
            stream = names[row]
            sink.send(topic, stream.encode(), orjson.dumps(
                {"stream": stream, "start": start, "end": end, "score": score, "warning": warning}))

    def commit(self, source: Source, sink: Sink) -> None:
        """Checkpoint the streams that changed, make everything durable, and commit the offsets it covers."""
        if not self.pending and not self._in_txn:  # nothing new: what is committed is current
            self._last_commit = time.monotonic()
            self.metrics.last_commit = time.time()
            return
        t0 = time.monotonic()
        n_bytes = 0
        checkpoints = snapshot(self.pipeline, self.pipeline.take_dirty()) if self.state is not None else []
        for cp in checkpoints:
            sink.send(self.state.topic, cp.stream.encode(), cp.value, partition=cp.partition)  # type: ignore[union-attr]
            n_bytes += len(cp.value)
        forgotten = self.pipeline.forgotten
        if forgotten:  # a stream held again since (it came back, or a new model took it up) keeps its checkpoint
            back = self.pipeline.engine.find([s for s, _, _ in forgotten]) >= 0
            forgotten = [f for f, b in zip(forgotten, back.tolist(), strict=True) if not b]
        if self.state is not None:  # a tombstone: the compacted topic drops the stream, a restore leaves it out
            for stream, _, partition in forgotten:
                sink.send(self.state.topic, stream.encode(), None, partition=partition)
        if self.exactly_once:
            sink.commit_transaction(self.pending, self._group if self._group is not None else source.group_metadata())
            self._in_txn = False
            self._control_dead = []
        else:
            self._flush(sink)
            source.commit(self.pending)
        self.committed.update(self.pending)
        self.pending = {}
        self.metrics.forgotten_streams.inc(len(forgotten))
        self.pipeline.forgotten = []
        if self._refused:  # a refused dead letter is remembered until its record is behind the commit
            self._refused = {r for r in self._refused if r[2] >= self.committed.get((r[0], r[1]), 0)}
        self._last_commit = time.monotonic()
        m = self.metrics
        m.commits.inc()
        m.commit_seconds.observe(self._last_commit - t0)
        m.checkpoints.inc(len(checkpoints))
        m.checkpoint_bytes.set(n_bytes)
        m.last_commit = time.time()

    def _flush(self, sink: Sink) -> None:
        """Wait for every acknowledgement; while Kafka is away, keep waiting (not ready) until stopped."""
        budget = self.cfg.runtime.shutdown_timeout_s
        waited, stopping_since = 0.0, None
        while True:
            try:
                sink.flush(budget)
                break
            except SinkTimeout as exc:
                waited += budget
                if self.stop_event.is_set():
                    if stopping_since is not None:
                        raise SinkError(f"stopping while Kafka does not acknowledge: {exc}") from exc
                    stopping_since = waited
                if self.ready.is_set():
                    log.warning("Kafka has not acknowledged alerts and checkpoints for %.0f s (%s); not ready, "
                                "waiting (nothing is committed until it does)", waited, exc)
                    self._set_ready(False)
        if (waited or self._blocked) and not self.ready.is_set():
            log.info("Kafka acknowledged again; ready")
            self._set_ready(True)
        self._blocked = False

    def _set_ready(self, ready: bool) -> None:
        """Say ready or not, on /readyz and in the detector_ready gauge."""
        if ready:
            self.ready.set()
        else:
            self.ready.clear()
        self.metrics.ready.set(int(ready))

    def _send_blocked(self, exc: Exception) -> None:
        """A send waited its limit for the brokers: not ready, and go on waiting unless stopping."""
        if self.stop_event.is_set():
            raise SinkError(f"stopping while Kafka does not take records: {exc}") from exc
        if self.ready.is_set():
            log.warning("Kafka does not take alerts and checkpoints (%s); not ready, waiting (nothing is committed "
                        "until it does)", exc)
            self._set_ready(False)
        self._blocked = True

    def _check_contact(self, source: Source) -> None:
        """While idle, at most once a second: not ready while the group coordinator does not answer."""
        now = time.monotonic()
        if now - getattr(self, "_contact_checked", 0.0) < 1.0 or now - self._rewound_at < self.stall_s:
            return  # just after a restore, the heartbeat age still counts the time before it
        self._contact_checked = now
        ok = source.connected()
        if not ok and self.ready.is_set():
            log.warning("lost contact with Kafka at %s (no group heartbeat answered for %.0f s); not ready, "
                        "retrying", self.cfg.kafka.bootstrap_servers, self.cfg.input.session_timeout_ms / 1000)
            self._set_ready(False)
        elif ok and not self.ready.is_set() and self._generation is not None:
            log.info("in contact with Kafka again; ready")
            self._set_ready(True)

    def sync(self, source: Source, sink: Sink) -> bool:
        """After a change of partition assignment: drop uncommitted work, restore the partitions now assigned.

        Returns True when it rewound (the records of the poll that saw the change must then be dropped).
        """
        generation = source.generation
        if generation == self._generation:
            return False
        self._generation = generation
        self.rewind(source, sink, "rebalance")
        return True

    def handover(self, partitions: set[tuple[str, int]]) -> None:
        """Before `partitions` are revoked: checkpoint and commit everything processed, for the next owner."""
        io = self._io
        if io is None:
            return
        if not self._work.acquire(timeout=self.stall_s):  # only a batch stuck on Kafka holds it that long
            self.metrics.handovers.labels("busy").inc()
            log.warning("hand-over of %d partitions skipped: a batch is still stuck on Kafka; the next owner reads "
                        "from the last commit", len(partitions))
            return
        try:
            if not self.pending and not self._in_txn:
                self.metrics.handovers.labels("nothing_pending").inc()
                return
            offsets = dict(self.pending)
            self.commit(*io)
        except (RebalanceError, SinkError, KafkaError) as exc:
            if isinstance(exc, SinkFenced):
                self._fenced = exc  # raised again on the loop's thread, where a new producer replaces this one
            self.metrics.handovers.labels("failed").inc()
            log.warning("hand-over of %d partitions not committed (%s); the next owner reads from the last commit",
                        len(partitions), exc)
        else:
            self.metrics.handovers.labels("committed").inc()
            log.info("handed over %d partitions: checkpointed and committed %s", len(partitions),
                     ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(offsets.items())))
        finally:
            self._work.release()

    def forget_transaction(self) -> None:
        """The producer of the open transaction is gone (fenced): nothing of it will commit."""
        self._in_txn = False

    def rewind(self, source: Source, sink: Sink, reason: str) -> None:
        """Go back to the last commit: abort the open transaction, restore the assigned streams, seek back."""
        t0 = time.monotonic()
        self._set_ready(False)
        self.metrics.rewinds.labels(reason).inc()
        if self._in_txn:
            sink.abort()
            self._in_txn = False
        self.pending = {}
        self.pipeline.forgotten = []  # forgotten again as the replay reaches them
        assigned = source.assignment()
        pipe = self.pipeline
        pipe.release(pipe.engine.live_rows())  # every stream is forgotten (those of revoked partitions for good) ...
        if self.shadow is not None:  # the shadow starts cold: it has no checkpoints ...
            self.shadow.release(self.shadow.engine.live_rows())
        report = None
        if self.state is not None and assigned:  # ... from the checkpoint of those on our partitions
            log.info("restoring the streams of %d partitions from %s", len(assigned), self.state.topic)
            # decoded as fetched: one fetch in memory at a time, into a table sized once for what may come
            chunks = self.state.read_chunks({p for _, p in assigned}, self.cfg.delivery.restore_timeout_s,
                                            self.stop_event, expect=pipe.engine.reserve)
            # Stopped: half-restored, nothing may be scored or committed. After a promotion or rollback, the
            # checkpoints the outgoing model wrote before it (a crash came before the switch was committed) go to
            # it, the shadow now, so that its open episodes are cleared once on the alerts topic
            switched = self._switched is not None and self.shadow is not None
            report = restore_chunks(pipe, chunks, only=assigned, also=self.shadow if switched else None)
            self.metrics.restored_streams.inc(report.restored)
            if report.also_restored and self._switched is not None and self.shadow is not None:
                self._retired += self.shadow.retire(*self._switched)
                log.info("%d streams of model %s restored from before the switch: %d open episodes to clear",
                         report.also_restored, self.shadow.manifest.model_version, len(self._retired))
                gone = self.shadow.engine.live_rows()
                self.pipeline.forgotten += self.shadow.forgotten_rows(gone)  # their checkpoints are deleted
                self.shadow.release(gone)  # the shadow starts cold after all
        source.rewind(assigned)
        self._group = source.group_metadata()
        seconds = time.monotonic() - t0
        self.metrics.restore_seconds.observe(seconds)
        self.metrics.active_streams.set(pipe.engine.live_streams)
        log.info("%s: %d partitions assigned (%s); restored %d streams in %.2f s%s", reason, len(assigned),
                 ",".join(f"{t}[{p}]" for t, p in sorted(assigned)) or "none",
                 report.restored if report else 0, seconds,
                 f"; skipped {report.skipped}" if report and report.skipped else "")
        if report and report.misfit:
            log.warning("checkpoint fields that do not fit this model or config were started fresh: %s",
                        ", ".join(report.misfit))
        release_free_heap()  # the streams let go and the restore's transient blocks: back to the system
        self._last_commit = self._rewound_at = time.monotonic()
        self._set_ready(True)

    def _observe(self, records: list[Record], out: BatchOutput, t0: float) -> None:
        m = self.metrics
        m.batch_size.observe(len(records))
        m.readings.inc(out.n_readings)
        m.replayed.inc(out.replayed)
        if out.windows is not None and len(out.windows):
            m.windows.inc(len(out.windows))
            m.windows_above_p99.inc(above_p99(self.pipeline, out))
        for alert in out.alerts:
            m.alerts.labels(alert["kind"], alert["state"]).inc()
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
        for r in (out.drifting if out.drifting is not None else [])[:DRIFT_LOGGED]:  # a few names; the gauge counts
            share = float(self.pipeline.drift.share[r])
            log.info("stream %s drifting: %.0f %% of its recent windows at or above the model's calibrated 0.99 "
                     "quantile (about 1 %% expected); a candidate for retraining", engine.streams[r], 100 * share,
                     extra={"stream": engine.streams[r]})
        m.drifting_streams.set(int(self.pipeline.drift.drifting(engine.live_rows()).sum()))
        m.active_streams.set(engine.live_streams)
        seen = engine.readings_seen()
        m.warming_streams.set(int((seen[engine.live_rows()] < self.cfg.alerts.warmup_readings).sum()))  # held ones
        now_ms = time.time() * 1000
        for r in records[:: max(1, len(records) // 64)]:
            if r.timestamp_ms > 0:
                m.latency.observe(max(now_ms - r.timestamp_ms, 0) / 1000)
        m.step_seconds.observe(time.monotonic() - t0)

    def apply_control(self, records: list[Record], sink: Sink, history: bool = False) -> None:
        """Apply operators' commands from the control topic and publish the `acknowledged` records they produce.

        A malformed command is counted, logged once per reason and (unless `history`: read at start-up, so
        already reported when it arrived) sent to the dead-letter topic like bad input, by one member only.
        """
        for rec in records:
            at = rec.timestamp_ms / 1000 if rec.timestamp_ms > 0 else time.time()
            try:
                cmd = parse_command(rec.value, at)
            except BadCommand as exc:
                self.metrics.control_commands.labels("invalid").inc()
                if self._once.first(exc.reason):
                    log.warning("rejected control command %s[%d]@%d: %s (%s); further '%s' commands are only counted",
                                rec.topic, rec.partition, rec.offset, exc.reason, exc.detail, exc.reason,
                                extra={"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
                                       "reason": exc.reason})
                if not history and self._reports_control():
                    self._publish_control(sink, [], (rec, exc))
                continue
            if cmd is None:  # a tombstone: an operator deleted the key, and a restart would not see it
                gone = deleted(rec.key)
                if gone is not None and gone[0] == "model":  # no promotion any more: model.path's is live
                    self._switch_model(None, rec, sink, history)
                elif gone is not None:
                    for pipe in (self.pipeline, self.shadow):
                        if pipe is not None:
                            pipe.forget(*gone)
                continue
            self.metrics.control_commands.labels(cmd.action).inc()
            if cmd.action in MODEL_ACTIONS:
                self._switch_model(cmd, rec, sink, history)
                continue
            out, matched = self.pipeline.command(cmd, {"topic": rec.topic, "partition": rec.partition,
                                                       "offset": rec.offset})
            if self.shadow is not None and cmd.action != "ack":  # mutes and labels hold for the shadow too
                self.shadow.command(cmd, {})
            if history:
                continue
            if cmd.action == "label":
                log.info("control: alert %s of %s labelled %s by %s (%s)", cmd.alert_id, cmd.streams, cmd.label,
                         cmd.by or "?", cmd.note or "no note")
            elif cmd.action == "ack":
                log.info("control: ack %s by %s (%s): %s", cmd.streams, cmd.by or "?", cmd.reason or "no reason",
                         f"{len(out)} open episodes acknowledged" if out else
                         "no open episode among the streams held here; ignored")
            else:
                log.info("control: %s %s by %s (%s)%s: %d streams held here match", cmd.action, cmd.streams,
                         cmd.by or "?", cmd.reason or "no reason",
                         f" until {iso(cmd.until)}" if cmd.until is not None else "", matched)
            self._publish_control(sink, out, None)

    def _switch_model(self, cmd: Command | None, rec: Record, sink: Sink, history: bool) -> None:
        """Make live the model a command names (promote: the loaded model of its version; rollback, or the key
        deleted: model.path's), between two batches; the other one goes on scoring as the shadow.

        The outgoing model's open episodes get `cleared` records (reason `model_promoted` or `model_rolled_back`)
        on the alerts topic; the incoming one's (until now on the shadow topic) are closed without a record and
        open again on the alerts topic if they last. Every stream it holds is checkpointed at the next commit, in
        its model version: a restore never mixes the two (another version's checkpoint starts the stream fresh).
        """
        action = cmd.action if cmd is not None else "rollback (the model:* key was deleted)"
        if cmd is not None and cmd.action == "promote":
            want = next((p for p in (self.pipeline, self.shadow)
                         if p is not None and p.manifest.model_version == cmd.version), None)
            if want is None:
                log.warning("control: promote %s ignored: the models loaded are %s", cmd.version, ", ".join(
                    f"{p.manifest.model_version} ({'live' if p is self.pipeline else 'shadow'})"
                    for p in (self.pipeline, self.shadow) if p is not None))
                return
        else:
            want = self._primary
        if want is self.pipeline:
            if not history:
                log.info("control: %s: %s is live already", action, want.manifest.model_version)
            return
        old = self.pipeline
        reason = "model_rolled_back" if want is self._primary else "model_promoted"
        cleared = old.retire(reason, rec)
        want.retire(reason, rec)
        want.dirty[want.engine.live_rows()] = True  # every stream's state, in the new version, at the next commit
        # the outgoing model's checkpoints that the incoming one will not overwrite (streams it has not seen since
        # it started) are deleted: restored later, their episodes, cleared here, would be cleared again
        held = old.engine.live_rows()
        unseen = held[want.engine.find([old.engine.streams[r] for r in held.tolist()]) < 0]
        want.forgotten = old.forgotten + old.forgotten_rows(unseen)
        old.forgotten = []
        self._switched = (reason, rec)
        self.pipeline, self.shadow = want, old
        self.cfg = want.cfg
        self._show_models()
        log.info("control: %s by %s: model %s is live, %s scores beside it as the shadow (%d open episodes cleared)",
                 action, cmd.by if cmd is not None and cmd.by else "?", want.manifest.model_version,
                 old.manifest.model_version, len(cleared))
        if not history:
            self._publish_control(sink, cleared, None)

    def _show_models(self) -> None:
        """Set the model gauge: which version is live, which the shadow."""
        self.metrics.model.clear()
        self.metrics.model.labels(self.pipeline.manifest.model_version, "live").set(1)
        if self.shadow is not None:
            self.metrics.model.labels(self.shadow.manifest.model_version, "shadow").set(1)

    def _reports_control(self) -> bool:
        """Whether this member dead-letters bad control commands: every member reads each one, so only the one
        holding partition 0 of the first input topic does (or a daemon outside a consumer group)."""
        if self._io is None or not self._io[0].grouped:
            return True
        try:
            return (self.cfg.input.topics[0], 0) in self._io[0].assignment()
        except KafkaError:
            return True

    def _publish_control(self, sink: Sink, alerts: list[dict[str, Any]], bad: tuple[Record, BadCommand] | None,
                         count: bool = True) -> None:
        """Send the records a command produced (acknowledgements, clears of a model switch), or a bad command to the
        dead-letter topic (exactly_once: in the open transaction; `count`: False where it is sent again)."""
        if not alerts and bad is None:
            return
        if self.exactly_once and not self._in_txn:
            sink.begin()
            self._in_txn = True
        for alert in alerts:
            sink.send(self.cfg.output.alerts_topic, *encode_alert(alert))
            self.metrics.alerts.labels(alert["kind"], alert["state"]).inc()
            if alert["state"] == "acknowledged":
                log.info("alert acknowledged %s stream=%s by=%s", alert["alert_id"], alert["stream"], alert["by"],
                         extra={"stream": alert["stream"]})
        if bad is not None:
            rec, exc = bad
            self._dead_letter(sink, rec, exc.reason, exc.detail, None)
            if count:
                self.metrics.rejects.labels(exc.reason).inc()
            if self.exactly_once:
                self._control_dead.append(bad)
        if not self.exactly_once:
            self._flush(sink)  # rare, and tied to no input offset: made durable now, not at the next commit

    def _follow_control(self, sink: Sink) -> None:
        """Between batches: acks seen before reach restored episodes; apply new commands; count muted streams."""
        if self.control is None:
            return
        if self._control_restore != self._rewound_at:  # a restore since the last turn
            self._control_restore = self._rewound_at
            retired, self._retired = self._retired, []
            self._publish_control(sink, retired + self.pipeline.reapply_acks(), None)
            lost, self._control_dead = self._control_dead, []  # dead letters of an aborted transaction
            for bad in lost if self._reports_control() else []:
                self._publish_control(sink, [], bad, count=False)
        try:
            records = self.control.poll_batch(0)
        except KafkaError as exc:
            if self._once.first("control_unreadable"):
                log.warning("cannot read the control topic (%s); retrying between batches", exc)
            return
        if records:
            self.apply_control(records, sink)
        if records or time.monotonic() - self._muted_counted >= 1.0:  # it costs streams x mute rules
            self._muted_counted = time.monotonic()
            rows = None  # in a group: only the streams of the partitions held now, not those handed over
            if self._io is not None and self._io[0].grouped:
                rows = self.pipeline.rows_on(self._io[0].assignment())
            self.metrics.muted_streams.set(self.pipeline.mutes.count(time.time(), rows))

    def reload(self, path: str | Path) -> bool:
        """Load the config file again and apply its live sections; an invalid file changes nothing."""
        try:
            new = load_config(path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config reload rejected, the running config stays: %s: %s", exc.path, problem)
            return False
        shadow_cfg = self.shadow.cfg if self.shadow is not None else None
        try:
            if self.shadow is not None:  # first: a reload the shadow refuses changes nothing in the live pipeline
                self.shadow.reconfigure(new)
            changes = self.pipeline.reconfigure(new)
        except DetectorError as exc:
            if self.shadow is not None and self.shadow.cfg is not shadow_cfg:  # the live one refused: back too
                self.shadow.reconfigure(shadow_cfg)  # type: ignore[arg-type]
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
        self._io = (source, sink)
        sink.on_refused = self.on_refused
        sink.on_blocked = self._send_blocked
        source.on_revoke(self.handover)
        try:
            while not self.stop_event.is_set():
                self.beat = time.monotonic()
                self._maybe_reload()
                with self._work:
                    self._follow_control(sink)
                records = source.poll_batch(timeout)  # a revocation's hand-over runs in here
                with self._work:
                    self._turn(records, source, sink)
            with self._work:
                try:
                    self.commit(source, sink)
                except RebalanceError as exc:
                    log.warning("final commit refused, the group has moved on (%s); the new owner reads it again",
                                exc)
        finally:
            source.on_revoke(None)  # closing the consumer revokes too: by then everything is committed
            self._io = None

    def _turn(self, records: list[Record], source: Source, sink: Sink) -> None:
        """One turn of the loop after a poll: rewind after a rebalance, else process (or commit when idle)."""
        if self._fenced is not None:
            fenced, self._fenced = self._fenced, None
            raise fenced
        try:
            if self.sync(source, sink):
                return  # records fetched before the rewind; they are read again
            if records:
                self.process(records, source, sink)
            else:
                if time.monotonic() - self._last_commit >= self.cfg.delivery.commit_interval_ms / 1000:
                    self.commit(source, sink)
                self._check_contact(source)
        except RebalanceError as exc:
            log.warning("commit refused (%s): going back to the last commit", exc)
            self._generation = source.generation
            self.rewind(source, sink, "commit_refused")
        else:
            if records or not self.pending:
                for (topic, p), lag in source.lag().items():
                    self.metrics.lag.labels(topic, str(p)).set(lag)


class _AuthFailureWatch(logging.Handler):
    """Keeps the last SASL rejection kafka-python logs: its clients then raise only "Unable to bootstrap"."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failure: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Remember a SaslAuthenticationFailedError among the record's arguments."""
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, SaslAuthenticationFailedError):
                self.failure = str(arg).rsplit("SaslAuthenticationFailedError: ", 1)[-1]


def _connect(cfg: Config, stop: threading.Event) -> tuple[KafkaSource, KafkaSink] | None:
    """Connect the consumer and producer, retrying with backoff until connected or stopped."""
    client = kafka_client_settings(cfg)
    k = cfg.kafka
    delay = 1.0
    watch = _AuthFailureWatch()
    logging.getLogger("kafka").addHandler(watch)
    try:
        while not stop.is_set():
            watch.failure = None
            try:
                source = KafkaSource(k.bootstrap_servers, cfg.input.topics, cfg.input.group_id, client=client,
                                     auto_offset_reset=cfg.input.auto_offset_reset,
                                     max_poll_records=cfg.input.max_poll_records,
                                     session_timeout_ms=cfg.input.session_timeout_ms)
                try:
                    sink = KafkaSink(k.bootstrap_servers, client=client, **producer_settings(cfg))
                except Exception:
                    source.close()
                    raise
                log.info("connected to Kafka at %s; consuming %s as group %s (%s)", k.bootstrap_servers,
                         ",".join(cfg.input.topics), cfg.input.group_id, cfg.delivery.guarantee)
                return source, sink
            except KafkaError as exc:
                rejected = watch.failure or (str(exc) if isinstance(exc, SaslAuthenticationFailedError) else None)
                if rejected:
                    log.error("Kafka at %s rejected user %r: authentication failed (%s); check kafka.sasl_mechanism, "
                              "kafka.sasl_username and kafka.sasl_password; retrying in %.0f s",
                              k.bootstrap_servers, k.sasl_username, rejected, delay)
                elif k.security_protocol.startswith("SASL"):
                    log.warning("cannot connect to Kafka at %s (%s); retrying in %.0f s (check kafka.bootstrap_servers,"
                                " kafka.ssl_cafile, and kafka.sasl_username and kafka.sasl_password: kafka-python does"
                                " not always tell a rejected login from a dropped connection)",
                                k.bootstrap_servers, type(exc).__name__, delay)
                else:
                    log.warning("cannot reach Kafka at %s (%s); retrying in %.0f s (kafka.bootstrap_servers)",
                                k.bootstrap_servers, type(exc).__name__, delay)
                stop.wait(delay)
                delay = min(delay * 2, k.connect_retry_max_s)
    finally:
        logging.getLogger("kafka").removeHandler(watch)
    return None


def _new_producer(cfg: Config, stop: threading.Event) -> KafkaSink:
    """A new transactional producer, retrying with backoff while Kafka is away; SinkError when stopped first."""
    delay = 1.0
    while True:
        try:
            return KafkaSink(cfg.kafka.bootstrap_servers, client=kafka_client_settings(cfg), **producer_settings(cfg))
        except KafkaError as err:
            if stop.is_set():
                raise SinkError(f"stopped before a new producer could start ({type(err).__name__})") from err
            log.warning("cannot start a new producer yet (%s); retrying in %.0f s", type(err).__name__, delay)
            stop.wait(delay)
            delay = min(delay * 2, cfg.kafka.connect_retry_max_s)


def producer_settings(cfg: Config) -> dict[str, Any]:
    """The producer's settings from the config: its batch size, and its transaction (none for at_least_once)."""
    batching = {"batch_bytes": cfg.output.batch_bytes}
    if cfg.delivery.guarantee != "exactly_once":
        return batching
    tid = cfg.delivery.transactional_id or f"{cfg.input.group_id}-{socket.gethostname()}"
    return {**batching, "transactional_id": tid, "transaction_timeout_ms": cfg.delivery.transaction_timeout_ms}


def _dead_letter_limit(cfg: Config, sink: KafkaSink) -> int:
    """The largest dead letter that both the producer and the dead-letter topic take (larger ones are cut)."""
    topic = cfg.output.dead_letter_topic
    try:
        found = max_message_bytes(cfg.kafka.bootstrap_servers, topic, client=kafka_client_settings(cfg))
        why = "topic not found"
    except KafkaError as exc:
        found, why = None, type(exc).__name__
    if found is None:
        log.warning("cannot read max.message.bytes of the dead-letter topic %s (%s); dead letters are cut to fit %d "
                    "bytes, the producer's limit (output.dead_letter_topic)", topic, why, sink.max_request_bytes)
        return sink.max_request_bytes
    limit = min(found, sink.max_request_bytes)
    log.info("dead-letter topic %s takes records of up to %d bytes; larger dead letters are cut to fit (headers "
             "value_bytes, value_sha256)", topic, limit)
    return limit


def _ensure_state_topic(cfg: Config, state: StateTopic, stop: threading.Event) -> bool:
    """Create or check the state topic; wait (with backoff) while the input topics do not exist yet."""
    delay = 1.0
    while not stop.is_set():
        try:
            n = state.ensure(cfg.input.topics, cfg.delivery.state_replication, cfg.delivery.state_segment_ms)
            log.info("state topic %s: %d partitions, compacted", state.topic, n)
            return True
        except StateTopicError as exc:
            if not exc.retriable:
                log.error("cannot use the state topic %s: %s", state.topic, exc)
                return False
            log.warning("%s; waiting for them, retrying in %.0f s", exc, delay)
        except KafkaError as exc:
            log.warning("cannot check the state topic %s (%s); retrying in %.0f s", state.topic,
                        type(exc).__name__, delay)
        stop.wait(delay)
        delay = min(delay * 2, cfg.kafka.connect_retry_max_s)
    return False


def _start_control(cfg: Config, daemon: Daemon, control: ControlTopic, sink: Sink) -> bool:
    """Create or check the control topic and apply what it holds; wait (with backoff) while Kafka is away."""
    delay = 1.0
    while not daemon.stop_event.is_set():
        try:
            n = control.ensure(cfg.control.replication)
            history, complete = control.open(n, cfg.delivery.restore_timeout_s, daemon.stop_event)
            break
        except ControlTopicError as exc:
            log.error("cannot use the control topic %s: %s", control.topic, exc)
            return False
        except KafkaError as exc:
            log.warning("cannot read the control topic %s (%s); retrying in %.0f s", control.topic,
                        type(exc).__name__, delay)
        daemon.stop_event.wait(delay)
        delay = min(delay * 2, cfg.kafka.connect_retry_max_s)
    else:
        return False
    daemon.apply_control(history, sink, history=True)
    mutes = daemon.pipeline.mutes
    log.info("control topic %s: %d commands read%s, %d muted globs; following it", control.topic, len(history),
             "" if complete else f" (not to its end within {cfg.delivery.restore_timeout_s:g} s: the rest follows)",
             sum(c.action == "mute" for c in mutes.rules.values()))
    return True


def run_daemon(cfg: Config, stop: threading.Event | None = None, config_path: str | Path | None = None,
               reload: threading.Event | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or `stop` is set); return the process exit code.

    With `config_path`, edits of that file (or SIGHUP, which sets `reload`) reload its thresholds, alerts and
    sensors sections.
    """
    stop = stop if stop is not None else threading.Event()
    reload = reload if reload is not None else threading.Event()
    if threading.current_thread() is threading.main_thread():
        install_signals(stop, reload)  # first: a SIGTERM while the model loads stops cleanly too
    device = pick_device(cfg.model.device)
    threads = use_threads(cfg.model.threads)
    artifact = load_artifact(cfg.model.path)  # on the CPU: the engine takes its own copy to the device
    check_features(artifact, cfg.model.features)
    pipeline = Pipeline(cfg, artifact, str(device))  # its engine refuses a model.precision the device cannot run
    shadow = None
    if cfg.model.shadow:
        candidate = load_artifact(cfg.model.shadow)
        check_shadow(candidate, artifact)
        shadow = Pipeline(cfg, candidate, str(device))
        log.info("shadow model %s (%s) from %s: its would-be alerts go to %s", candidate.manifest.name,
                 candidate.manifest.model_version, cfg.model.shadow, cfg.shadow_alerts_topic())
    precision = pipeline.engine.precision  # in use: auto resolved
    log.info("model %s (%s) on %s (%d CPU thread%s, %s%s): %d features, window %d, hop %d; config %s",
             artifact.manifest.name, artifact.manifest.model_version, device, threads, "" if threads == 1 else "s",
             precision, ", from model.precision auto" if cfg.model.precision == "auto" else "",
             len(artifact.manifest.features), artifact.manifest.window, artifact.manifest.hop, config_hash(cfg))
    log.info("effective config: %s", cfg.masked())
    state = StateTopic(cfg.kafka.bootstrap_servers, cfg.state_topic(), client=kafka_client_settings(cfg))
    control = ControlTopic(cfg.kafka.bootstrap_servers, cfg.control_topic(), client=kafka_client_settings(cfg)) \
        if cfg.control.enabled else None
    daemon = Daemon(cfg, pipeline, state=state, control=control, shadow=shadow)
    daemon.metrics.ready.set_function(lambda: float(daemon.is_ready()))
    # what start-up built (modules, the model) lives as long as the process: keep the cyclic garbage collector
    # from scanning it again and again (each full collection then stalled the loop for 0.1-0.4 s)
    gc.collect()
    gc.freeze()
    if config_path is not None:
        daemon.watch(config_path)
    daemon.stop_event, daemon.reload_requested = stop, reload
    if stop.is_set():
        log.info("stopped before connecting")
        return 0
    with ExitStack() as stack:
        if cfg.metrics.enabled:
            health = HealthServer(daemon.metrics, cfg.metrics.host, cfg.metrics.port)
            health.ready_check = daemon.is_ready  # /readyz: connected, restored, and the loop not stuck on Kafka
            health.start()
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
        stack.callback(daemon.ready.clear)
        daemon.dead_letter_limit = _dead_letter_limit(cfg, sink)
        if not _ensure_state_topic(cfg, state, daemon.stop_event):
            return 2 if not daemon.stop_event.is_set() else 0
        if control is not None:
            stack.callback(control.close)
            if not _start_control(cfg, daemon, control, sink):
                return 2 if not daemon.stop_event.is_set() else 0
        try:
            fenced_at = -math.inf
            while True:
                try:
                    daemon.loop(source, sink)
                    break
                except SinkFenced as exc:
                    if time.monotonic() - fenced_at < 60:
                        raise SinkError(f"{exc} twice within a minute: is another daemon running with "
                                        f"transactional_id {producer_settings(cfg)['transactional_id']!r}?") from exc
                    fenced_at = time.monotonic()
                    log.warning("%s (the broker aborted its transaction after delivery.transaction_timeout_ms, or its "
                                "coordinator moved); starting a new producer and going back to the last commit", exc)
                    sink.close()
                    sink = _new_producer(cfg, daemon.stop_event)
                    stack.callback(sink.close)
                    daemon.forget_transaction()
                    daemon.rewind(source, sink, "fenced")
        except SinkError as exc:
            log.error("alerts, dead letters or checkpoints were not acknowledged (%s); exiting without committing "
                      "them: what they cover is read again at the next start", exc)
            return 1
        except Stopped as exc:
            log.info("stopped while %s: nothing committed since the last commit; what follows it is read again at "
                     "the next start", exc)
            return 0
        log.info("stopping: last batch flushed and committed (%s)",
                 ", ".join(f"{t}[{p}]={o}" for (t, p), o in sorted(daemon.committed.items())) or "nothing read")
    return 0
