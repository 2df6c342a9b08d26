"""The benchmark script runs and writes its table (a smoke test: no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_bench_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nbefore\n<!-- bench:throughput:begin -->\nSTALE-TABLE\n"
                   "<!-- bench:throughput:end -->\nafter\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--streams", "3", "--batches", "2",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "STALE-TABLE" not in text and text.startswith("# Benchmarks\n\nbefore\n") and text.endswith("after\n")
    row = next(line for line in text.splitlines() if line.startswith("| 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 5 and all(float(c.rstrip("x").replace(",", "")) > 0 for c in cells[1:])
