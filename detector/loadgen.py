"""`detector simulate`: the demo's simulated fleet published to Kafka at a target rate, with a ground truth.

The fleet is generated a chunk at a time (`chunk` readings of every stream, in groups of at most
`GROUP_STREAMS` streams), so memory stays bounded however long the run: one chunk holds
streams x chunk x features float32 values (50 x 1440 x 8: 2.3 MB; 10,000 streams: 460 MB). Chunk 0 of a fleet
of at most `GROUP_STREAMS` streams is exactly `simulate_fleet(streams, features, chunk, normal_readings=normal,
seed=seed)`: the same machines as `detector demo --seed SEED` (the demo draws 3,600 readings, so its load
schedule differs; the machines, their operating levels and noise scales, do not). Each later chunk replays the
same machines' normal behaviour, shifted in time, with new faults (seeded by the seed and the chunk number) and
no fault-free lead-in; the seam between two chunks is a jump in load and weather, not a fault.

Readings go out time-major (every stream's reading of one step, then the next step), one JSON message per
reading keyed by stream id, in the wire format of the README:
`{"stream": "pump-007", "ts": 1700000000.0, "values": {"temp": 61.2, ...}}`, values rounded to 4 decimals,
a missing value left out and nothing sent for a whole-reading gap. With `per_message` n > 1 a stream's
readings are held until it has n, then go out as one message in the batched form `form`: a list of readings
(`{"stream", "readings": [{"ts", "values"}, ...]}`) or columns (`{"stream", "readings": {"ts": [...],
"values": {"temp": [...], ...}}}`, a missing value null); the run's last readings go out in shorter ones.

Event time: by default (`start=None`) each step is stamped with the wall clock when its first reading goes out
(milliseconds, strictly increasing), so event time keeps pace with real time at any rate. With a `start`
epoch each step is `step` seconds after the previous one: reproducible, but at high rates event time runs
ahead of the wall clock, and the daemon rejects readings more than `input.max_future_s` ahead of it.

The ground truth is one JSON line per injected fault, written once its last step has gone out (or, for a fault
under way when the run stops, at the stop, with `"complete": false` and `end` cut to the steps sent):
`{"stream", "kind", "features", "start", "end", "start_ts", "end_ts", "complete"}`, where [start, end) are the
stream's step indices counted from the run's first step and start_ts / end_ts the event times of its first and
last faulty step.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import IO, Any

import numpy as np
import orjson

from detector.errors import DetectorError
from detector.simulate import FEATURES, Fault, Fleet, simulate_fleet

__all__ = ["GROUP_STREAMS", "SimulateParams", "SimulateResult", "Pacer", "fleet_chunk", "run_simulate",
           "publish", "columnar"]

log = logging.getLogger(__name__)

GROUP_STREAMS = 256
"""Streams simulated in one `simulate_fleet` call (bounds the generator's peak memory, about 0.5 KB a step)."""

_SIM_EPOCH = 1_700_000_000.0  # event time of step 0 for the signal's daily cycle when stamping with the wall clock


@dataclass(frozen=True, slots=True)
class SimulateParams:
    """What `detector simulate` publishes, how fast, and for how long (None: until stopped)."""

    streams: int = 50
    features: int = 8
    rate: float = 1000.0  # readings per second, all streams together; 0: as fast as Kafka takes them
    readings: int | None = None  # stop after this many readings in all
    duration: float | None = None  # stop after this many seconds
    faults: float = 0.5  # share of the streams given one fault in each chunk
    normal: int = 240  # fault-free steps at the start of the run
    chunk: int = 1440  # steps generated at a time (a day at one reading a minute)
    step: float = 60.0  # seconds between two steps of a stream, with `start`
    start: float | None = None  # event time of step 0 (epoch s); None: stamp each step with the wall clock
    seed: int = 7
    per_message: int = 1  # readings of one stream per message (more than 1: the batched forms)
    form: str = "list"  # the batched form: "list" of readings, or "columns" (a list per field)

    def check(self) -> None:
        """Raise DetectorError naming the first option that is out of range."""
        problems = [
            (self.streams < 1, f"--streams must be at least 1 (got {self.streams})"),
            (not 1 <= self.features <= len(FEATURES),
             f"--features must be between 1 and {len(FEATURES)} (got {self.features})"),
            (not (self.rate >= 0 and math.isfinite(self.rate)), f"--rate must be 0 or more (got {self.rate})"),
            (self.readings is not None and self.readings < 1, f"--readings must be at least 1 (got {self.readings})"),
            (self.duration is not None and not self.duration > 0, f"--duration must be positive (got {self.duration})"),
            (not 0.0 <= self.faults <= 1.0, f"--faults must be between 0 and 1 (got {self.faults})"),
            (self.normal < 0, f"--normal must not be negative (got {self.normal})"),
            (self.chunk < 1, f"--chunk must be at least 1 (got {self.chunk})"),
            (not self.step > 0, f"--step must be positive (got {self.step})"),
            (not 1 <= self.per_message <= 10_000,
             f"--per-message must be between 1 and 10000 (got {self.per_message})"),
            (self.form not in ("list", "columns"), f"--form must be list or columns (got {self.form!r})"),
        ]
        for bad, message in problems:
            if bad:
                raise DetectorError(message)


@dataclass(frozen=True, slots=True)
class SimulateResult:
    """What one run published."""

    sent: int  # readings handed to the producer
    steps: int  # steps begun
    faults: int  # ground-truth lines written
    seconds: float

    def summary_line(self) -> str:
        """The machine-readable last line of `detector simulate`."""
        rate = self.sent / self.seconds if self.seconds > 0 else 0.0
        return (f"simulate: sent={self.sent} steps={self.steps} faults={self.faults} seconds={self.seconds:.1f} "
                f"rate={rate:.0f}/s")


class Pacer:
    """Spaces sends to `rate` per second on a monotonic clock (rate 0: no waiting); the clock is injectable.

    >>> now = [0.0]
    >>> pacer = Pacer(100.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    >>> pacer.wait(50); now[0]
    0.5
    """

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate, self._clock, self._sleep = rate, clock, sleep
        self.t0 = clock()

    def wait(self, sent: int) -> None:
        """Sleep until `sent` readings are due since the start."""
        if self.rate <= 0:
            return
        ahead = self.t0 + sent / self.rate - self._clock()
        if ahead > 0:
            self._sleep(ahead)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def fleet_chunk(p: SimulateParams, index: int) -> Fleet:
    """Chunk `index` of the run's fleet: steps [index * chunk, (index + 1) * chunk), faults in run step indices.

    >>> p = SimulateParams(streams=6, features=3, chunk=400, normal=200, seed=1, start=0.0)
    >>> a, b = fleet_chunk(p, 0), simulate_fleet(6, 3, 400, normal_readings=200, seed=1, start=0.0)
    >>> bool(np.array_equal(a.values, b.values, equal_nan=True)) and a.faults == b.faults
    True
    >>> later = fleet_chunk(p, 1)
    >>> later.timestamps[0], all(400 <= f.start < f.end <= 800 for f in later.faults), len(later.faults)
    (np.float64(24000.0), True, 3)
    """
    S, T = p.streams, p.chunk
    width = max(3, len(str(S - 1)))
    base = (_SIM_EPOCH if p.start is None else p.start) + index * T * p.step
    parts = []
    for g, first in enumerate(range(0, S, GROUP_STREAMS)):
        n = min(GROUP_STREAMS, S - first)
        part = simulate_fleet(n, p.features, T, normal_readings=p.normal if index == 0 else 0, step_seconds=p.step,
                              start=base, fault_fraction=p.faults,
                              seed=p.seed if g == 0 else _derived_seed(p.seed, g),
                              fault_seed=None if index == 0 else _derived_seed(p.seed, g, index))
        names = [f"pump-{first + s:0{width}d}" for s in range(n)]
        rename = dict(zip(part.streams, names, strict=True))
        faults = [replace(f, stream=rename[f.stream], start=f.start + index * T, end=f.end + index * T)
                  for f in part.faults]
        parts.append((names, part.values, faults, part.timestamps))
    values = parts[0][1] if len(parts) == 1 else np.concatenate([v for _, v, _, _ in parts], axis=0)
    faults = sorted((f for *_, fs, _ in parts for f in fs), key=lambda f: (f.start, f.stream))
    return Fleet([s for names, *_ in parts for s in names], list(FEATURES[: p.features]), parts[0][3], values,
                 faults, p.normal if index == 0 else 0)


class _Truth:
    """Writes a ground-truth line per fault as the run passes its last step (or stops inside it)."""

    def __init__(self, out: IO[str] | None) -> None:
        self.out = out
        self.starting: dict[int, list[Fault]] = {}
        self.ending: dict[int, list[Fault]] = {}
        self.open: dict[Fault, float] = {}
        self.step, self.ts, self.written = -1, 0.0, 0

    def add(self, faults: list[Fault]) -> None:
        for f in faults:
            self.starting.setdefault(f.start, []).append(f)
            self.ending.setdefault(f.end - 1, []).append(f)

    def begin(self, step: int, ts: float) -> None:
        self.step, self.ts = step, ts
        for f in self.starting.pop(step, []):
            self.open[f] = ts

    def end(self, step: int) -> None:
        for f in self.ending.pop(step, []):
            if f in self.open:
                self._write(f, f.end, self.open.pop(f), self.ts, True)

    def close(self) -> None:
        for f, start_ts in sorted(self.open.items(), key=lambda kv: (kv[0].start, kv[0].stream)):
            self._write(f, min(f.end, self.step + 1), start_ts, self.ts, False)
        self.open.clear()

    def _write(self, f: Fault, end: int, start_ts: float, end_ts: float, complete: bool) -> None:
        self.written += 1
        if self.out is not None:
            self.out.write(orjson.dumps({"stream": f.stream, "kind": f.kind, "features": list(f.features),
                                         "start": f.start, "end": end, "start_ts": start_ts, "end_ts": end_ts,
                                         "complete": complete}).decode() + "\n")
            self.out.flush()


def run_simulate(p: SimulateParams, send: Callable[[bytes, bytes], object], truth: IO[str] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 wall: Callable[[], float] = time.time, stop: Callable[[], bool] = lambda: False,
                 progress_s: float = 10.0) -> SimulateResult:
    """Hand readings to `send(key, value)`, paced, until `p.readings` or `p.duration` is reached or `stop()`.

    `stop` is polled between slices of readings (5 ms of the target rate, or 1,000 readings when unpaced).
    """
    p.check()
    pacer = Pacer(p.rate, clock=clock, sleep=sleep)
    t0, wall0 = pacer.t0, wall()
    per_slice = max(1, int(p.rate / 200)) if p.rate > 0 else 1000
    limit = p.readings if p.readings is not None else math.inf
    deadline = t0 + p.duration if p.duration is not None else math.inf
    gt = _Truth(truth)
    sent, last_ms, steps = 0, 0, 0
    next_log, logged_at, logged_sent = t0 + progress_s, t0, 0
    feats = list(FEATURES[: p.features])
    pack = _Packer(send, p.per_message, p.form, feats)
    done = False
    for index in itertools.count():
        fleet = fleet_chunk(p, index)
        gt.add(fleet.faults)
        keys = [s.encode() for s in fleet.streams]
        for t in range(p.chunk):
            step = index * p.chunk + t
            if p.start is None:
                last_ms = max(int((wall0 + clock() - t0) * 1000.0), last_ms + 1)
                ts = last_ms / 1000.0
            else:
                ts = float(fleet.timestamps[t])
            gt.begin(step, ts)
            steps += 1
            block = fleet.values[:, t, :]
            present = ~np.isnan(block).all(axis=1)
            rows = np.round(block.astype(np.float64), 4).tolist()
            for s in np.flatnonzero(present).tolist():
                vals = {f: v for f, v in zip(feats, rows[s], strict=True) if v == v}
                pack.add(keys[s], fleet.streams[s], ts, vals)
                sent += 1
                if sent >= limit:
                    done = True
                elif sent % per_slice == 0:
                    pacer.wait(sent)
                    now = clock()
                    done = now >= deadline or stop()
                    if now >= next_log:
                        log.info("simulate: %d readings sent, %.0f/s over the last %.0f s, step %d", sent,
                                 (sent - logged_sent) / max(now - logged_at, 1e-9), now - logged_at, step)
                        next_log, logged_at, logged_sent = now + progress_s, now, sent
                if done:
                    if not present[s + 1:].any():  # the step's last reading went out: its faults are whole
                        gt.end(step)
                    break
            else:
                gt.end(step)
            if done:
                break
        if done:
            break
    pack.flush()
    gt.close()
    return SimulateResult(sent, steps, gt.written, clock() - t0)


def columnar(readings: list[dict[str, Any]], features: list[str]) -> dict[str, Any]:
    """Readings of one stream ({"ts", "values"} each) in the columnar batched form, a missing value null.

    A sensor missing from every reading is left out.
    """
    return {"ts": [r["ts"] for r in readings],
            "values": {f: [r["values"].get(f) for r in readings] for f in features
                       if any(f in r["values"] for r in readings)}}


class _Packer:
    """Turns readings into messages: one each, or `n` of a stream at a time in a batched form."""

    def __init__(self, send: Callable[[bytes, bytes], object], n: int, form: str, features: list[str]) -> None:
        self.send, self.n, self.form, self.features = send, n, form, features
        self.pending: dict[bytes, tuple[str, list[dict[str, Any]]]] = {}

    def add(self, key: bytes, stream: str, ts: float, values: dict[str, float]) -> None:
        """Send the reading, or hold it until its stream has `n` readings waiting."""
        if self.n == 1:
            self.send(key, orjson.dumps({"stream": stream, "ts": ts, "values": values}))
            return
        _, held = self.pending.setdefault(key, (stream, []))
        held.append({"ts": ts, "values": values})
        if len(held) == self.n:
            self._send(key)

    def flush(self) -> None:
        """Send every reading still held, in shorter messages."""
        for key in list(self.pending):
            self._send(key)

    def _send(self, key: bytes) -> None:
        stream, held = self.pending.pop(key)
        readings = held if self.form == "list" else columnar(held, self.features)
        self.send(key, orjson.dumps({"stream": stream, "readings": readings}))


def publish(p: SimulateParams, bootstrap: str, topic: str, truth: IO[str] | None = None, *,
            stop: Callable[[], bool] = lambda: False, connect_timeout_s: float = 30.0) -> SimulateResult:
    """Publish the run to `topic` on Kafka (acks=all, idempotent); raise DetectorError if it cannot.

    Raises when the brokers or the topic cannot be reached, and when any reading was not acknowledged.
    """
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.errors import KafkaError
    from kafka.partitioner.default import murmur2

    p.check()
    timeout_ms = int(connect_timeout_s * 1000)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="detector-simulate",
                                 bootstrap_timeout_ms=timeout_ms)
        try:
            topics = set(admin.list_topics())
        finally:
            admin.close()
        if topic not in topics:
            raise DetectorError(f"--topic: topic {topic!r} not found on {bootstrap} (create it first, e.g. with "
                                "kafka-topics.sh --create; the broker may not create topics on first use)")
        producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="detector-simulate", acks="all",
                                 linger_ms=10, batch_size=256 * 1024, bootstrap_timeout_ms=timeout_ms)
    except KafkaError as exc:
        raise DetectorError(f"--bootstrap: cannot reach Kafka at {bootstrap} ({type(exc).__name__}: {exc})") from None
    failed: list[BaseException] = []
    # The default partitioner's choice for a keyed record (murmur2, as Java's client), computed once per stream
    # instead of once per reading: it was a fifth of send()'s time.
    partitions = sorted(producer.partitions_for(topic))
    partition_of: dict[bytes, int] = {}

    def send(key: bytes, value: bytes) -> None:
        part = partition_of.get(key)
        if part is None:
            part = partition_of[key] = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
        producer.send(topic, key=key, value=value, partition=part).add_errback(failed.append)

    try:
        result = run_simulate(p, send, truth, stop=stop)
        producer.flush(timeout=60)
    except KafkaError as exc:
        raise DetectorError(f"Kafka at {bootstrap} stopped taking readings ({type(exc).__name__}: {exc})") from None
    finally:
        producer.close(timeout=10)
    if failed:
        raise DetectorError(f"{len(failed)} of {result.sent} readings were not acknowledged by Kafka at {bootstrap} "
                            f"(first: {type(failed[0]).__name__}: {failed[0]})")
    return result
