"""A soak with faults: `detector run` under steady load and stream churn while the broker restarts, a second
member joins and leaves, the config is reloaded and malformed records arrive; then nothing may be lost.

    python bench/soak_faults.py [--minutes 60] [--rate 400] [--active 400] [--life 240]
                                [--broker-every 10] [--rebalance-every 15] [--out docs/reliability.md]

One local single-node broker (deploy/kafka/kafka.sh, loopback, a temporary folder) and a trained model of the
tests' shape (3 sensors). A feeder sends `rate` readings per second for `minutes`: `active` streams at a time,
each living `life` readings (one minute of event time apart) before a new stream id takes its place, one in
eight with a lasting fault in its second half and one in sixteen with a stuck sensor; every `bad_every`-th
record is malformed (not JSON, a bad timestamp, no values). Daemon 0 runs under exactly_once all along. Faults
on a wall-clock schedule: the broker is stopped and started again (SIGTERM, `broker_down_s` away) every
`broker_every` minutes; every `rebalance_every` minutes daemon 1 joins the group and leaves (SIGTERM) half an
interval later; once, at half time, both members' config files change the alert rule (a hot reload).

At the end, read back with read_committed: every window of the input scored exactly once with the score the
uninterrupted in-process run gives (tests/reliability.reference); no alert published twice; every malformed
record on the dead-letter topic exactly once; no traceback in the daemons' logs. Daemon 0's resident memory,
open file descriptors and threads are sampled every 10 s, and after each fault the seconds until the group's
committed offsets reach the input's end as it was when the fault ended. Results go to
bench/results/soak_faults.json and, with --out, to the soak-with-faults section of the markdown file.
tests/test_soak_faults.py runs a shortened variant.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, replace_section  # noqa: E402
from detector.artifact import save_artifact  # noqa: E402
from detector.train import Series, train_model  # noqa: E402
from tests.helpers import FEATURES, sine_values  # noqa: E402
from tests.kafka_broker import create_topic, free_ports  # noqa: E402
from tests.reliability import (  # noqa: E402
    DaemonProc,
    Feeder,
    Outcome,
    RestartableBroker,
    daemon_tracebacks,
    identity,
    read_all,
    reference,
    retrying,
    total_committed,
)
from tests.test_daemon_kafka import end_offsets  # noqa: E402
from tests.test_pipeline import PARAMS  # noqa: E402

T0 = 1_700_000_000.0
PARTITIONS = 4
SAMPLE_S = 10.0
CATCH_UP_LIMIT_S = 300.0
"""How long the bench waits, after a fault, for the group to catch up before it reports the fault as not caught up."""


def trained_model(path: Path) -> Path:
    """The Kafka tests' small model (3 sensors) trained on six sine streams, saved."""
    series = Series(FEATURES, [f"s{i}" for i in range(6)], [sine_values(700, seed=100 + i, phase=7 * i)
                                                             for i in range(6)])
    model, manifest = train_model(series, PARAMS, progress=False)
    return save_artifact(path, model, manifest)


