"""Failure tests against a real Apache Kafka: crashes, rebalances, bad input at volume, a broker that goes away.

Each compares what the daemon published with the uninterrupted run of the same input (tests/reliability.py).
docs/reliability.md says what each proves and the figures measured.
"""

from __future__ import annotations

import collections
import random
import re
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.kafka_broker import create_topic, free_ports
from tests.reliability import (
    DaemonProc,
    Feeder,
    Outcome,
    RestartableBroker,
    daemon_tracebacks,
    fleet,
    identity,
    read_all,
    reference,
    total_committed,
    wait_until,
)
from tests.test_daemon_kafka import end_offsets, model_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.kafka

STREAMS, READINGS = 50, 2000  # 100,000 readings
KILL_POINTS = (0.10, 0.25, 0.45, 0.65, 0.85)  # shares of the input: each SIGKILL lands before the next


def write_config(path: Path, bootstrap: str, names: dict[str, str], group: str, model: Path, guarantee: str,
                 extra: str = "", member: str = "", delivery: str = "") -> Path:
    """A daemon config for these topics, with short intervals so that the tests stay quick.

    `extra` is appended as top-level YAML; `delivery` adds keys to the delivery section ("state_replication: 3").
    """
    path.write_text(f"""
kafka: {{bootstrap_servers: "{bootstrap}", connect_retry_max_s: 2, connect_timeout_ms: 2000}}
input: {{topics: [{names['input']}], group_id: {group}, max_poll_records: 500, session_timeout_ms: 6000}}
output: {{alerts_topic: {names['alerts']}, dead_letter_topic: {names['dlq']}, scores_topic: {names['scores']}}}
delivery: {{guarantee: {guarantee}, commit_interval_ms: 300, transactional_id: "{group}-tx{member}",
           transaction_timeout_ms: 10000, restore_timeout_s: 60{", " + delivery if delivery else ""}}}
model: {{path: "{model}", device: cpu}}
alerts: {{k: 2, n: 3}}
sensors: {{flatline_readings: 10}}
metrics: {{port: {free_ports(1)[0]}}}
{extra}
""")
    return path


def topics(topic_factory, partitions: int = 4) -> dict[str, str]:
    """Fresh input, alerts, dead-letter and scores topics."""
    return {"input": topic_factory(partitions=partitions), "alerts": topic_factory(partitions=2),
            "dlq": topic_factory(partitions=1), "scores": topic_factory(partitions=4)}


def outcome(bootstrap: str, names: dict[str, str]) -> Outcome:
    """What a read_committed reader sees on the alerts and scores topics."""
    return Outcome.from_records([m.value for m in read_all(bootstrap, names["alerts"])],
                                [m.value for m in read_all(bootstrap, names["scores"])])


def compare(got: Outcome, ref: Outcome, exactly_once: bool, restarts: int) -> dict[str, int]:
    """Assert the guarantee's promise; return the duplicate counts."""
    assert ref.alerts and {a["kind"] for a in ref.alerts} >= {"anomaly", "sensor_fault"}
    ref_ids = collections.Counter(identity(a) for a in ref.alerts)
    got_ids = collections.Counter(identity(a) for a in got.alerts)
    assert set(got_ids) == set(ref_ids), (f"missing {set(ref_ids) - set(got_ids)}, "
                                          f"extra {set(got_ids) - set(ref_ids)}")
    assert set(got.scores) == set(ref.scores), "every window scored (none missing, none invented)"
    for key, ref_score in ref.scores.items():
        np.testing.assert_allclose(got.scores[key], ref_score[0], rtol=2e-4, atol=1e-6, err_msg=str(key))
    dup_alerts = sum(n - 1 for n in got_ids.values())
    dup_scores = sum(len(v) - 1 for v in got.scores.values())
    if exactly_once:
        assert dup_alerts == 0 and dup_scores == 0, f"{dup_alerts} alerts and {dup_scores} scores seen twice"
    else:
        assert max(got_ids.values()) <= 1 + restarts, got_ids.most_common(3)
    return {"duplicate_alerts": dup_alerts, "duplicate_scores": dup_scores}


