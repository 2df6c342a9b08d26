"""`detector evaluate` end to end on small real files, and the baselines on a synthetic fault."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from detector.cli import main
from detector.config import Config
from detector.datasets import LabelledFile, load_nab, load_skab
from detector.evaluate import (
    EVAL_PARAMS,
    SENSOR_PANELS_MAX_INCHES,
    FileResult,
    _run_starts,
    baseline_scores,
    evaluate,
    likelihood,
    onset,
    onset_rows,
    run_file,
    signal_figure,
)
from detector.nab import PROFILES, NabFile, file_score, nab_scores
from tests.helpers import skab_layout

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


def test_a_row_carries_only_the_score_of_a_window_complete_when_it_arrived() -> None:
    # window 16, hop 4, one stream, no rejected rows: windows end at rows 15, 19, 23, ... (0-based), so the
    # per-row score may change only there, and rows before the first window have no score (0)
    f = step_file()
    r = run_file(f, Config(), FAST)
    W, hop = FAST.window, FAST.hop
    changes = np.flatnonzero(np.diff(r.score) != 0) + 1
    assert len(changes) > 100
    assert ((changes + 1) % hop == 0).all() and changes.min() == W - 1, changes[:10]
    assert (r.score[: W - 1] == 0).all()


def test_likelihood_is_the_gaussian_tail_of_the_raw_score_against_its_past() -> None:
    # 200 scores alternating 1 and 3 (mean 2, sample sd sqrt(200/199)), then a 5: z = 3 / 1.00251
    past = np.tile([1.0, 3.0], 100)
    p = likelihood(np.r_[past, 5.0, np.nan], min_history=50)
    z = 3.0 / np.sqrt(200 / 199)
    assert p[200] == pytest.approx(0.5 * (1 + math.erf(z / math.sqrt(2))), abs=1e-9)  # 0.99863, not of log scores
    assert p[201] == 0.5 and p[:50].max() == 0.5  # no score, or too little past
    assert p[50] == pytest.approx(0.5 * (1 + math.erf((1 - 2) / np.std(past[:50], ddof=1) / math.sqrt(2))))


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
    att = saved["overall"]["attribution"]  # SKAB has eight sensors: which one an alert names first is scored
    assert att["alerts"] == sum(f["attribution"]["alerts"] for f in saved["files"])
    assert 0 <= att["right"] <= att["alerts"] and att["share"] == (round(att["right"] / att["alerts"], 4)
                                                                   if att["alerts"] else 0.0)
    for entry, f in zip(saved["files"], files, strict=True):
        assert len(entry["moved_sensors"]) == len(f.windows)
        assert set(sum(entry["moved_sensors"], [])) <= set(f.features)
        inside = [r for r in entry["raised"] if r["row"] >= f.train_rows and any(a <= r["row"] <= b
                                                                                 for a, b in f.windows)]
        assert entry["attribution"]["alerts"] + entry["attribution"]["undecided"] == len(inside)
    assert "attribution" not in saved["baselines"]["pca"]["overall"], "the baselines name no sensor"
    assert "Attribution: " in (tmp_path / "report.html").read_text()
    scores = sorted((tmp_path / "scores").glob("*.csv"))
    assert len(scores) == 2
    frame = pd.read_csv(scores[0])
    assert {"timestamp", "label", "score", "nab_score", "alert", "hst_score", "pca_score"} <= set(frame.columns)
    assert len(frame) == len(files[0].labels)
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "published: Conv-AE" in html


def test_evaluate_cli_reads_every_skab_folder_or_one(tmp_path: Path) -> None:
    root = skab_layout(tmp_path / "data", rows=600)  # valve1/0.csv and valve2/0.csv: one name, two folders
    out = tmp_path / "all"
    assert main(["evaluate", "--data", str(root), "--format", "skab", "--out", str(out), "--epochs", "1",
                 "--no-baselines", "--quiet"]) == 0  # test_evaluate_writes_summary_scores_and_report has them
    saved = json.loads((out / "summary.json").read_text())
    names = ["other/9.csv", "valve1/0.csv", "valve2/0.csv"]
    assert [e["file"] for e in saved["files"]] == names
    for name in names:  # each file's scores under its own folder's name, with that file's labels
        frame = pd.read_csv(out / "scores" / name.replace("/", "__"))
        raw = pd.read_csv(root / name, sep=";")
        assert np.array_equal(frame["label"].to_numpy(), raw["anomaly"].to_numpy().astype(int))
        assert {"score", "nab_score", "alert"} <= set(frame.columns) and len(frame) == len(raw)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and all(f"<h3>{n}</h3>" in html for n in names)
    one = tmp_path / "one"  # one folder; anomaly-free/ is found beside it for the anomaly-free protocol
    assert main(["evaluate", "--data", str(root / "valve2"), "--format", "skab", "--out", str(one), "--epochs",
                 "1", "--train-protocol", "anomaly-free", "--no-baselines", "--no-plots", "--quiet"]) == 0
    saved = json.loads((one / "summary.json").read_text())
    assert [e["file"] for e in saved["files"]] == ["valve2/0.csv"]
    assert saved["detector"]["model"].startswith("trained once on anomaly-free/anomaly-free.csv (500 rows)")


def _tick_texts(fig: Any) -> tuple[list[str], list[str]]:
    """Every tick label (major and minor) and every offset text of the figure's axes, as drawn."""
    fig.canvas.draw()
    axes = [a for ax in fig.axes for a in (ax.xaxis, ax.yaxis)]
    ticks = [t.get_text() for a in axes for t in a.get_ticklabels(which="both") if t.get_text()]
    return ticks, [a.get_offset_text().get_text() for a in axes]


