"""`detector evaluate` end to end on small real files, and the baselines on a synthetic fault."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from detector.cli import main
from detector.config import Config
from detector.datasets import LabelledFile, load_skab
from detector.evaluate import EVAL_PARAMS, baseline_scores, evaluate, run_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = replace(EVAL_PARAMS, epochs=3, steps_per_epoch=10)


def step_file(n: int = 900, at: int = 600, train: int = 300, seed: int = 0) -> LabelledFile:
    """Two correlated sensors with a daily-like cycle; sensor b breaks away from a at row `at`."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    a = np.sin(2 * np.pi * t / 60) + 0.05 * rng.normal(size=n)
    b = 2 * np.sin(2 * np.pi * t / 60) + 0.05 * rng.normal(size=n)
    b[at:] += 1.5
    labels = t >= at
    return LabelledFile("synthetic/step.csv", 1.6e9 + 60.0 * t, np.stack([a, b], 1).astype(np.float32),
                        ["a", "b"], labels, [(at, n - 1)], train, "test: first 300 rows")


def test_our_detector_flags_the_fault_and_names_the_sensor() -> None:
    f = step_file()
    r = run_file(f, Config(), FAST)
    assert r.score.shape == (900,) and (r.prob >= 0).all() and (r.prob <= 1).all()
    assert r.pred[600:].mean() > 0.5, "most faulty rows are flagged"
    assert r.pred[:600].mean() < 0.1, "few normal rows are flagged"
    during = [name for row, name in r.raised if row >= 600]
    assert during and all(name == "b" for name in during), r.raised


@pytest.mark.parametrize("kind", ["hst", "pca"])
def test_baselines_score_the_fault_higher(kind: str) -> None:
    f = step_file()
    r = baseline_scores(f, kind)
    onset = slice(600, 640)  # HalfSpaceTrees learns online: it flags the change, then adapts to it
    assert np.median(r.score[onset]) > np.quantile(r.score[300:600], 0.9)
    assert r.pred[onset].mean() > 2 * r.pred[300:600].mean()


def test_evaluate_writes_summary_scores_and_report(tmp_path: Path) -> None:
    assert (DATA / "SKAB" / "valve1").is_dir(), f"the labelled data is missing: {DATA}"
    files = load_skab(DATA / "SKAB", limit=2)
    summary = evaluate(files, "skab", tmp_path, params=FAST, progress=False)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["format"] == "skab" and len(saved["files"]) == 2
    assert {"detector", "format", "files", "overall", "baselines"} <= set(saved)
    for key in ("precision", "recall", "f1", "far", "mar", "event_f1", "mean_delay"):
        assert key in saved["overall"]
        for b in ("hst", "pca"):
            assert key in saved["baselines"][b]["overall"]
    assert saved["overall"] == json.loads(json.dumps(summary["overall"]))
    scores = sorted((tmp_path / "scores").glob("*.csv"))
    assert len(scores) == 2
    frame = pd.read_csv(scores[0])
    assert {"timestamp", "label", "score", "probability", "alert", "hst_score", "pca_score"} <= set(frame.columns)
    assert len(frame) == len(files[0].labels)
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "published: Conv-AE" in html


def test_evaluate_cli_on_nab_reports_the_three_profiles(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (DATA / "NAB" / "data").is_dir(), f"the labelled data is missing: {DATA}"
    rc = main(["evaluate", "--data", str(DATA / "NAB"), "--format", "nab", "--out", str(tmp_path),
               "--match", "artificialWithAnomaly/art_daily_j", "--limit", "2",
               "--epochs", "2", "--no-plots", "--quiet"])
    assert rc == 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["overall"]["nab"]) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    assert set(saved["baselines"]["pca"]["overall"]["nab"]) == set(saved["overall"]["nab"])
    assert "nab=" in capsys.readouterr().out


def test_one_pretrained_model_can_serve_every_file(tmp_path: Path) -> None:
    normal = replace(step_file(at=900), name="normal.csv", train_rows=900)
    files = [step_file(seed=1), step_file(seed=2)]
    summary = evaluate(files, "csv", tmp_path, params=FAST, pretrain=normal, progress=False, baselines=(),
                       plots=False)
    assert summary["detector"]["model"].startswith("trained once on normal.csv (900 rows)")
    assert summary["overall"]["recall"] > 0.5


def test_anomaly_free_protocol_is_for_skab_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["evaluate", "--data", str(DATA / "NAB"), "--format", "nab", "--out", str(tmp_path),
               "--train-protocol", "anomaly-free", "--limit", "1", "--quiet"])
    assert rc == 2 and "--train-protocol anomaly-free is for --format skab" in capsys.readouterr().err
