"""`detector demo` end to end on a small fleet: the summary adds up and the last line is machine-readable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from detector.cli import main
from detector.demo import run_demo
from detector.train import TrainParams

SMALL = TrainParams(name="demo", epochs=3, steps_per_epoch=20)


def test_demo_accounts_for_every_fault_and_catches_stuck_sensors_as_sensor_faults() -> None:
    res = run_demo(streams=10, readings=1500, normal=700, seed=3, progress=False, params=SMALL)
    faults = len(res.caught) + len(res.missed)
    assert faults == 5, "half of the streams get one fault"
    stuck = [(f, delay, kind) for f, delay, kind in res.caught if f.kind == "stuck"]
    assert stuck and all(kind == "sensor_fault" and delay <= 10 * 60 for _, delay, kind in stuck)
    assert res.readings > 10 * (1500 - 700)
    assert re.fullmatch(r"demo: caught=\d+ missed=\d+ false_alerts=\d+ regime_changes=\d/2 streams=10 readings=\d+",
                        res.summary_line())
    # two fault-free streams change their operating point: reported as regime changes, not false alerts
    moved = {r.stream: r for r, _ in res.regimes_detected} | {r.stream: r for r in res.regimes_missed}
    faulty = {f.stream for f, _, _ in res.caught} | {f.stream for f in res.missed}
    assert len(moved) == 2 and not moved.keys() & faulty
    assert res.regimes_detected, "the throttled valve is seen as a regime change"
    assert all(0 <= delay <= 6 * 3600 for _, delay in res.regimes_detected)
    changes = [a for a in res.alerts if a["kind"] == "regime_change" and a["stream"] in moved]
    assert {a["stream"] for a in changes} == {r.stream for r, _ in res.regimes_detected}
    assert all(a["stream"] in moved for a in res.regime_alerts)
    assert not [a for a in res.false_alerts if a["stream"] in moved and a["kind"] == "anomaly"
                and a["first_seen"] >= min(c["first_seen"] for c in changes)], "explained by the regime change"


def test_demo_cli_prints_the_summary_last(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["demo", "--streams", "10", "--readings", "1500", "--normal", "700", "--seed", "3", "--epochs", "2",
               "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("demo: caught=") and "Injected faults: 5 in 10 streams" in "\n".join(lines)
    assert "Regime changes (operating point moved for good, not a fault): 2" in lines
    assert (tmp_path / "model" / "manifest.json").is_file() and (tmp_path / "alerts.jsonl").is_file()