def restore_lines(text: str) -> list[tuple[int, float]]:
    """(streams restored, seconds) of every restore of assigned partitions that the daemon logged."""
    return [(int(n), float(s)) for p, n, s in
            re.findall(r"(\d+) partitions assigned .*; restored (\d+) streams in ([\d.]+) s", text) if int(p)]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_sigkill_five_times_loses_nothing(kafka_bootstrap: str, topic_factory, group_id: str, model_dir: Path,  # noqa: F811
                                         tmp_path: Path, guarantee: str, record_property) -> None:
    names = topics(topic_factory)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, names, group_id, model_dir, guarantee)
    items = fleet(STREAMS, READINGS)
    ref = reference(cfg, items)
    # Kill k lands between points k-1 and k of the input: after the (restarted) daemon has committed past
    # point k-1, and before the feeder, held at point k until that kill, has produced any further; so all five
    # land mid-stream, each with input left for the next start, however slow the machine or its restarts.
    points = [int(share * len(items)) for share in KILL_POINTS]
    feeder = Feeder(kafka_bootstrap, names["input"], items, rate=2500, limit=points[0])
    feeder.start()
    daemon = DaemonProc(cfg, tmp_path / "daemon.log")
    rng = random.Random(5)
    at_kill: list[tuple[int, int]] = []  # (input offsets committed, readings sent) at each kill

    def alive() -> None:
        assert daemon.alive(), daemon.text()
        assert feeder.error is None, feeder.error

    def progress() -> int:
        return total_committed(kafka_bootstrap, group_id, names["input"])

    daemon.start()
    for k, past in enumerate([0, *points[:-1]]):
        wait_until(lambda: progress() > past, 90, f"a commit past reading {past} before kill {k + 1}", alive)  # noqa: B023
        time.sleep(rng.uniform(0.05, 1.5))  # somewhere in the batches after that commit
        daemon.kill()
        at_kill.append((progress(), feeder.sent))
        daemon.start()
        feeder.allow(points[k + 1] if k + 1 < len(points) else len(items))
    assert all(lo < committed and sent <= hi < len(items) for (committed, sent), lo, hi in
               zip(at_kill, [0, *points[:-1]], points, strict=True)), f"kills outside their share: {at_kill}, {points}"
    feeder.join(120)
    assert feeder.error is None, feeder.error
    ends = end_offsets(kafka_bootstrap, names["input"], 4)
    assert sum(ends.values()) == len(items)
    wait_until(lambda: total_committed(kafka_bootstrap, group_id, names["input"]) == len(items), 120,
               "the last daemon to commit everything", lambda: None)
    assert daemon.stop() == 0, daemon.text()
    text = daemon.text()
    assert not daemon_tracebacks(text), "\n\n".join(daemon_tracebacks(text))

    dups = compare(outcome(kafka_bootstrap, names), ref, guarantee == "exactly_once", restarts=5)
    restores = restore_lines(text)
    # every start after the first restores what the commits before its kill covered: checkpoints only accumulate
    # (how many streams a killed run reached depends on the machine's speed, so no fixed count is asserted)
    counts = [n for n, _ in restores]
    assert len(restores) >= 6 and all(n > 0 for n in counts[1:]) and counts[1:] == sorted(counts[1:]), restores
    record_property("restores", restores)
    record_property("duplicates", dups)
    print(f"\n{guarantee}: kills at (committed, sent) {at_kill} of {len(items)}; restores {restores}; {dups}")


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_scale_one_to_three_to_one_loses_nothing(kafka_bootstrap: str, topic_factory, group_id: str,
                                                 model_dir: Path, tmp_path: Path, guarantee: str) -> None:  # noqa: F811
    names = topics(topic_factory)
    configs = [write_config(tmp_path / f"c{i}.yaml", kafka_bootstrap, names, group_id, model_dir, guarantee,
                            member=str(i)) for i in range(3)]
    items = fleet(STREAMS, READINGS, seed=1)
    ref = reference(configs[0], items)
    # The feeder is held at a quarter of the input until the group has grown, then at three fifths until the
    # three members have committed, and let go as the two leave: the scale-in happens with input still arriving
    # however long the members take to start.
    feeder = Feeder(kafka_bootstrap, names["input"], items, rate=2500, limit=len(items) // 4)
    feeder.start()
    daemons = [DaemonProc(c, tmp_path / f"daemon{i}.log") for i, c in enumerate(configs)]

    def progress() -> int:
        return total_committed(kafka_bootstrap, group_id, names["input"])

    def alive() -> None:
        for d in daemons:
            assert d.proc is None or d.proc.returncode is not None or d.alive(), d.text()
        assert feeder.error is None, feeder.error

    daemons[0].start()
    wait_until(lambda: progress() > 0, 90, "the first member to commit", alive)
    daemons[1].start()
    daemons[2].start()
    owned = re.compile(r"rebalance: ([1-9]) partitions assigned")
    wait_until(lambda: all(owned.search(d.text()) for d in daemons[1:]), 90, "the new members to get partitions",
               alive)
    mark = progress()
    feeder.allow(len(items) * 3 // 5)
    wait_until(lambda: progress() > mark + 3000, 90, "the three members to commit", alive)
    sent_at_scale_in = feeder.sent
    feeder.allow(len(items))
    assert [d.stop() for d in daemons[1:]] == [0, 0], daemons[1].text() + daemons[2].text()
    feeder.join(120)
    assert feeder.error is None, feeder.error
    assert sent_at_scale_in <= len(items) * 3 // 5, "scaled in while readings were still arriving"
    wait_until(lambda: progress() == len(items), 120, "the last member to commit everything", alive)
    assert daemons[0].stop() == 0, daemons[0].text()
    for d in daemons:
        assert not daemon_tracebacks(d.text()), "\n\n".join(daemon_tracebacks(d.text()))
    text = daemons[0].text()
    assert len(re.findall(r"rebalance: \d+ partitions assigned", text)) >= 3, "member 0 saw the group grow and shrink"
    dups = compare(outcome(kafka_bootstrap, names), ref, guarantee == "exactly_once", restarts=2)
    print(f"\n{guarantee}: 1 -> 3 -> 1 members; restores of member 0 {restore_lines(text)}; {dups}")


def scrape(port: int) -> str:
    """A daemon's /metrics page; empty when it does not answer."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return ""


def metric(port: int, name: str, page: str | None = None) -> float:
    """A metric's value (summed over its labels) from a daemon's /metrics, or from `page`; 0 when none answers."""
    text = scrape(port) if page is None else page
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def lags(page: str) -> dict[str, float]:
    """detector_consumer_lag by its labels (topic, partition) on a /metrics page."""
    return {labels: float(v) for labels, v in re.findall(r"^detector_consumer_lag\{([^}]*)\} (\S+)$", page, re.M)}


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_revoked_partitions_are_handed_over_checkpointed_and_committed(kafka_bootstrap: str, topic_factory,
                                                                      group_id: str, model_dir: Path,  # noqa: F811
                                                                      tmp_path: Path, guarantee: str) -> None:
    # commits every 10 minutes: within this test only a hand-over on revocation can commit anything
    names = topics(topic_factory)
    configs = [write_config(tmp_path / f"c{i}.yaml", kafka_bootstrap, names, group_id, model_dir, guarantee,
                            member=str(i)) for i in range(2)]
    for c in configs:
        c.write_text(c.read_text().replace("commit_interval_ms: 300", "commit_interval_ms: 600000")
                     .replace("transaction_timeout_ms: 10000", "transaction_timeout_ms: 900000"))
    ports = [int(re.search(r"metrics: \{port: (\d+)\}", c.read_text()).group(1)) for c in configs]  # type: ignore[union-attr]
    items = fleet(24, 600, seed=6)
    ref = reference(configs[0], items)
    feeder = Feeder(kafka_bootstrap, names["input"], items, rate=50_000)
    feeder.run()
    assert feeder.error is None, feeder.error
    first, second = (DaemonProc(c, tmp_path / f"daemon{i}.log") for i, c in enumerate(configs))

    def alive() -> None:
        for d in (first, second):
            assert d.proc is None or d.alive(), d.text()

    first.start()
    wait_until(lambda: metric(ports[0], "detector_readings_total") >= len(items), 120, "the first member to score "
               "every reading", alive)
    assert total_committed(kafka_bootstrap, group_id, names["input"]) == 0, "nothing committed before the rebalance"
    second.start()
    owned = re.compile(r"rebalance: ([1-9]) partitions assigned")
    wait_until(lambda: owned.search(second.text()) and len(owned.findall(first.text())) >= 2, 90,
               "the second member to get partitions", alive)
    # the first member's hand-over committed everything it had scored, before the second one restored
    assert total_committed(kafka_bootstrap, group_id, names["input"]) == len(items), first.text()
    assert "handed over 4 partitions: checkpointed and committed" in first.text(), first.text()
    restored = [n for n, _ in restore_lines(second.text())]
    assert restored and restored[-1] > 0, second.text()
    # each member comes to hold the streams of its own partitions only: the first one forgets those it handed over
    def held() -> list[float]:
        return [metric(p, "detector_active_streams") for p in ports]

    wait_until(lambda: held() == [restore_lines(d.text())[-1][0] for d in (first, second)] and sum(held()) == 24,
               60, "each member to hold only its own partitions' streams", alive)
    # the second member has nothing to read (the committed offsets are the end offsets): once it has fetched at
    # its position on every partition it owns (its lag gauge is set per partition after such a fetch), it has
    # scored nothing
    assigned = int(owned.findall(second.text())[-1])
    wait_until(lambda: len(lags(scrape(ports[1]))) >= assigned, 60, "the second member to fetch its partitions", alive)
    page = scrape(ports[1])
    assert page and metric(ports[1], "detector_readings_total", page) == 0 and set(lags(page).values()) == {0.0}, page
    assert [d.stop() for d in (second, first)] == [0, 0]
    for d in (first, second):
        assert not daemon_tracebacks(d.text()), "\n\n".join(daemon_tracebacks(d.text()))
    dups = compare(outcome(kafka_bootstrap, names), ref, exactly_once=True, restarts=0)  # nothing scored twice
    print(f"\n{guarantee}: hand-over committed {len(items)} readings; second member restored {restored}; {dups}")


def malformed(items: list[tuple[bytes, bytes]], every: int = 10, seed: int = 3) -> tuple[list, collections.Counter]:
    """`items` with a malformed record after every `every` good ones (13 kinds), and the reasons expected."""
    rng = random.Random(seed)
    now = time.time()
    kinds = [
        ("bad_json", lambda k, v: (k, v[: len(v) // 2])),
        ("bad_values", lambda k, v: (k, b'{"stream":"' + k + b'","ts":1700000000,"values":[1,2,3]}')),
        ("bad_timestamp", lambda k, v: (k, b'{"stream":"' + k + b'","ts":true,"values":{"temp":1.0}}')),
        ("missing_stream", lambda k, v: (k, b'{"ts":1700000000,"values":{"temp":1.0}}')),
        ("missing_timestamp", lambda k, v: (k, b'{"stream":"' + k + b'","values":{"temp":1.0}}')),
        ("non_numeric_value", lambda k, v: (k, b'{"stream":"' + k + b'","ts":1700000000,"values":{"temp":"NaN"}}')),
        ("unknown_feature", lambda k, v: (k, b'{"stream":"' + k + b'","ts":1700000000,"values":{"rpm":1}}')),
        ("bad_json", lambda k, v: (k, bytes(rng.getrandbits(8) for _ in range(64)) + b"\xff")),  # binary garbage
        ("future_timestamp", lambda k, v: (k, v.replace(b'"ts":', b'"ts":%d,"_":' % (now + 30 * 86400), 1))),
        ("empty_value", lambda k, v: (k, b"")),
        ("duplicate_key", lambda k, v: (k, v.replace(b'{"stream":', b'{"stream":"other","stream":', 1))),
        ("key_mismatch", lambda k, v: (b"m" + k, v)),
        ("duplicate_timestamp", lambda k, v: (k, v.replace(b'"temp":', b'"temp":1', 1))),  # same ts, other value
    ]
    out, expected = [], collections.Counter()
    for i, (key, value) in enumerate(items):
        out.append((key, value))
        if i % every == every - 1:
            n = len(out) // every
            reason, make = kinds[n % len(kinds)] if n % 50 else ("oversize", lambda k, v: (k, v + b" " * 70_000))
            out.append(make(key, value))
            expected[reason] += 1
    return out, expected


def rss_mib(pid: int) -> float:
    """Resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_ten_thousand_malformed_records_go_to_the_dead_letter_topic(kafka_bootstrap: str, topic_factory,
                                                                    group_id: str, model_dir: Path,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    names = topics(topic_factory)
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, names, group_id, model_dir, "at_least_once",
                       extra="")
    cfg.write_text(cfg.read_text().replace("session_timeout_ms: 6000}",
                                           "session_timeout_ms: 6000, max_message_bytes: 65536}"))
    good = fleet(STREAMS, READINGS, seed=2)
    items, expected = malformed(good)
    assert sum(expected.values()) >= 10_000 and len(expected) >= 13, expected
    ref = reference(cfg, good)
    t0 = time.monotonic()
    feeder = Feeder(kafka_bootstrap, names["input"], items, rate=50_000, extra={"max_request_size": 4 << 20})
    feeder.run()
    assert feeder.error is None, feeder.error
    t1 = time.monotonic()
    daemon = DaemonProc(cfg, tmp_path / "daemon.log").start()
    samples = []

    def alive() -> None:
        assert daemon.alive(), daemon.text()

    for share in (0.25, 0.5, 0.75, 1.0):
        wait_until(lambda: total_committed(kafka_bootstrap, group_id, names["input"]) >= share * len(items), 180,  # noqa: B023
                   f"{share:.0%} committed", alive)
        samples.append(rss_mib(daemon.proc.pid))  # type: ignore[union-attr]
    t2 = time.monotonic()
    assert daemon.stop() == 0, daemon.text()
    text = daemon.text()
    assert not daemon_tracebacks(text), "\n\n".join(daemon_tracebacks(text))
    print(f"\nproduced {len(items)} in {t1 - t0:.1f} s, scored and committed in {t2 - t1:.1f} s")
    dead = read_all(kafka_bootstrap, names["dlq"])
    reasons = collections.Counter(dict(m.headers)["reason"].decode() for m in dead)
    assert reasons == expected
    assert all(dict(m.headers)["source"].startswith(names["input"].encode()) for m in dead)
    sent_bad = collections.Counter(v for _, v in items) - collections.Counter(v for _, v in good)
    assert collections.Counter(m.value or b"" for m in dead) == sent_bad, "each dead letter is the original bytes"
    for reason in expected:
        assert text.count(f": {reason} (") == 1, f"'{reason}' is logged once, then only counted"
    got = outcome(kafka_bootstrap, names)
    # the repeated readings also flag their streams' clocks (sensors.timestamp_faults): raised, then cleared
    order = [a for a in got.alerts if a.get("reason") == "duplicate_timestamp"]
    assert order and {a["kind"] for a in order} == {"sensor_fault"}
    assert {a["state"] for a in order} == {"raised", "cleared"} and len(order) <= 2 * expected["duplicate_timestamp"]
    got.alerts = [a for a in got.alerts if a.get("reason") != "duplicate_timestamp"]
    compare(got, ref, exactly_once=True, restarts=0)  # and the good readings' alerts are exactly the clean run's
    assert samples[-1] <= samples[0] * 1.15 + 16, f"resident memory grew: {samples} MiB"
    print(f"\nbad input: {dict(expected)}; RSS at 25/50/75/100% committed: {[round(s) for s in samples]} MiB")


def ready(port: int) -> int:
    """The status code of /readyz (0 when it does not answer)."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_broker_away_at_start_and_for_30_s_mid_run(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    broker = RestartableBroker()
    try:
        names = {k: f"{k}-{uuid.uuid4().hex[:8]}" for k in ("input", "alerts", "dlq", "scores")}
        group = f"g-{uuid.uuid4().hex}"
        cfg = write_config(tmp_path / "c.yaml", broker.bootstrap, names, group, model_dir, "exactly_once")
        port = int(re.search(r"metrics: \{port: (\d+)\}", cfg.read_text()).group(1))  # type: ignore[union-attr]
        items = fleet(STREAMS, 1200, seed=4)
        ref = reference(cfg, items)
        daemon = DaemonProc(cfg, tmp_path / "daemon.log").start()

        def alive() -> None:
            assert daemon.alive(), daemon.text()

        # 1. no broker at all: the daemon retries with backoff and is not ready
        wait_until(lambda: daemon.text().count("cannot reach Kafka at") >= 2, 60, "two retries", alive)
        assert ready(port) == 503
        broker.start()
        for name, parts in (("input", 4), ("alerts", 2), ("dlq", 1), ("scores", 4)):
            create_topic(broker.bootstrap, names[name], parts)
        # held at three fifths until the broker is back: the outage lands mid-run, with input on both sides of it
        # (its records may wait in the feeder's producer through the outage: 5 minutes to deliver them)
        feeder = Feeder(broker.bootstrap, names["input"], items, rate=2500, limit=len(items) * 3 // 5,
                        extra={"delivery_timeout_ms": 300_000})
        feeder.start()
        wait_until(lambda: total_committed(broker.bootstrap, group, names["input"]) > len(items) // 4, 120,
                   "a quarter committed", alive)
        wait_until(lambda: ready(port) == 200, 30, "ready while readings flow", alive)

        # 2. the broker goes away for 30 s mid-run (longer, up to 90 s, until the daemon has reported it: a loaded
        # machine may notice later), then comes back on the same address with its data
        broker.kill()
        lost_at, statuses = time.monotonic(), set()
        while time.monotonic() - lost_at < 30 or (503 not in statuses and time.monotonic() - lost_at < 90):
            alive()
            statuses.add(ready(port))
            time.sleep(0.5)
        assert 503 in statuses, f"not ready while Kafka was away ({statuses})"
        broker.start()
        feeder.allow(len(items))
        feeder.join(180)
        assert feeder.error is None, feeder.error
        wait_until(lambda: total_committed(broker.bootstrap, group, names["input"]) == len(items), 180,
                   "everything committed after the outage", alive)
        wait_until(lambda: ready(port) == 200, 30, "ready again", alive)
        assert daemon.stop() == 0, daemon.text()
        text = daemon.text()
        assert not daemon_tracebacks(text), "\n\n".join(daemon_tracebacks(text))
        dups = compare(outcome(broker.bootstrap, names), ref, exactly_once=True, restarts=0)
        print(f"\noutage: /readyz statuses while away {sorted(statuses)}; {dups}")
    finally:
        broker.close()


@pytest.mark.parametrize(("partitions", "policy", "expected"), [
    (2, "compact", "has 2 partitions but the input has 4"),
    (4, "delete", "has cleanup.policy=delete; it must be compact"),
])
def test_a_state_topic_that_cannot_serve_is_refused(kafka_bootstrap: str, topic_factory, group_id: str,
                                                    model_dir: Path, tmp_path: Path, partitions: int,  # noqa: F811
                                                    policy: str, expected: str) -> None:
    names = topics(topic_factory)
    state = topic_factory(partitions=partitions, config={"cleanup.policy": policy}, prefix="state")
    cfg = write_config(tmp_path / "c.yaml", kafka_bootstrap, names, group_id, model_dir, "at_least_once")
    cfg.write_text(cfg.read_text().replace("restore_timeout_s: 60}", f"restore_timeout_s: 60, state_topic: {state}}}"))
    daemon = DaemonProc(cfg, tmp_path / "daemon.log").start()
    assert daemon.proc is not None and daemon.proc.wait(timeout=120) == 2, daemon.text()
    line = next(x for x in daemon.text().splitlines() if "cannot use the state topic" in x)
    assert expected in line and state in line, line
    assert not daemon_tracebacks(daemon.text())