def test_report_figure_has_a_panel_per_sensor_and_plain_tick_labels() -> None:
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    n = 300
    values = np.stack([1e6 + rng.normal(0, 0.01, n), 1e-4 * rng.random(n), rng.normal(0, 1, n),
                       230 + rng.normal(0, 0.05, n)], 1).astype(np.float32)  # offsets tempt a default axis
    f = LabelledFile("valve2/3.csv", 1.6e9 + np.arange(n), values, ["big", "tiny", "plain", "volts"],
                     (np.arange(n) >= 200) & (np.arange(n) < 250), [(200, 249)], 100, "test")

    def result(score: np.ndarray, thr: float) -> FileResult:
        return FileResult(f.name, score, np.full(n, 0.5), score > thr, thr)

    ours = result(np.geomspace(1, 5000, n), 4000.0)  # spans decades: a symlog axis
    hst = result(1.04 + 0.02 * rng.random(n), 1.055)  # HalfSpaceTrees-like: near 1
    pca = result(10.4 + 0.3 * rng.random(n), 10.6)
    fig = signal_figure(f, ours, {"hst": [hst], "pca": [pca]}, 0)
    assert [ax.get_yscale() for ax in fig.axes[4:]] == ["symlog", "linear", "linear"]
    assert len(fig.axes) == 4 + 3 and all(ax.get_shared_x_axes().joined(fig.axes[0], ax) for ax in fig.axes)
    for ax in fig.axes:  # the labelled window shaded in every panel
        assert [(p.get_x(), p.get_width()) for p in ax.patches] == [(200, 49)]
    for ax in fig.axes[4:]:  # flagged rows marked in the score panels
        assert ax.collections, "fill_between of the flagged rows"
    ticks, offsets = _tick_texts(fig)
    plt.close(fig)
    assert offsets == [""] * len(offsets), offsets
    assert len(ticks) >= 2 * len(fig.axes)
    for t in ticks:  # each label is the number itself: no 1.04678x10^0, 1e+06, or +1e6 offset
        float(t.replace("\u2212", "-"))
    wide = replace(f, values=np.tile(values, (1, 10)), features=[f"s{j}" for j in range(40)])
    fig = signal_figure(wide, ours, {"hst": [hst], "pca": [pca]}, 0)
    assert len(fig.axes) == 40 + 3
    assert fig.get_figheight() <= SENSOR_PANELS_MAX_INCHES + 3 * 1.6 + 1  # bounded, however many sensors
    ticks, offsets = _tick_texts(fig)
    plt.close(fig)
    assert all(o == "" for o in offsets) and all(float(t.replace("\u2212", "-")) is not None for t in ticks)


