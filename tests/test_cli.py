"""The command line: check-config and run refuse bad files with every problem on its own line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from detector.artifact import save_artifact
from detector.cli import main
from tests.helpers import random_artifact
from tests.kafka_broker import free_ports

ROOT = Path(__file__).resolve().parents[1]
BAD = """\
input:
  topics: []
  max_poll_records: zero
thresholds:
  policy: calibrated
  calibrated: {warning: 2}
alerts: {k: 4, n: 2}
"""


def test_check_config_accepts_the_root_example(capsys: pytest.CaptureFixture) -> None:
    assert main(["check-config", str(ROOT / "config.yaml")]) == 0
    assert "config.yaml: valid" in capsys.readouterr().out


def test_check_config_prints_every_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BAD)
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4
    assert all(line.startswith(f"error: {cfg}: ") for line in err)
    joined = "\n".join(err)
    for key in ("input.topics", "input.max_poll_records", "thresholds.calibrated.warning", "alerts: k (4)"):
        assert key in joined


def test_run_refuses_an_invalid_file_with_the_same_messages(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(BAD)
    proc = subprocess.run([sys.executable, "-m", "detector", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "input.max_poll_records" in proc.stderr and "Traceback" not in proc.stderr


def test_run_names_a_missing_model_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tmp_path / 'nope'}}}\nmetrics: {{enabled: false}}\n")
    proc = subprocess.run([sys.executable, "-m", "detector", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "model folder not found" in proc.stderr and "Traceback" not in proc.stderr


def test_run_refuses_float16_on_a_cpu_before_touching_kafka(tmp_path: Path) -> None:
    art = random_artifact()
    folder = save_artifact(tmp_path / "m", art.model, art.manifest)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {folder}, device: cpu, precision: float16}}\n"
                   "kafka: {bootstrap_servers: '127.0.0.1:1'}\nmetrics: {enabled: false}\n")
    proc = subprocess.run([sys.executable, "-m", "detector", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()  # the start-up log line, then the refusal in one line, nothing else
    assert lines[-1] == "error: model.precision float16 needs a CUDA device, and the model runs on cpu: use float32 " \
                        "(or auto) there"
    assert [line for line in lines[:-1] if "starting, config" not in line] == [], lines


@pytest.fixture
def failing_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's test pass of the model fails as it does on a CPU without bfloat16 LSTM, on every machine."""
    import detector.engine as engine_mod

    def fails(model, device, precision) -> None:
        raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation primitive. "
                           "Run workload with environment variable ONEDNN_VERBOSE=all to get additional "
                           "diagnostic information.")

    monkeypatch.setattr(engine_mod, "probe_model", fails)
    monkeypatch.setattr(engine_mod, "_PROBED", {})


BF16_REFUSED = ("model.precision bfloat16 does not run on cpu here (a test pass of the model failed: could not create "
                "a primitive descriptor for the LSTM forward propagation primitive): use float32 there (or auto: "
                "bfloat16 where it runs, float32 elsewhere)")


def test_check_config_refuses_a_precision_the_device_cannot_run_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture, failing_probe: None) -> None:
    art = random_artifact()
    folder = save_artifact(tmp_path / "m", art.model, art.manifest)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {folder}, device: cpu, precision: bfloat16}}\n")
    assert main(["check-config", str(cfg), "--model"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {BF16_REFUSED}"]
    cfg.write_text(f"model: {{path: {folder}, device: cpu, precision: auto}}\n")
    assert main(["check-config", str(cfg), "--model"]) == 0
    assert f"{folder}: model test with features temp,vibration,pressure; runs on cpu in float32" in \
        capsys.readouterr().out


def test_check_config_says_auto_takes_bfloat16_where_the_model_runs_in_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import detector.engine as engine_mod

    monkeypatch.setattr(engine_mod, "probe_model", lambda model, device, precision: None)  # it runs, everywhere
    monkeypatch.setattr(engine_mod, "_PROBED", {})
    art = random_artifact()
    folder = save_artifact(tmp_path / "m", art.model, art.manifest)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {folder}, device: cpu, precision: auto}}\n")
    assert main(["check-config", str(cfg), "--model"]) == 0
    assert "runs on cpu in bfloat16" in capsys.readouterr().out


def test_the_daemon_refuses_a_precision_the_device_cannot_run_before_touching_kafka(
        tmp_path: Path, failing_probe: None) -> None:
    import threading

    import torch

    from detector.config import load_config
    from detector.daemon import run_daemon
    from detector.errors import ModelError

    art = random_artifact()
    folder = save_artifact(tmp_path / "m", art.model, art.manifest)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {folder}, device: cpu, precision: bfloat16}}\n"
                   "kafka: {bootstrap_servers: '127.0.0.1:1'}\nmetrics: {enabled: false}\n")
    stopped = threading.Event()
    stopped.set()  # were it not refused, the daemon would stop before connecting and return 0
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ModelError) as err:
            run_daemon(load_config(cfg), stop=stopped)
    finally:
        torch.set_num_threads(threads)  # model.threads
    assert str(err.value) == BF16_REFUSED


def test_run_names_an_unset_password_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka: {security_protocol: SASL_SSL, sasl_mechanism: SCRAM-SHA-512, sasl_username: alice,\n"
                   '        sasl_password: "${KAFKA_PASSWORD}"}\nmetrics: {enabled: false}\n')
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_PASSWORD"}
    proc = subprocess.run([sys.executable, "-m", "detector", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (f"error: {cfg}: kafka.sasl_password: environment variable KAFKA_PASSWORD "
                                           "is not set (referenced as ${KAFKA_PASSWORD})")
    assert "Traceback" not in proc.stderr


def test_check_config_with_model_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tmp_path / 'nope'}}}\n")
    assert main(["check-config", str(cfg), "--model"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    art = random_artifact()
    folder = save_artifact(tmp_path / "m", art.model, art.manifest)
    cfg.write_text(f"model: {{path: {folder}, device: cpu, precision: float16}}\n")
    assert main(["check-config", str(cfg), "--model"]) == 2
    assert "model.precision float16 needs a CUDA device" in capsys.readouterr().err


def test_a_model_of_another_feature_set_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    art = random_artifact()
    folder = save_artifact(tmp_path / "m", art.model, art.manifest)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {folder}, features: [temp, rpm]}}\nmetrics: {{enabled: false}}\n")
    assert main(["check-config", str(cfg), "--model"]) == 2
    err = capsys.readouterr().err
    assert f"the model's features are {','.join(art.manifest.features)} but model.features asks for temp,rpm" in err
    proc = subprocess.run([sys.executable, "-m", "detector", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "model.features asks for temp,rpm" in proc.stderr
    assert "Traceback" not in proc.stderr
    cfg.write_text(f"model: {{path: {folder}, features: [{', '.join(art.manifest.features)}]}}\n")
    assert main(["check-config", str(cfg), "--model"]) == 0


def test_check_config_says_when_kafka_is_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    port = free_ports(1)[0]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'kafka: {{bootstrap_servers: "127.0.0.1:{port}", connect_timeout_ms: 1500}}\n')
    assert main(["check-config", str(cfg), "--kafka"]) == 1
    assert f"kafka.bootstrap_servers: cannot reach Kafka at 127.0.0.1:{port}" in capsys.readouterr().out