def churn_items(total: int, active: int, life: int, bad_every: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """(key, value) records in time order, and how many of them are malformed.

    Slot s holds one stream at a time, named m<s>-<generation>; slots are staggered so that streams are born
    and retire all the time. Readings of one tick are one minute of event time after the last tick's.
    """
    items: list[tuple[bytes, bytes]] = []
    series: dict[tuple[int, int], np.ndarray] = {}
    bad = 0
    t = 0
    while len(items) < total:
        for s in range(active):
            age = t + s * life // active
            g, r = divmod(age, life)
            if (s, g) not in series:
                v = sine_values(life, seed=10_000 * g + s, phase=3 * s).astype(float)
                if (s + g) % 8 == 0:
                    v[life // 2:, 2] += 2.5  # a lasting fault: an anomaly alert
                if (s + g) % 16 == 3:
                    v[life // 4: life // 4 + 80, 0] = 51.125  # a stuck sensor: a sensor-fault alert
                series[(s, g)] = v
                series.pop((s, g - 1), None)
            name = f"m{s}-{g}"
            if bad_every and len(items) % bad_every == bad_every - 1:
                kind = (len(items) // bad_every) % 3
                value = (b"{not json" if kind == 0 else
                         orjson.dumps({"stream": name, "ts": "yesterday", "values": {FEATURES[0]: 1.0}}) if kind == 1
                         else orjson.dumps({"stream": name, "ts": T0 + 60 * t}))
                items.append((name.encode(), value))
                bad += 1
            body = {"stream": name, "ts": T0 + 60.0 * t,
                    "values": dict(zip(FEATURES, series[(s, g)][r].round(4).tolist(), strict=True))}
            items.append((name.encode(), orjson.dumps(body)))
            if len(items) >= total:
                break
        t += 1
    return items, bad


def write_config(path: Path, bootstrap: str, names: dict[str, str], group: str, model: Path, member: int) -> Path:
    """Daemon `member`'s config: exactly_once, short commit interval, forgetting on (the streams retire)."""
    path.write_text(f"""
kafka: {{bootstrap_servers: "{bootstrap}", connect_retry_max_s: 2, connect_timeout_ms: 2000}}
input: {{topics: [{names['input']}], group_id: {group}, max_poll_records: 500, session_timeout_ms: 6000}}
output: {{alerts_topic: {names['alerts']}, dead_letter_topic: {names['dlq']}, scores_topic: {names['scores']}}}
delivery: {{guarantee: exactly_once, commit_interval_ms: 500, transactional_id: "{group}-tx{member}",
           transaction_timeout_ms: 10000, restore_timeout_s: 120}}
model: {{path: "{model}", device: cpu}}
scoring: {{max_gap_s: 3600, forget_after_s: 7200}}
alerts: {{k: 2, n: 3}}
sensors: {{flatline_readings: 10}}
metrics: {{port: {free_ports(1)[0]}}}
""")
    return path


def sample(pid: int) -> dict[str, float]:
    """A process's resident memory (MiB), open file descriptors and threads."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"])}


@dataclass
class Fault:
    """One scheduled fault: what, when it ended (seconds into the run) and how long the group took to catch up."""

    what: str
    at_s: float
    caught_up_s: float | None = None
    target: int = 0  # the input's end offsets (summed) when the fault ended


@dataclass
class SoakResult:
    """What a soak measured and checked."""

    minutes: float
    rate: float
    active: int
    life: int
    sent: int
    malformed: int
    windows: int
    duplicate_windows: int
    missing_windows: int
    wrong_scores: int
    alerts: int
    duplicate_alerts: int
    dead_letters: int
    tracebacks: int
    exit_codes: list[int]
    faults: list[Fault] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)

    def flat(self, key: str, warmup_s: float) -> dict[str, float]:
        """First, last, min, max, median and largest distance from the median (a share) after warm-up."""
        xs = [s[key] for s in self.samples if s["t"] >= warmup_s] or [s[key] for s in self.samples]
        med = float(np.median(xs))
        return {"first": xs[0], "last": xs[-1], "min": min(xs), "max": max(xs), "median": med,
                "off_median": round(max(abs(x - med) for x in xs) / med, 4) if med else 0.0}


def schedule(minutes: float, broker_every_s: float, rebalance_every_s: float) -> list[tuple[float, str]]:
    """The bench's faults by wall clock: (seconds into the run, fault), in order."""
    span = minutes * 60
    events = [(k * broker_every_s, "broker") for k in range(1, int(span // broker_every_s) + 1)]
    for k in range(1, int(span // rebalance_every_s) + 1):
        events += [(k * rebalance_every_s, "join"), (k * rebalance_every_s + rebalance_every_s / 2, "leave")]
    events.append((span / 2, "reload"))
    return sorted(e for e in events if e[0] < span)


def run(minutes: float, rate: float, active: int, life: int, events: list[tuple[float, str]], work: Path,
        by_progress: bool = False, bad_every: int = 200, broker_down_s: float = 10.0,
        log: Callable[[str], None] = print) -> SoakResult:
    """Run the soak (see the module's docstring) in `work`; raise AssertionError if a daemon dies.

    `events` are (when, fault) with fault one of broker, join, leave, reload; `when` is seconds into the run,
    or with `by_progress` a share of the input the group must have committed first (the feeder then waits
    a twentieth of the input past that point until the fault is done, so that each lands mid-stream on any
    machine).
    """
    work.mkdir(parents=True, exist_ok=True)
    model_dir = trained_model(work / "model")
    items, malformed = churn_items(int(minutes * 60 * rate), active, life, bad_every)
    total = len(items)
    broker = RestartableBroker()
    daemons: list[DaemonProc] = []
    try:
        broker.start()
        bs = broker.bootstrap
        names = {k: f"{k}-{uuid.uuid4().hex[:8]}" for k in ("input", "alerts", "dlq", "scores")}
        for k, parts in (("input", PARTITIONS), ("alerts", 2), ("dlq", 1), ("scores", PARTITIONS)):
            create_topic(bs, names[k], parts)
        group = f"soak-{uuid.uuid4().hex[:8]}"
        configs = [write_config(work / f"member{i}.yaml", bs, names, group, model_dir, i) for i in range(2)]
        daemons = [DaemonProc(c, work / f"member{i}.log") for i, c in enumerate(configs)]
        slack = total // 20

        def hold(i: int) -> int | None:  # how far the feeder may go before event i has happened
            return int(events[i][0] * total) + slack if by_progress and i < len(events) else None

        feeder = Feeder(bs, names["input"], items, rate=rate, extra={"delivery_timeout_ms": 300_000}, limit=hold(0))
        daemons[0].start()
        feeder.start()
        t0 = time.monotonic()
        faults: list[Fault] = []
        samples: list[dict[str, float]] = []
        next_sample, todo = 0.0, list(events)

        def elapsed() -> float:
            return time.monotonic() - t0

        def committed() -> int:
            return int(retrying(lambda: total_committed(bs, group, names["input"]), 60))

        def check() -> None:
            assert daemons[0].alive(), daemons[0].text()[-4000:]
            assert feeder.error is None, feeder.error

        def due(when: float) -> bool:
            return committed() >= when * total if by_progress else elapsed() >= when

        while todo or not feeder.done.is_set() or any(
                f.caught_up_s is None and elapsed() - f.at_s < CATCH_UP_LIMIT_S for f in faults):
            check()
            if elapsed() >= next_sample:
                assert daemons[0].proc is not None
                samples.append({"t": round(elapsed()), **sample(daemons[0].proc.pid)})
                next_sample += SAMPLE_S
            pending = [f for f in faults if f.caught_up_s is None]
            if pending:
                done = committed()
                for f in pending:
                    if done >= f.target:
                        f.caught_up_s = round(elapsed() - f.at_s, 1)
            if todo and (due(todo[0][0]) or (feeder.done.is_set() and not by_progress)):
                _, what = todo.pop(0)
                if what == "broker":
                    broker.stop()
                    time.sleep(broker_down_s)
                    broker.start()
                elif what == "join":
                    daemons[1].start()
                elif what == "leave":
                    assert daemons[1].stop(timeout=120) == 0, daemons[1].text()[-4000:]
                elif what == "reload":
                    for c in configs:
                        c.write_text(c.read_text().replace("alerts: {k: 2, n: 3}", "alerts: {k: 3, n: 4}"))
                    for d in daemons:
                        if d.alive():
                            assert d.proc is not None
                            d.proc.send_signal(signal.SIGHUP)
                target = sum(retrying(lambda: end_offsets(bs, names["input"], PARTITIONS), 60).values())
                faults.append(Fault(what, round(elapsed(), 1), target=target))
                log(f"{elapsed():7.1f} s  {what} done; input end {target:,} of {total:,}")
                feeder.allow(hold(len(faults)) or total)
                continue
            time.sleep(1.0)
        feeder.join(60)
        assert feeder.error is None, feeder.error
        deadline = time.monotonic() + CATCH_UP_LIMIT_S
        while committed() < total:
            check()
            assert time.monotonic() < deadline, "the group did not commit the whole input"
            time.sleep(1.0)
        codes = [d.stop(timeout=120) for d in daemons if d.alive()]
        texts = [d.text() for d in daemons]
        got = Outcome.from_records([m.value for m in read_all(bs, names["alerts"])],
                                   [m.value for m in read_all(bs, names["scores"])])
        dead = len(read_all(bs, names["dlq"]))
    finally:
        for d in daemons:
            if d.alive():
                d.kill()
        broker.close()
    ref = reference(configs[0], items)  # window scores do not depend on the alert rule the reload changed
    both = [k for k in ref.scores if k in got.scores]  # the failure tests' tolerance (test_reliability_kafka.compare)
    wrong = int((~np.isclose([got.scores[k][0] for k in both], [ref.scores[k][0] for k in both],
                             rtol=2e-4, atol=1e-6)).sum())
    ids = Counter(identity(a) for a in got.alerts)
    return SoakResult(minutes, rate, active, life, total, malformed, len(ref.scores),
                      sum(len(v) - 1 for v in got.scores.values()),
                      len(set(ref.scores) ^ set(got.scores)), wrong, len(got.alerts),
                      sum(n - 1 for n in ids.values()), dead, sum(len(daemon_tracebacks(t)) for t in texts), codes,
                      faults, samples)


def main() -> int:
    """Run the soak and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=400.0, help="records per second sent")
    ap.add_argument("--active", type=int, default=400, help="streams sending at a time")
    ap.add_argument("--life", type=int, default=240, help="readings of each stream before it retires")
    ap.add_argument("--broker-every", type=float, default=10.0, help="minutes between broker restarts")
    ap.add_argument("--rebalance-every", type=float, default=15.0, help="minutes between a second member's joins")
    ap.add_argument("--warmup-s", type=float, default=120.0, help="samples before this are left out of flatness")
    ap.add_argument("--out", help="markdown file whose soak-with-faults section is replaced by the results")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "soak_faults.json",
                    help="JSON results file (its logs go to a folder beside it)")
    args = ap.parse_args()
    r = run(args.minutes, args.rate, args.active, args.life,
            schedule(args.minutes, args.broker_every * 60, args.rebalance_every * 60),
            args.results.parent / (args.results.stem.replace("_", "-") + "-work"))
    flat = {k: r.flat(k, args.warmup_s) for k in ("rss_mib", "fds", "threads")}
    result = {"machine": machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d"), **asdict(r), "flat": flat}
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        replace_section(args.out, "soak-faults", "A soak with faults", table(args, result))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    ok = not (r.duplicate_windows or r.missing_windows or r.wrong_scores or r.duplicate_alerts or r.tracebacks
              or r.dead_letters != r.malformed or any(r.exit_codes))
    return 0 if ok else 1


def table(args: argparse.Namespace, result: dict) -> str:
    """The markdown section."""
    r, fl = result, result["flat"]
    def caught(f: dict) -> str:
        return f"not within {CATCH_UP_LIMIT_S:g} s" if f["caught_up_s"] is None else f"{f['caught_up_s']:.1f} s"

    faults = "\n".join(f"| {f['at_s']:,.0f} s | {f['what']} | {caught(f)} |" for f in r["faults"])
    rows = "\n".join(f"| {name} | {v['first']:g} | {v['last']:g} | {v['min']:g} to {v['max']:g} | {v['median']:g} | "
                     f"{v['off_median']:.1%} |" for name, v in (("RSS, MiB", fl["rss_mib"]), ("open files", fl["fds"]),
                                                               ("threads", fl["threads"])))
    return (f"\n`python bench/soak_faults.py --minutes {args.minutes:g} --rate {args.rate:g} --active {args.active} "
            f"--life {args.life} --broker-every {args.broker_every:g} --rebalance-every {args.rebalance_every:g} "
            f"--out docs/reliability.md`, {r['date']}, {r['machine']}.\n\n"
            f"{r['sent']:,} records ({r['malformed']:,} malformed) of streams that live {r['life']} readings, "
            f"{r['active']:,} at a time. Checked from the committed outputs: {r['windows']:,} windows, "
            f"{r['missing_windows']} missing, {r['duplicate_windows']} scored twice, {r['wrong_scores']} with another "
            f"score than the uninterrupted run's; {r['alerts']:,} alerts, {r['duplicate_alerts']} twice; "
            f"{r['dead_letters']:,} dead letters for {r['malformed']:,} malformed records; {r['tracebacks']} "
            f"tracebacks; exit codes {r['exit_codes']}.\n\n"
            "| ended at | fault | group caught up with the input's end after |\n|---|---|---|\n" + faults +
            f"\n\nDaemon 0, sampled every {SAMPLE_S:g} s after {args.warmup_s:g} s of warm-up:\n\n"
            "| | first | last | range | median | largest distance from the median |\n|---|---|---|---|---|---|\n"
            + rows + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
