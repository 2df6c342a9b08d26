"""`detector simulate`: the demo's fleet on the wire, paced, bounded, with a ground truth that matches it."""

from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from detector.cli import main
from detector.errors import DetectorError
from detector.loadgen import GROUP_STREAMS, Pacer, SimulateParams, fleet_chunk, publish, run_simulate
from detector.simulate import FEATURES, NOISE_SIGMA, fleet_records, simulate_fleet
from tests.kafka_broker import free_ports

START = 1_700_000_000.0


class FakeClock:
    """A monotonic clock that only moves when someone sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.slept += s

    def wall(self) -> float:
        return START + self.now


def collect(p: SimulateParams, **kw: Any) -> tuple[list[tuple[bytes, dict[str, Any]]], list[dict[str, Any]], Any]:
    sent: list[tuple[bytes, dict[str, Any]]] = []
    truth = io.StringIO()
    fake = FakeClock()
    kw = {"clock": fake.clock, "sleep": fake.sleep, "wall": fake.wall, **kw}
    result = run_simulate(p, lambda k, v: sent.append((k, orjson.loads(v))), truth, **kw)
    return sent, [orjson.loads(line) for line in truth.getvalue().splitlines()], result


def expected_records(p: SimulateParams, n_steps: int) -> list[dict[str, Any]]:
    fleet = simulate_fleet(p.streams, p.features, p.chunk, normal_readings=p.normal, fault_fraction=p.faults,
                           seed=p.seed, step_seconds=p.step, start=START)
    out = []
    for rec in fleet_records(fleet, 0, n_steps):
        out.append({**rec, "values": {k: round(float(np.float32(v)), 4) for k, v in rec["values"].items()}})
    return out


def test_readings_are_the_demo_fleet_in_the_wire_format() -> None:
    p = SimulateParams(streams=12, features=5, rate=0, chunk=400, normal=150, seed=3, start=START, readings=4830)
    sent, _, result = collect(p)
    want = expected_records(p, 400)
    assert any(len(w["values"]) < 5 for w in want)  # gaps: a missing value is left out of the reading
    got = [body for _, body in sent[: len(want)]]
    assert [(g["stream"], g["ts"]) for g in got] == [(w["stream"], w["ts"]) for w in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == {"stream", "ts", "values"}
        assert g["values"].keys() == w["values"].keys() and set(g["values"]) <= set(FEATURES[:5])
        assert np.allclose(list(g["values"].values()), list(w["values"].values()), rtol=0, atol=1e-4)
    assert all(key == body["stream"].encode() for key, body in sent)
    assert result.sent == len(sent) == 4830  # the bound holds across the chunk seam
    assert any(body["ts"] == START + 400 * 60.0 for _, body in sent)  # the second chunk continues the clock


@pytest.mark.parametrize("form", ["list", "columns"])
def test_batched_forms_carry_exactly_the_readings_of_single_messages(form: str) -> None:
    from consumers.base import Record
    from detector.decode import Decoder

    p = SimulateParams(streams=12, features=5, rate=0, chunk=400, normal=150, seed=3, start=START, readings=4830)

    def decoded(params: SimulateParams) -> tuple[list[tuple[bytes, dict[str, Any]]], Any]:
        sent, _, result = collect(params)
        recs = [Record("t", 0, i, k, orjson.dumps(body), 0) for i, (k, body) in enumerate(sent)]
        readings, rejects = Decoder(list(FEATURES[:5])).decode(recs, now=START + 1e9)
        assert rejects == [] and result.sent == len(readings) == 4830
        order = np.lexsort((readings.ts, readings.streams.astype(str)))
        return sent, (readings.streams[order], readings.ts[order], readings.values[order])

    _, single = decoded(p)
    sent, packed = decoded(replace(p, per_message=7, form=form))
    assert np.array_equal(packed[0], single[0]) and np.array_equal(packed[1], single[1])
    assert np.array_equal(packed[2], single[2], equal_nan=True) and np.isnan(single[2]).any()  # gaps kept
    assert all(key == body["stream"].encode() for key, body in sent)
    sizes = [len(body["readings"]["ts"] if form == "columns" else body["readings"]) for _, body in sent]
    assert max(sizes) == 7 and sizes.count(7) >= len(sizes) - 12  # the run's last readings go out shorter
    with pytest.raises(DetectorError, match="--per-message"):
        replace(p, per_message=0).check()
    with pytest.raises(DetectorError, match="--form"):
        replace(p, per_message=2, form="rows").check()


def test_pacing_holds_the_rate_and_the_duration_bound() -> None:
    p = SimulateParams(streams=10, rate=1000.0, readings=5000, seed=1)
    _, _, result = collect(p)
    assert result.sent == 5000 and result.seconds == pytest.approx(5.0, abs=0.01)
    p = SimulateParams(streams=10, rate=500.0, duration=3.0, seed=1)
    sent, _, result = collect(p)
    assert 1495 <= len(sent) <= 1505 and result.seconds == pytest.approx(3.0, abs=0.02)
    stops = iter([False, False, True])
    sent, _, _ = collect(SimulateParams(streams=10, rate=1000.0, seed=1), stop=lambda: next(stops))
    assert len(sent) == 3 * 5  # stopped at the third slice check (5 readings per 5 ms at 1000/s)


def test_pacer_sleeps_only_when_ahead() -> None:
    fake = FakeClock()
    pacer = Pacer(200.0, clock=fake.clock, sleep=fake.sleep)
    pacer.wait(100)
    assert fake.slept == pytest.approx(0.5)
    fake.now += 2.0  # the sender fell behind: no sleep until it has caught up
    pacer.wait(200)
    assert fake.slept == pytest.approx(0.5)
    Pacer(0.0, clock=fake.clock, sleep=fake.sleep).wait(10**9)
    assert fake.slept == pytest.approx(0.5)


def test_live_event_time_follows_the_wall_clock_and_strictly_increases() -> None:
    sent, _, _ = collect(SimulateParams(streams=4, rate=100.0, readings=400, seed=2))
    by_stream: dict[str, list[float]] = {}
    for _, body in sent:
        by_stream.setdefault(body["stream"], []).append(body["ts"])
    for ts in by_stream.values():
        assert all(b > a for a, b in zip(ts, ts[1:], strict=False))
    first, last = sent[0][1]["ts"], sent[-1][1]["ts"]
    assert first == pytest.approx(START + 100.0, abs=0.01) and last - first == pytest.approx(4.0, abs=0.1)
    fast, _, _ = collect(SimulateParams(streams=2, rate=0, readings=2000, seed=2))  # no clock movement at all
    steps = sorted({body["ts"] for _, body in fast})
    assert len(steps) >= 999 and all(b - a > 0.00099 for a, b in zip(steps, steps[1:], strict=False))


def test_ground_truth_lists_every_injected_fault_with_its_times_across_chunks() -> None:
    p = SimulateParams(streams=20, features=8, rate=0, chunk=300, normal=100, seed=5, start=START)
    chunks = [fleet_chunk(p, i) for i in range(3)]
    limit = sum(int((~np.isnan(c.values).all(axis=2)).sum()) for c in chunks)  # exactly three chunks
    sent, truth, result = collect(replace(p, readings=limit))
    assert result.sent == limit and result.steps == 900
    want = [f for c in chunks for f in c.faults]
    assert len(want) == 3 * 10  # half the streams, each chunk
    assert {(t["stream"], t["start"]) for t in truth} == {(f.stream, f.start) for f in want}
    faults = {(f.stream, f.start): f for f in want}
    for t in truth:
        f = faults[(t["stream"], t["start"])]
        assert (t["kind"], tuple(t["features"]), t["end"], t["complete"]) == (f.kind, f.features, f.end, True)
        assert t["start_ts"] == START + 60.0 * f.start and t["end_ts"] == START + 60.0 * (f.end - 1)
    assert all(100 <= f.start for f in chunks[0].faults)  # the fault-free lead-in
    assert [(f.stream, f.kind) for f in chunks[1].faults] != [(f.stream, f.kind) for f in chunks[0].faults]
    # the faulty readings on the wire are the injected ones: a spike's values differ from the clean fleet's
    clean = simulate_fleet(20, 8, 300, normal_readings=100, seed=5, start=START, fault_fraction=0.0)
    spike = next(f for f in chunks[0].faults if f.kind == "spike")
    s, feat = clean.streams.index(spike.stream), FEATURES.index(spike.features[0])
    on_wire = {body["ts"]: body["values"] for _, body in sent if body["stream"] == spike.stream}
    moved = on_wire[START + 60.0 * spike.start][spike.features[0]] - float(clean.values[s, spike.start, feat])
    assert abs(moved) > 5 * NOISE_SIGMA[spike.features[0]]


def test_a_fault_under_way_at_the_stop_is_written_incomplete() -> None:
    p = SimulateParams(streams=10, rate=0, chunk=1000, normal=100, seed=4, start=START)
    fleet = fleet_chunk(p, 0)
    longest = max(fleet.faults, key=lambda f: f.end - f.start)
    stop_step = (longest.start + longest.end) // 2
    limit = int((~np.isnan(fleet.values[:, :stop_step, :]).all(axis=2)).sum()) + 1  # one reading into stop_step
    sent, truth, result = collect(replace(p, readings=limit))
    assert result.steps == stop_step + 1
    line = next(t for t in truth if (t["stream"], t["start"]) == (longest.stream, longest.start))
    assert line["complete"] is False and line["end"] == stop_step + 1 and line["end_ts"] == START + 60.0 * stop_step
    assert all(t["start"] <= stop_step for t in truth)
    assert {(t["stream"], t["start"]) for t in truth if t["complete"]} == \
        {(f.stream, f.start) for f in fleet.faults if f.end - 1 < stop_step}


def test_large_fleets_are_simulated_in_groups_with_unique_stream_ids() -> None:
    p = SimulateParams(streams=GROUP_STREAMS + 44, features=2, chunk=40, normal=10, seed=9, start=START)
    fleet = fleet_chunk(p, 0)
    assert fleet.values.shape == (300, 40, 2) and len(set(fleet.streams)) == 300
    assert fleet.streams[0] == "pump-000" and fleet.streams[-1] == "pump-299"
    first = simulate_fleet(GROUP_STREAMS, 2, 40, normal_readings=10, seed=9, start=START)
    assert np.array_equal(fleet.values[:GROUP_STREAMS], first.values, equal_nan=True)
    assert round(0.5 * GROUP_STREAMS) + round(0.5 * 44) == len(fleet.faults)


def test_bad_options_are_refused_before_kafka_is_contacted(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DetectorError, match="--faults"):
        SimulateParams(faults=1.5).check()
    with pytest.raises(DetectorError, match="--streams"):
        SimulateParams(streams=0).check()
    assert main(["simulate", "--bootstrap", "127.0.0.1:1", "--rate", "-5"]) == 2
    assert "--rate must be 0 or more" in capsys.readouterr().err
    assert main(["simulate", "--bootstrap", "127.0.0.1:1", "--start", "yesterday"]) == 2
    assert "--start" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--bootstrap", "x:1", "--duration", "5", "--readings", "10"])


def test_unreachable_kafka_is_one_clear_error(capsys: pytest.CaptureFixture) -> None:
    (port,) = free_ports(1)
    t0 = time.monotonic()
    with pytest.raises(DetectorError, match=f"--bootstrap: cannot reach Kafka at 127.0.0.1:{port}"):
        publish(SimulateParams(readings=10), f"127.0.0.1:{port}", "t", connect_timeout_s=2.0)
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------------------------- real Kafka


def consume_all(bootstrap: str, topic: str, want: int, timeout_s: float = 60.0) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=2000)
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            out.extend(m for msgs in batch.values() for m in msgs)
            if len(out) >= want and not batch:
                break
    finally:
        consumer.close()
    return out


@pytest.mark.kafka
def test_simulate_publishes_the_fleet_and_its_truth_to_kafka(kafka_bootstrap: str, topic_factory: Any,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    topic = topic_factory(partitions=4)
    truth_path = tmp_path / "truth.jsonl"
    n, streams = 4000, 20
    args = ["simulate", "--bootstrap", kafka_bootstrap, "--topic", topic, "--streams", str(streams), "--rate", "2500",
            "--readings", str(n), "--chunk", "400", "--normal", "60", "--start", "2023-11-14T22:13:20Z",
            "--seed", "3", "--truth", str(truth_path)]
    t0 = time.monotonic()
    assert main(args) == 0
    elapsed = time.monotonic() - t0
    assert elapsed >= n / 2500 * 0.95  # paced: 1.6 s at 2,500 readings/s
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"simulate: sent={n} ")

    msgs = consume_all(kafka_bootstrap, topic, n)
    assert len(msgs) == n
    bodies = [orjson.loads(m.value) for m in msgs]
    assert all(m.key == b["stream"].encode() for m, b in zip(msgs, bodies, strict=True))
    assert all(set(b) == {"stream", "ts", "values"} and b["values"] for b in bodies)
    partitions: dict[str, set[int]] = {}
    for m, b in zip(msgs, bodies, strict=True):
        partitions.setdefault(b["stream"], set()).add(m.partition)
    assert len(partitions) == streams and all(len(p) == 1 for p in partitions.values())  # keyed: one partition
    assert len({p for ps in partitions.values() for p in ps}) > 1

    p = SimulateParams(streams=streams, chunk=400, normal=60, seed=3, start=START)
    want = expected_records(p, 400)[:n]
    got = sorted(bodies, key=lambda b: (b["ts"], b["stream"]))
    assert [(b["stream"], b["ts"]) for b in got] == [(w["stream"], w["ts"]) for w in want]
    assert all(np.allclose(list(b["values"].values()), list(w["values"].values()), rtol=0, atol=1e-4)
               for b, w in zip(got, want, strict=True))

    last_step = int((max(b["ts"] for b in bodies) - START) / 60.0)
    fleet = fleet_chunk(p, 0)
    truth = [orjson.loads(line) for line in truth_path.read_text().splitlines()]
    assert {(t["stream"], t["kind"], t["start"]) for t in truth} == \
        {(f.stream, f.kind, f.start) for f in fleet.faults if f.start <= last_step}
    assert truth, "the run should cover some faults"
    for t in truth:
        f = next(f for f in fleet.faults if (f.stream, f.start) == (t["stream"], t["start"]))
        assert t["features"] == list(f.features) and t["start_ts"] == START + 60.0 * f.start
        if t["complete"]:
            assert t["end"] == f.end and t["end_ts"] == START + 60.0 * (f.end - 1)
        else:
            assert t["end"] == last_step + 1 <= f.end


@pytest.mark.kafka
def test_sigterm_stops_the_simulator_cleanly_with_the_faults_under_way(kafka_bootstrap: str, topic_factory: Any,
                                                                        tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    topic = topic_factory(partitions=2)
    truth_path = tmp_path / "truth.jsonl"
    # Every stream has a fault in each chunk of 300 steps (10 readings a second of 40 streams: a step is 0.1 s);
    # in the first chunk one ends at step 33, and some are under way from step 32 to 299. SIGTERM goes once the
    # first has been written complete, by progress, not after a guessed start-up time: the stop then lands
    # inside the faults that are still running, with some 26 s to spare for a slow machine.
    proc = subprocess.Popen([sys.executable, "-m", "detector", "simulate", "--bootstrap", kafka_bootstrap, "--topic",
                             topic, "--streams", "40", "--rate", "400", "--normal", "0", "--faults", "1", "--chunk",
                             "300", "--truth", str(truth_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (truth_path.exists() and '"complete":true' in truth_path.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no fault written complete in 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)  # it would run for ever without the signal
    assert proc.returncode == 0, err
    summary = out.strip().splitlines()[-1]
    sent = int(summary.split("sent=")[1].split()[0])
    assert sent > 1000
    truth = [orjson.loads(line) for line in truth_path.read_text().splitlines()]
    assert any(t["complete"] for t in truth) and any(not t["complete"] for t in truth), truth  # 40 faults a chunk
    assert len(consume_all(kafka_bootstrap, topic, sent)) == sent  # everything handed over was flushed
