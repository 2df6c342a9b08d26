"""Training checkpoints and progress: a stopped or killed run resumes to the same model, and a log file gets
one plain line per epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import detector.train as train_mod
from detector.errors import DataError
from detector.simulate import fleet_to_frame, simulate_fleet
from detector.train import Series, TrainParams, train_model

PARAMS = TrainParams(window=8, hop=4, hidden_size=8, epochs=5, steps_per_epoch=6, batch_size=8, patience=10,
                     seed=3)


def series() -> Series:
    fleet = simulate_fleet(n_streams=3, n_features=3, n_readings=500, normal_readings=500, seed=4)
    return Series(list(fleet.features), list(fleet.streams), [fleet.values[s] for s in range(3)])


def test_a_run_stopped_after_an_epoch_resumes_to_the_model_of_a_run_never_stopped(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    torch.set_num_threads(1)
    whole, m_whole = train_model(series(), PARAMS, progress=False, checkpoint=tmp_path / "a")
    assert json.loads((tmp_path / "a" / "state.json").read_text())["epoch"] == 5

    real_save, saves = train_mod.save_state, []

    def save_then_stop(folder, st) -> None:  # the process dies right after epoch 2's checkpoint is written
        real_save(folder, st)
        saves.append(st.epoch)
        if st.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_model(series(), PARAMS, progress=False, checkpoint=tmp_path / "b")
    monkeypatch.setattr(train_mod, "save_state", real_save)
    resumed, m_res = train_model(series(), PARAMS, progress=False, checkpoint=tmp_path / "b", resume=True)

    assert saves == [1, 2] and m_res.training["resumed_after_epoch"] == 2
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    strip = [{k: v for k, v in h.items() if k != "readings_per_s"} for h in m_whole.training["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "readings_per_s"} for h in m_res.training["history"]]
    assert m_whole.calibration_scores == m_res.calibration_scores
    assert all(h["readings_per_s"] > 0 for h in m_res.training["history"]) and m_res.training["readings_per_s"] > 0


def test_resuming_with_other_options_or_data_is_refused(tmp_path: Path) -> None:
    train_model(series(), replace(PARAMS, epochs=1), progress=False, checkpoint=tmp_path)
    with pytest.raises(DataError, match="params differ"):
        train_model(series(), replace(PARAMS, epochs=2), progress=False, checkpoint=tmp_path, resume=True)
    other = series()
    other.values[0][7, 1] += 1.0
    with pytest.raises(DataError, match="data differ"):
        train_model(other, replace(PARAMS, epochs=1), progress=False, checkpoint=tmp_path, resume=True)
    with pytest.raises(DataError, match="no readable training checkpoint"):
        train_model(series(), PARAMS, progress=False, checkpoint=tmp_path / "none", resume=True)


def test_a_killed_train_command_resumes_and_its_log_has_a_line_per_epoch(tmp_path: Path) -> None:
    fleet = simulate_fleet(n_streams=4, n_features=3, n_readings=800, normal_readings=800, seed=5)
    data = tmp_path / "history.csv"
    fleet_to_frame(fleet).to_csv(data, index=False)
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "detector", "train", "--data", str(data), "--out", str(out), "--window", "8",
           "--hop", "4", "--hidden", "8", "--epochs", "40", "--patience", "40", "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300  # generous: a loaded machine; the kill is scheduled by progress
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["epoch"] >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before two epochs were checkpointed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    done = json.loads(state.read_text())["epoch"]
    assert 2 <= done < 40 and not (out / "manifest.json").exists()
    log = err.decode()
    assert "\r" not in log, "not a terminal: plain lines, no progress bar"
    lines = [line for line in log.splitlines() if "train epoch " in line]
    assert len(lines) >= 2 and "train epoch 1/40: loss " in lines[0] and "readings/s, at most " in lines[0]

    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"after epoch {done} of 40" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["resumed_after_epoch"] == done
    assert len(manifest["training"]["history"]) == 40
    assert not (out / "checkpoint").exists(), "the checkpoint goes once the model is written"
