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
    assert re.fullmatch(r"demo: caught=\d+ missed=\d+ false_alerts=\d+ streams=10 readings=\d+", res.summary_line())


def test_demo_cli_prints_the_summary_last(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["demo", "--streams", "10", "--readings", "1500", "--normal", "700", "--seed", "3", "--epochs", "2",
               "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("demo: caught=") and "Injected faults: 5 in 10 streams" in "\n".join(lines)
    assert (tmp_path / "model" / "manifest.json").is_file() and (tmp_path / "alerts.jsonl").is_file()
