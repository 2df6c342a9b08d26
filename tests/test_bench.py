"""The benchmark script runs and writes its table (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_bench_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nbefore\n<!-- bench:throughput:begin -->\nSTALE-TABLE\n"
                   "<!-- bench:throughput:end -->\nafter\n")
    # float16 on a CPU: a precision the device cannot run, on every machine; it is left out, with why
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--streams", "3", "--batches", "2",
                           "--device", "cpu", "--out", str(out), "--window", "8", "--hop", "4",
                           "--precision", "float32", "float16", "--results", str(tmp_path / "t.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    assert [(r["streams"], r["precision"]) for r in result["results"]] == [(3, "float32")]
    assert all(r["speedup"] > 0 for r in result["results"])
    refused = "model.precision float16 needs a CUDA device, and the model runs on cpu: use float32 (or auto) there"
    assert result["skipped"] == [{"precision": "float16", "device": "cpu", "reason": refused}]
    text = out.read_text()
    assert "STALE-TABLE" not in text and text.startswith("# Benchmarks\n\nbefore\n") and text.endswith("after\n")
    rows = [line for line in text.splitlines() if line.startswith("| 3 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["float32"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6 and all(float(c.rstrip("x").replace(",", "")) > 0 for c in cells[2:])
    assert f"Not timed: `float16` on cpu: {refused}." in text


def test_throughput_bench_times_auto_in_the_precision_the_engine_takes(tmp_path: Path) -> None:
    from tests.helpers import bfloat16_error

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--streams", "3", "--batches", "2",
                           "--device", "cpu", "--window", "8", "--hop", "4", "--precision", "auto", "float32",
                           "--results", str(tmp_path / "t.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    runs = ["float32"] if bfloat16_error() else ["bfloat16", "float32"]  # float32 once, however it was asked for
    assert [r["precision"] for r in result["results"]] == runs and result["skipped"] == []


def test_throughput_bench_times_the_pipeline_on_columnar_messages(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--streams", "3", "--batches", "2",
                           "--device", "cpu", "--window", "8", "--hop", "4", "--form", "columns",
                           "--results", str(tmp_path / "t.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # the bench raises unless every stream scored a window per batch
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["form"] == "columns" and result["results"][0]["pipeline_readings_per_s"] > 0
    assert "--form columns" in proc.stdout


def test_throughput_bench_times_the_model_without_and_with_the_relation_score(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--streams", "3", "--batches", "2",
                           "--device", "cpu", "--window", "8", "--hop", "4", "--relations", "off", "on",
                           "--results", str(tmp_path / "t.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # the pipeline raises unless every stream scored a window per batch
    rows = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["relations"] for r in rows] == ["off", "on"] and all(r["pipeline_readings_per_s"] > 0 for r in rows)
    assert "float32, relations |" in proc.stdout and "--relations off on" in proc.stdout


def test_throughput_bench_times_the_model_without_and_with_the_spike_score(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--streams", "3", "--batches", "2",
                           "--device", "cpu", "--window", "16", "--hop", "4", "--spikes", "off", "on",
                           "--results", str(tmp_path / "t.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["spikes"] for r in rows] == ["off", "on"] and all(r["pipeline_readings_per_s"] > 0 for r in rows)
    assert "float32, spikes |" in proc.stdout and "--spikes off on" in proc.stdout


def test_gpu_bench_times_each_device_and_precision_and_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nbefore\n<!-- bench:gpu:begin -->\nSTALE-TABLE\n<!-- bench:gpu:end -->\nafter\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--streams", "3", "5", "--devices", "cpu",
                           "--precision", "float32", "bfloat16", "--cpu-precision", "float32", "--batches", "1",
                           "--out", str(out), "--results", str(tmp_path / "g.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["results"] == []  # CUDA rows only: none on a CPU run
    assert [(r["streams"], r["precision"]) for r in result["cpu_results"]] == [(3, "float32"), (5, "float32")]
    assert all(r["engine_batched_readings_per_s"] > 0 and r["model_only_readings_per_s"] > 0
               for r in result["cpu_results"])
    text = out.read_text()
    assert "STALE-TABLE" not in text and text.startswith("# Benchmarks\n\nbefore\n") and text.endswith("after\n")
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "cpu" in line] == [
        "3", "5"]


def test_summary_has_every_key_issue_6_names(tmp_path: Path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import summary

    monkeypatch.setattr(summary, "RESULTS", tmp_path)
    m = {"machine": "box", "date": "2026-11-25"}
    (tmp_path / "throughput.json").write_text(json.dumps({**m, "results": [{"streams": 1000, "speedup": 42.0}]}))
    rows = [{"streams": 10000, "ratio_to_state_bytes": 4.7}, {"streams": 100000, "ratio_to_state_bytes": 1.6}]
    (tmp_path / "memory.json").write_text(json.dumps({**m, "results": rows}))
    (tmp_path / "ingest.json").write_text(json.dumps({**m, "ingest_ratio_vs_bare_consumer": 0.5,
                                                      "batched_payload_readings_per_s": 1000,
                                                      "latency": {"p99_ms": 900.0}}))
    out = summary.summary()
    assert {k: out[k] for k in ("engine_speedup_1k_streams", "ingest_ratio_vs_bare_consumer",
                                "batched_payload_readings_per_s", "latency_p99_ms", "memory_ratio_to_tensor_bytes",
                                "gpu_readings_per_s_1m_streams", "machine", "date")} == {
        "engine_speedup_1k_streams": 42.0, "ingest_ratio_vs_bare_consumer": 0.5,
        "batched_payload_readings_per_s": 1000, "latency_p99_ms": 900.0, "memory_ratio_to_tensor_bytes": 4.7,
        "gpu_readings_per_s_1m_streams": None, "machine": "box", "date": "2026-11-25"}
    # engine speedup is the float32 row; the GPU figure is the fastest precision measured
    rows = [{"streams": 1000, "precision": "bfloat16", "speedup": 60.0}, {"streams": 1000, "precision": "float32",
                                                                          "speedup": 40.0}]
    (tmp_path / "throughput.json").write_text(json.dumps({**m, "results": rows}))
    gpu = [{"streams": 1_000_000, "precision": p, "engine_batched_readings_per_s": r}
           for p, r in (("float32", 3e7), ("float16", 6e7), ("bfloat16", 5e7))]
    (tmp_path / "gpu.json").write_text(json.dumps({**m, "results": gpu}))
    out = summary.summary()
    assert (out["engine_speedup_1k_streams"], out["gpu_readings_per_s_1m_streams"]) == (40.0, 6e7)
    # issue 21's keys: null until measured; training's CPU figure from train.json
    assert [out[k] for k in ("node_readings_per_s_gpu", "node_ratio_vs_bare_cpu", "train_readings_per_s_cpu",
                             "train_readings_per_s_gpu")] == [None, None, None, None]
    (tmp_path / "train.json").write_text(json.dumps({**m, "results": [{"device": "cpu", "readings_per_s": 123}]}))
    assert summary.summary()["train_readings_per_s_cpu"] == 123


def test_train_bench_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nbefore\n<!-- bench:train:begin -->\nSTALE\n<!-- bench:train:end -->\nafter\n")
    saved = ROOT / "bench" / "results" / "train.json"
    kept = saved.read_bytes() if saved.exists() else None
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--epochs", "1", "--streams", "3",
                               "--readings", "300", "--out", str(out)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        text = out.read_text()
        assert "STALE" not in text and "| cpu |" in text and text.endswith("after\n")
        assert json.loads(saved.read_text())["results"][0]["readings_per_s"] > 0
    finally:  # the smoke run must not replace the measured figures
        if kept is None:
            saved.unlink(missing_ok=True)
        else:
            saved.write_bytes(kept)


def test_checkpoints_bench_reads_the_daemons_metrics() -> None:
    from bench.checkpoints import metric
    body = ("# HELP detector_commit_seconds Seconds a commit took\n"
            "detector_commit_seconds_bucket{le=\"0.5\"} 20.0\n"
            "detector_commit_seconds_count 21.0\ndetector_commit_seconds_sum 34.5\n")
    assert metric(body, "detector_commit_seconds_count") == 21.0
    assert metric(body, "detector_commit_seconds_sum") == 34.5
    assert metric(body, "detector_checkpoint_bytes") == 0.0  # a sample missing from the text


@pytest.mark.kafka
def test_restore_bench_restores_every_stream_both_ways_and_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "restore.py"), "--streams", "300", "--out", str(out),
                           "--results", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert row["streams"] == 300 and row["record_bytes"] > 1000 and row["decode_speedup"] > 0
    for way in ("whole", "fetched"):
        assert row[f"{way}_rss_peak_mib"] >= row[f"{way}_rss_steady_mib"] > 0 and row[f"{way}_s"] > 0
    assert "## Restores" in out.read_text() and "| 300 |" in out.read_text()


@pytest.mark.kafka
def test_churn_bench_drains_with_and_without_forgetting_and_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "churn.py"), "--distinct", "600", "--active", "60",
                           "--life", "10", "--out", str(out), "--results", str(tmp_path / "c.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    forget, never = json.loads((tmp_path / "c.json").read_text())["runs"]
    assert forget["forget_after_s"] == 600 and never["forget_after_s"] == 0 and never["forgotten"] == 0
    assert forget["forgotten"] > 0 and forget["held_max"] < 600 and never["held_max"] >= forget["held_max"]
    assert "## Memory under stream churn" in out.read_text()


def test_decode_bench_checks_both_paths_agree_and_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--readings", "600", "--repeat", "1",
                           "--out", str(out), "--results", str(tmp_path / "d.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # it asserts the two decoders give the same arrays
    forms = json.loads((tmp_path / "d.json").read_text())["forms"]
    assert set(forms) == {"row", "list", "columnar"}
    assert all(r["decoder"] > 0 and r["msgspec"] > 0 and r["ratio_msgspec_to_decoder"] > 0 for r in forms.values())
    text = out.read_text()
    assert "## Decoding: orjson and checks against msgspec" in text and "| columnar |" in text