def test_evaluate_cli_on_nab_reports_the_three_profiles(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (DATA / "NAB" / "data").is_dir(), f"the labelled data is missing: {DATA}"
    rc = main(["evaluate", "--data", str(DATA / "NAB"), "--format", "nab", "--out", str(tmp_path),
               "--match", "artificialWithAnomaly/art_daily_j", "--limit", "2",
               "--epochs", "2", "--error-scale", "input", "--no-plots", "--quiet"])
    assert rc == 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["detector"]["params"]["error_scale"] == "input"
    assert set(saved["overall"]["nab"]) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    assert set(saved["baselines"]["pca"]["overall"]["nab"]) == set(saved["overall"]["nab"])
    assert set(saved["overall"]["nab_alerts"]) == set(saved["overall"]["nab"])
    assert all(v <= 100 for v in saved["overall"]["nab_alerts"].values())
    assert "ours, the alerts as raised" in (tmp_path / "report.html").read_text()
    assert saved["published"]["KNN CAD"] == {"standard": 58.0, "reward_low_FP_rate": 43.4, "reward_low_FN_rate": 64.8}
    assert "nab=" in capsys.readouterr().out
    # the per-row CSVs hold every digit: NAB's sweep over their nab_score gives the summary's figures again
    files = [f for f in load_nab(DATA / "NAB") if "artificialWithAnomaly/art_daily_j" in f.name][:2]
    frames = [pd.read_csv(tmp_path / "scores" / (f.name.replace("/", "__").removesuffix(".csv") + ".csv"))
              for f in files]
    for f, frame in zip(files, frames, strict=True):
        assert np.array_equal(frame["timestamp"].to_numpy(), f.timestamps)
    again = nab_scores([NabFile(fr["nab_score"].to_numpy(), f.windows, f.name) for f, fr in zip(files, frames,
                                                                                                  strict=True)])
    assert {k: round(v["score"], 2) for k, v in again.items()} == saved["overall"]["nab"]


def test_nab_alerts_count_each_raised_alert_once() -> None:
    pred = np.zeros(1000, bool)
    pred[200:300] = True  # one false alert, 100 rows long
    pred[505:] = True  # raised inside the window, never cleared
    assert np.flatnonzero(_run_starts(pred)).tolist() == [200, 505]
    standard = PROFILES["standard"]
    fs = file_score(_run_starts(pred), [(500, 549)], standard)
    assert (fs.tp, fs.fp, fs.fn) == (1, 1, 0)


def test_one_pretrained_model_can_serve_every_file(tmp_path: Path) -> None:
    normal = replace(step_file(at=900), name="normal.csv", train_rows=900)
    files = [step_file(seed=1), step_file(seed=2)]
    summary = evaluate(files, "csv", tmp_path, params=FAST, pretrain=normal, progress=False, baselines=(),
                       plots=False)
    assert summary["detector"]["model"].startswith("trained once on normal.csv (900 rows)")
    assert summary["overall"]["recall"] > 0.5


def test_pretrained_protocol_trains_each_file_from_the_synthetic_model(tmp_path: Path) -> None:
    from detector.pretrain import pretrained

    files = [step_file(seed=1), step_file(seed=2)]
    init = pretrained(list(files[0].features), FAST, n_series=4, length=400, epochs=2, steps_per_epoch=5)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    summary = evaluate(files, "csv", tmp_path, params=FAST, init=init, progress=False, baselines=(), plots=False)
    assert summary["detector"]["model"].endswith("starting from a model pretrained on synthetic signals "
                                                 "(detector.pretrain)")
    assert summary["overall"]["recall"] > 0.5
    assert all((init.state_dict()[k] == v).all() for k, v in before.items()), "each file trains a copy"


def test_pretrained_protocol_needs_files_of_one_width(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    rows = {"timestamp": np.arange(300) * 60.0, "label": np.zeros(300, int), "x": np.sin(np.arange(300) / 9)}
    pd.DataFrame(rows).to_csv(a, index=False)
    pd.DataFrame({**rows, "y": np.cos(np.arange(300) / 7)}).to_csv(b, index=False)
    rc = main(["evaluate", "--data", str(tmp_path), "--format", "csv", "--out", str(tmp_path / "out"),
               "--train-protocol", "pretrained", "--quiet"])
    assert rc == 2 and "--train-protocol pretrained needs files of one width; these have [1, 2]" in (
        capsys.readouterr().err)


def test_several_seeds_run_once_each_and_report_the_spread(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["evaluate", "--data", str(DATA / "NAB"), "--format", "nab", "--out", str(tmp_path),
               "--match", "artificialWithAnomaly/art_daily_j", "--limit", "1", "--epochs", "1", "--seed", "3", "4",
               "--no-baselines", "--no-plots", "--quiet"])
    assert rc == 0
    runs = {seed: json.loads((tmp_path / f"seed-{seed}" / "summary.json").read_text()) for seed in (3, 4)}
    assert {seed: r["detector"]["params"]["seed"] for seed, r in runs.items()} == {3: 3, 4: 4}
    spread = json.loads((tmp_path / "seeds.json").read_text())
    assert spread["seeds"] == [3, 4]
    for key in ("f1", "far", "event_f1", "nab_standard", "nab_reward_low_FN_rate"):
        v = spread["ours"][key]
        assert v["values"] == [r["overall"][key] if not key.startswith("nab_") else
                               r["overall"]["nab"][key.removeprefix("nab_")] for r in runs.values()]
        assert v["min"] <= v["mean"] <= v["max"] and v["mean"] == pytest.approx(np.mean(v["values"]), abs=1e-4)
    out = capsys.readouterr().out
    assert "[seed 3]" in out and "2 seeds; mean, written to" in out


def test_anomaly_free_protocol_is_for_skab_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["evaluate", "--data", str(DATA / "NAB"), "--format", "nab", "--out", str(tmp_path),
               "--train-protocol", "anomaly-free", "--limit", "1", "--quiet"])
    assert rc == 2 and "--train-protocol anomaly-free is for --format skab" in capsys.readouterr().err


def test_onset_reports_a_long_excursion_once_whatever_the_threshold() -> None:
    prob = np.r_[np.full(100, 0.5), np.full(50, 0.999), np.full(100, 0.5)]
    out = onset(prob, span=20)
    assert int((prob >= 0.9).sum()) == 50  # the likelihood alone flags every row of the run
    for threshold in (0.6, 0.9, 0.999):
        assert np.flatnonzero(out >= threshold).tolist() == [100]


def test_onset_counts_again_when_higher_or_after_the_span() -> None:
    prob = np.full(200, 0.5)
    prob[[10, 15, 20, 50]] = [0.99, 0.995, 0.99, 0.99]
    assert np.flatnonzero(onset(prob, span=20) >= 0.99).tolist() == [10, 15, 50]


def test_onset_span_follows_the_training_rows_as_artime_masks() -> None:
    # ARTime: probation 750 rows -> 7 rows per downsampled step, masking 12 steps (about 84 rows)
    assert onset_rows(750) == 86
    assert onset_rows(0) == 1


def test_onset_turns_a_run_of_false_detections_into_one_in_nab_scoring() -> None:
    # one labelled window at rows 500-549; the detector is high at rows 200-299 (false) and from row 505 on
    prob = np.full(1000, 0.5)
    prob[200:300] = 0.999
    prob[505:] = 0.999
    files = lambda p: [NabFile(p, [(500, 549)], "f")]  # noqa: E731
    standard = PROFILES["standard"]
    every_row = file_score(prob >= 0.99, [(500, 549)], standard)
    onsets = file_score(onset(prob, span=50) >= 0.99, [(500, 549)], standard)
    assert (every_row.tp, onsets.tp) == (1, 1)
    assert every_row.fp > 300 and onsets.fp == 1  # 100 + 450 rows after the window, against 1
    assert nab_scores(files(onset(prob, 50)))["standard"]["score"] > nab_scores(files(prob))["standard"]["score"]
