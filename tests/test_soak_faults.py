"""The soak with faults (bench/soak_faults.py), shortened: one broker restart, a member joining and leaving, a
hot reload and malformed records, with streams born and retired all along; nothing lost, nothing twice."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from bench.soak_faults import run

pytestmark = pytest.mark.kafka


def test_a_short_soak_with_every_fault_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    # faults by progress (the group's committed share of the input), so each lands mid-stream on any machine
    events = [(0.2, "broker"), (0.4, "join"), (0.5, "reload"), (0.7, "leave")]
    r = run(minutes=2, rate=400, active=100, life=120, events=events, work=tmp_path, by_progress=True,
            bad_every=100, broker_down_s=5)
    seen = str({k: v for k, v in asdict(r).items() if k != "samples"})
    assert [f.what for f in r.faults] == ["broker", "join", "reload", "leave"], seen
    assert r.windows > 10_000 and r.alerts > 0, f"streams lived long enough to be scored and to alert: {seen}"
    assert (r.missing_windows, r.duplicate_windows, r.wrong_scores) == (0, 0, 0), (
        f"every window once, as the uninterrupted run scores it: {seen}")
    assert r.duplicate_alerts == 0, seen
    assert r.malformed == r.sent // 100 and r.dead_letters == r.malformed, (
        f"every malformed record dead-lettered once: {seen}")
    assert r.tracebacks == 0 and r.exit_codes == [0], seen
    assert len(r.samples) >= 2 and all(s["rss_mib"] > 0 and s["fds"] > 0 and s["threads"] > 0 for s in r.samples)
