"""Evaluation on labelled data: every file streamed through the daemon's own code path, then scored.

For each file the protocol decides which leading rows a detector may learn from (NAB: the probationary
period; SKAB: the first 400 rows). Our detector trains an LSTM autoencoder on those rows only (or uses a
given model), then the whole file is sent as JSON records through `Daemon.process` with an in-memory
source and sink, exactly as `detector run` and `detector demo` do. What comes back per row: the window score
(each reading is scored once, in the window whose newest `hop` readings include it), its anomaly
likelihood (how unusual it is against the file's past scores), and whether an alert was active.

Baselines run on the same files and protocol: river's HalfSpaceTrees (online) and a PCA reconstruction-error
detector fitted on the training rows. Labels are used only for scoring.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import torch
from tqdm import tqdm

from consumers.base import Record
from consumers.memory import IterSource, ListSink
from detector import __version__
from detector.artifact import Artifact, load_artifact
from detector.config import Config, config_hash
from detector.daemon import Daemon
from detector.datasets import LabelledFile
from detector.errors import DataError
from detector.model import LSTMAutoencoder
from detector.nab import PROFILES, NabFile, nab_scores, normalised_score
from detector.pipeline import Pipeline
from detector.quality import (
    MOVED_K,
    Attribution,
    EventMetrics,
    PointMetrics,
    attribution,
    combine_attribution,
    combine_events,
    combine_points,
    event_metrics,
    moved_features,
    point_adjusted,
    point_metrics,
)
from detector.train import Series, TrainParams, scale_and_fill, train_model

__all__ = ["FileResult", "EVAL_PARAMS", "PUBLISHED", "run_file", "baseline_scores", "likelihood", "onset",
           "onset_rows", "nab_score", "evaluate", "seed_spread", "signal_figure"]

log = logging.getLogger(__name__)

EVAL_PARAMS = TrainParams(window=16, hop=4, hidden_size=32, epochs=20, batch_size=32, steps_per_epoch=30,
                          chunk_windows=4, patience=4, name="evaluate")
"""Model shape and training for per-file evaluation: small, as the protocols give a few hundred rows."""

PUBLISHED = {
    "nab": {
        "ARTime": {"standard": 74.9, "reward_low_FP_rate": 65.1, "reward_low_FN_rate": 80.4},
        "Numenta HTM": {"standard": 70.5, "reward_low_FP_rate": 62.6, "reward_low_FN_rate": 75.2},
        "CAD OSE": {"standard": 69.9, "reward_low_FP_rate": 67.0, "reward_low_FN_rate": 73.2},
        "KNN CAD": {"standard": 58.0, "reward_low_FP_rate": 43.4, "reward_low_FN_rate": 64.8},
        "Random Cut Forest": {"standard": 51.7, "reward_low_FP_rate": 38.4, "reward_low_FN_rate": 59.8},
        "Windowed Gaussian": {"standard": 39.6, "reward_low_FP_rate": 20.9, "reward_low_FN_rate": 47.4},
        "random": {"standard": 11.0, "reward_low_FP_rate": 1.2, "reward_low_FN_rate": 19.5},
    },
    "skab": {
        "Conv-AE": {"f1": 0.78, "far": 0.136, "mar": 0.280},
        "MSET": {"f1": 0.78},
        "PCA T-squared+Q": {"f1": 0.76},
        "LSTM-AE": {"f1": 0.74, "far": 0.300, "mar": 0.259},
        "Isolation Forest": {"f1": 0.29},
    },
}
"""Published scores from the data README (NAB: whole corpus; SKAB: whole benchmark, not valve1 alone)."""

BASELINE_QUANTILE = 0.99
"""A baseline flags a row when its score exceeds this quantile of its scores on the training rows."""


@dataclass
class FileResult:
    """One file's per-row outputs for one detector."""

    name: str
    score: np.ndarray  # (T,) raw score (0 where the row was not scored)
    prob: np.ndarray  # (T,) per-row score of NAB's threshold sweep in [0, 1]: the likelihood at its onsets
    pred: np.ndarray  # (T,) bool: the detector flagged the row
    threshold: float
    raised: list[tuple[int, str]] = field(default_factory=list)  # ours: (row, top feature) of each raised alert
    seconds: float = 0.0
    rejected: int = 0  # rows the daemon's path sent to the dead-letter topic (e.g. repeated timestamps)


def _records(f: LabelledFile, topic: str = "evaluate") -> list[Record]:
    """The file's rows as JSON readings of one stream; the record offset is the row index."""
    out = []
    feats = f.features
    for i, (ts, row) in enumerate(zip(f.timestamps.tolist(), f.values.tolist(), strict=True)):
        vals = {k: v for k, v in zip(feats, row, strict=True) if v == v}
        body = orjson.dumps({"stream": "s", "ts": ts, "values": vals or {feats[0]: None}})
        out.append(Record(topic, 0, i, b"s", body, int(ts * 1000)))
    return out


def _train(f: LabelledFile, params: TrainParams, init: LSTMAutoencoder | None = None) -> Artifact:
    train = f.values[: f.train_rows]
    need = params.window + 3 * params.hop
    if len(train) < need:
        raise DataError(f"{f.name}: only {len(train)} training rows; the model needs at least {need} "
                        f"(use a smaller --window or --hop)")
    model, manifest = train_model(Series(list(f.features), ["s"], [train]), replace(params, name=f.name),
                                  progress=False, init=init)
    return Artifact(model, manifest, Path("."))


def run_file(f: LabelledFile, cfg: Config, params: TrainParams = EVAL_PARAMS,
             artifact: Artifact | None = None, init: LSTMAutoencoder | None = None) -> FileResult:
    """Train on the protocol's rows (unless a model is given; from `init`'s weights if given), stream the file
    through the daemon's path."""
    t0 = time.monotonic()
    art = artifact or _train(f, params, init)
    if list(art.manifest.features) != list(f.features):
        raise DataError(f"{f.name}: the model's features ({','.join(art.manifest.features)}) are not the "
                        f"file's ({','.join(f.features)})")
    daemon = Daemon(cfg, Pipeline(cfg, art, "cpu"))
    T = len(f.timestamps)
    score = np.full(T, np.nan)  # each window's score from the row that completes it; NaN before the first
    src, sink = IterSource(_records(f), batch_size=8 * art.manifest.hop), ListSink()
    warning = np.nan
    while not src.exhausted:
        batch = src.poll_batch(0)
        if not batch:
            continue
        out = daemon.process(batch, src, sink)
        ws = out.windows
        if ws is None or not len(ws):
            continue
        score[[batch[int(out.readings.source[r])].offset for r in ws.reading]] = ws.score
        warning = float(out.warning[-1])
    daemon.commit(src, sink)
    pred = np.zeros(T, bool)
    tops = []
    opened = None
    for rec in sink.on(cfg.output.alerts_topic):
        a = orjson.loads(rec.value)
        if a["kind"] != "anomaly":
            continue
        row = int(a["input"]["offset"])
        if a["state"] == "raised":
            opened = row
            tops.append((row, a["top_features"][0]["name"]))
        elif a["state"] == "cleared" and opened is not None:
            pred[opened:row] = True
            opened = None
    if opened is not None:
        pred[opened:] = True
    score = pd.Series(score).ffill().to_numpy()  # a row carries the newest score known when it arrived
    prob = nab_score(score, f.train_rows)
    rejected = len(sink.on(cfg.output.dead_letter_topic))
    return FileResult(f.name, np.nan_to_num(score), prob, pred, warning, tops, time.monotonic() - t0, rejected)


LIKELIHOOD_HISTORY = 8640
"""Rows of history in the likelihood transform (Numenta's default, not tuned)."""


def likelihood(score: np.ndarray, history: int = LIKELIHOOD_HISTORY, averaging: int = 1,
               min_history: int = 50) -> np.ndarray:
    """Per-row anomaly likelihood in [0, 1]: how unusual the score is against the file's past scores.

    The score (averaged over the last `averaging` rows) is compared with the mean and standard deviation of
    the scores of up to `history` rows before it, as a Gaussian tail probability: Numenta's anomaly
    likelihood. Numenta averages its per-row scores over 10 rows; ours already summarises a window of rows,
    so the default is no averaging. Only the past is used; NaN scores (rows before the first window) are
    left out, and rows with less than `min_history` scored rows of past get 0.5. It makes scores of
    different files comparable, which NAB needs: one threshold serves the whole corpus.

    >>> p = likelihood(np.r_[np.ones(100), 50.0, np.ones(20)] + np.linspace(0, 0.01, 121))
    >>> bool(p[100] > 0.99), bool(p[:50].max() == 0.5)
    (True, True)
    """
    x = pd.Series(score, dtype=np.float64)
    mu = x.rolling(history, min_periods=min_history).mean().shift(1)
    sd = x.rolling(history, min_periods=min_history).std().shift(1)
    recent = x.rolling(averaging, min_periods=1).mean()
    z = ((recent - mu) / sd.clip(lower=1e-6)).fillna(0.0).to_numpy()
    return torch.special.ndtr(torch.tensor(z, dtype=torch.float64)).numpy()


ONSET_SHARE = 0.115
"""Rows masked after a high likelihood, as a share of the training rows: ARTime's masking span (1.5 feature
windows of 8 downsampled steps, with probation / 104 rows per step), taken from its code, not tuned here."""


def onset_rows(train_rows: int) -> int:
    """How many rows after a row its likelihood must beat to count again: ONSET_SHARE of the training rows."""
    return max(1, int(round(ONSET_SHARE * train_rows)))


def onset(prob: np.ndarray, span: int) -> np.ndarray:
    """The likelihood where it sets a new maximum over the previous `span` rows, 0 elsewhere.

    NAB rewards only the earliest detection in a labelled window and charges every detection outside one, so
    a detector that stays above its threshold for a while should report the onset, not every row of it
    (ARTime, the best published NAB detector, masks its detections after an anomaly in the same way; our
    alerts do it with episodes). It uses no threshold: whichever one NAB's sweep picks, a run of rows above
    it counts once, and again only where the likelihood rises above everything in the last `span` rows.

    >>> onset(np.array([0.5, 0.9, 0.95, 0.95, 0.9, 0.5, 0.5, 0.92]), span=3).tolist()
    [0.5, 0.9, 0.95, 0.0, 0.0, 0.0, 0.0, 0.92]
    """
    prev = pd.Series(prob).shift(1).rolling(max(span, 1), min_periods=1).max().fillna(-np.inf).to_numpy()
    return np.where(prob > prev, prob, 0.0)


def nab_score(score: np.ndarray, train_rows: int) -> np.ndarray:
    """The per-row score NAB's threshold sweep sees: the likelihood of `score`, kept at its onsets."""
    return onset(likelihood(score), onset_rows(train_rows))


def baseline_scores(f: LabelledFile, kind: str, seed: int = 0) -> FileResult:
    """Per-row scores of a baseline (`hst` or `pca`) on one file, learning only from its training rows."""
    t0 = time.monotonic()
    x = _scaled(f)
    if kind == "hst":
        score = _hst(x, f.train_rows, seed)
    elif kind == "pca":
        score = _pca(x, f.train_rows)
    else:
        raise ValueError(f"unknown baseline {kind!r}")
    train = score[: f.train_rows]
    train = train[np.isfinite(train)]
    thr = float(np.quantile(train, BASELINE_QUANTILE)) if len(train) else float("inf")
    return FileResult(f.name, score, nab_score(score, f.train_rows), score > thr, thr,
                      seconds=time.monotonic() - t0)


def _scaled(f: LabelledFile) -> np.ndarray:
    """Values standardised by the training rows, gaps held at the last value (0 before the first)."""
    train = f.values[: f.train_rows]
    mu = np.nan_to_num(np.nanmean(train, axis=0))
    sd = np.nan_to_num(np.nanstd(train, axis=0), nan=1.0)
    return scale_and_fill(f.values, mu, np.where(sd > 1e-9, sd, 1.0))[0].astype(np.float64)


def _hst(x: np.ndarray, train_rows: int, seed: int) -> np.ndarray:
    """river HalfSpaceTrees, online: score each row, then learn it.

    HalfSpaceTrees expects features in [0, 1]: each is min-max scaled by its training rows, so that normal
    operation spans the middle half of the unit interval and readings beyond it land near its edges.
    """
    from river import anomaly

    model = anomaly.HalfSpaceTrees(n_trees=25, height=12, window_size=min(250, max(train_rows // 2, 10)), seed=seed)
    lo, hi = x[:train_rows].min(axis=0), x[:train_rows].max(axis=0)
    squashed = np.clip(0.25 + 0.5 * (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    names = [f"f{i}" for i in range(x.shape[1])]
    out = np.empty(len(x))
    for i, row in enumerate(squashed.tolist()):
        d = dict(zip(names, row, strict=True))
        out[i] = model.score_one(d)
        model.learn_one(d)
    return out


PCA_LAGS = 8
"""The PCA baseline sees each row with its 7 predecessors, so it can model one sensor's dynamics too."""


def _pca(x: np.ndarray, train_rows: int, variance: float = 0.95) -> np.ndarray:
    """Squared reconstruction error (SPE, or Q) of lag-embedded rows, against principal axes of the training rows."""
    T, F = x.shape
    pad = np.concatenate([np.repeat(x[:1], PCA_LAGS - 1, axis=0), x])
    emb = np.lib.stride_tricks.sliding_window_view(pad, (PCA_LAGS, F))[:, 0].reshape(T, PCA_LAGS * F)
    train = emb[:train_rows]
    mu = train.mean(axis=0)
    _, s, vt = np.linalg.svd(train - mu, full_matrices=False)
    share = np.cumsum(s**2) / max(float((s**2).sum()), 1e-12)
    k = int(min(np.searchsorted(share, variance) + 1, max(emb.shape[1] - 1, 1)))
    p = vt[:k]
    centred = emb - mu
    resid = centred - centred @ p.T @ p
    q = (resid**2).sum(axis=1)
    return q / max(float(np.mean(q[:train_rows])), 1e-12)


def _metrics(f: LabelledFile, r: FileResult) -> tuple[PointMetrics, EventMetrics, dict[str, Any]]:
    """Point-wise and event metrics on the rows after the training part (the protocol's test rows)."""
    lo = f.train_rows
    pm = point_metrics(r.pred[lo:], f.labels[lo:])
    wins = [(a - lo, b - lo) for a, b in f.windows if b >= lo]
    wins = [(max(a, 0), b) for a, b in wins]
    em = event_metrics(r.pred[lo:], wins, len(f.labels) - lo)
    pa = point_metrics(point_adjusted(r.pred[lo:], wins), f.labels[lo:])
    row = {**_pm(pm), **_em(em), "point_adjusted_f1": round(pa.f1, 4), "threshold": r.threshold,
           "seconds": round(r.seconds, 2)}
    return pm, em, row


def _pm(pm: PointMetrics) -> dict[str, Any]:
    return {"precision": round(pm.precision, 4), "recall": round(pm.recall, 4), "f1": round(pm.f1, 4),
            "far": round(pm.far, 4), "mar": round(pm.mar, 4), "tp": pm.tp, "fp": pm.fp, "tn": pm.tn, "fn": pm.fn}


def _em(em: EventMetrics) -> dict[str, Any]:
    return {"event_precision": round(em.precision, 4), "event_recall": round(em.recall, 4),
            "event_f1": round(em.f1, 4), "events_caught": em.caught, "events_missed": em.missed,
            "false_events": em.false_events,
            "mean_delay": round(float(np.mean(em.delays)), 2) if em.delays else None}


def _overall(files: list[LabelledFile], results: list[FileResult], fmt: str) -> dict[str, Any]:
    pms, ems = [], []
    for f, r in zip(files, results, strict=True):
        pm, em, _ = _metrics(f, r)
        pms.append(pm)
        ems.append(em)
    out = {**_pm(combine_points(pms)), **_em(combine_events(ems))}
    if fmt == "nab" and any(f.windows for f in files):
        nab = nab_scores([NabFile(r.prob, f.windows, f.name) for f, r in zip(files, results, strict=True)])
        out["nab"] = {p: round(v["score"], 2) for p, v in nab.items()}
        out["nab_thresholds"] = {p: v["threshold"] for p, v in nab.items()}
        # the alerts as raised: each raise is one detection, at the thresholds the detector set itself
        raised = [NabFile(_run_starts(r.pred).astype(float), f.windows, f.name)
                  for f, r in zip(files, results, strict=True)]
        out["nab_alerts"] = {p: round(normalised_score(raised, prof, 1.0), 2) for p, prof in PROFILES.items()}
    return out


def _attribution_dict(a: Attribution) -> dict[str, Any]:
    return {"alerts": a.alerts, "right": a.right, "undecided": a.undecided, "share": round(a.share, 4)}


def _run_starts(pred: np.ndarray) -> np.ndarray:
    """Rows where a run of flagged rows starts (for our detector: where an alert was raised)."""
    out = pred.astype(bool).copy()
    out[1:] &= ~pred[:-1].astype(bool)
    return out


def evaluate(files: list[LabelledFile], fmt: str, out_dir: str | Path, cfg: Config | None = None,
             params: TrainParams = EVAL_PARAMS, model_dir: str | Path | None = None,
             pretrain: LabelledFile | None = None, progress: bool = True,
             baselines: tuple[str, ...] = ("hst", "pca"), plots: bool = True,
             init: LSTMAutoencoder | None = None) -> dict[str, Any]:
    """Run our detector and the baselines on every file; write summary.json, per-row CSVs and report.html.

    `model_dir` (a trained model) or `pretrain` (normal data to train one model on) replace training per file;
    `init` (a model pretrained on synthetic signals) is where training per file starts from.
    """
    if not files:
        raise DataError("no files to evaluate")
    cfg = cfg or Config()
    out = Path(out_dir)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    artifact = load_artifact(model_dir) if model_dir else None
    model_note = str(model_dir) if model_dir else "trained per file on the protocol's training rows"
    if pretrain is not None:
        artifact = _train(pretrain, params)
        model_note = f"trained once on {pretrain.name} ({pretrain.train_rows} rows), used for every file"
    elif init is not None and artifact is None:
        model_note += ", starting from a model pretrained on synthetic signals (detector.pretrain)"
    ours: list[FileResult] = []
    base: dict[str, list[FileResult]] = {b: [] for b in baselines}
    t0 = time.monotonic()
    for f in tqdm(files, desc="evaluate", unit="file", disable=not progress):
        ours.append(run_file(f, cfg, params, artifact, init))
        for b in baselines:
            base[b].append(baseline_scores(f, b, params.seed))
    per_file, attributions = [], []
    for i, f in enumerate(files):
        _, _, row = _metrics(f, ours[i])
        row = {"file": f.name, "rows": len(f.labels), "train_rows": f.train_rows, "windows": len(f.windows),
               "rejected_rows": ours[i].rejected, **row,
               "raised": [{"row": r, "top_feature": n} for r, n in ours[i].raised],
               "baselines": {b: _metrics(f, base[b][i])[2] for b in baselines}}
        if len(f.features) > 1:  # which sensor an alert names first only means something with several
            moved = [moved_features(f.values, w, f.labels) for w in f.windows]
            att = attribution([(r, n) for r, n in ours[i].raised if r >= f.train_rows], f.windows, moved,
                              list(f.features))  # alerts raised in the test rows
            attributions.append(att)
            row["attribution"] = _attribution_dict(att)
            row["moved_sensors"] = [[n for n, m in zip(f.features, mv, strict=True) if m] for mv in moved]
        per_file.append(row)
        _write_scores(out / "scores" / (f.name.replace("/", "__").removesuffix(".csv") + ".csv"), f, ours[i], base, i)
    summary = {
        "detector": {"name": "lstm-autoencoder", "version": __version__, "model": model_note,
                     "params": params.__dict__,
                     "config_hash": config_hash(cfg), "thresholds": cfg.thresholds.model_dump(),
                     "alerts": cfg.alerts.model_dump()},
        "format": fmt,
        "protocol": files[0].protocol,
        "files": per_file,
        "overall": _overall(files, ours, fmt) | ({"attribution": _attribution_dict(combine_attribution(attributions))}
                                                  if attributions else {}),
        "baselines": {b: {"overall": _overall(files, base[b], fmt),
                          "rule": f"score above the {BASELINE_QUANTILE} quantile of the training rows' scores"}
                      for b in baselines},
        "published": PUBLISHED.get(fmt, {}),
        "seconds": round(time.monotonic() - t0, 1),
    }
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    _report(out / "report.html", summary, files, ours, base, plots)
    return summary


SPREAD_KEYS = ("f1", "precision", "recall", "far", "mar", "event_f1", "mean_delay")
"""The overall figures whose spread over training seeds `seed_spread` reports (with NAB's and attribution's)."""


def seed_spread(summaries: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Mean, least and greatest of our overall figures over runs that differ only in the training seed.

    >>> runs = [{"overall": {"f1": 0.7, "nab": {"standard": 50.0}}},
    ...         {"overall": {"f1": 0.8, "nab": {"standard": 56.0}}}]
    >>> seed_spread(runs, [0, 1])["ours"]["nab_standard"]
    {'mean': 53.0, 'min': 50.0, 'max': 56.0, 'values': [50.0, 56.0]}
    """
    def flat(ov: dict[str, Any]) -> dict[str, float]:
        out = {k: float(ov[k]) for k in SPREAD_KEYS if ov.get(k) is not None}
        out |= {f"nab_{p}": float(v) for p, v in ov.get("nab", {}).items()}
        if "attribution" in ov:
            out["attribution_share"] = float(ov["attribution"]["share"])
        return out

    rows = [flat(s["overall"]) for s in summaries]
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    return {"seeds": list(seeds), "ours": {k: {"mean": round(float(np.mean([r[k] for r in rows])), 4),
                                              "min": min(r[k] for r in rows), "max": max(r[k] for r in rows),
                                              "values": [r[k] for r in rows]} for k in keys}}


def _write_scores(path: Path, f: LabelledFile, r: FileResult, base: dict[str, list[FileResult]], i: int) -> None:
    cols: dict[str, Any] = {"timestamp": f.timestamps, "label": f.labels.astype(int),
                            "train": (np.arange(len(f.labels)) < f.train_rows).astype(int),
                            "score": r.score, "nab_score": r.prob, "alert": r.pred.astype(int)}
    for b, results in base.items():
        cols[f"{b}_score"] = results[i].score
        cols[f"{b}_flag"] = results[i].pred.astype(int)
    pd.DataFrame(cols).to_csv(path, index=False, float_format="%.17g")  # round-trips: the NAB sweep reruns from it


def _report(path: Path, summary: dict[str, Any], files: list[LabelledFile], ours: list[FileResult],
            base: dict[str, list[FileResult]], plots: bool) -> None:
    """A self-contained HTML page: the overall table against baselines and published scores, then per file."""
    from html import escape

    o = summary["overall"]
    keys = ["precision", "recall", "f1", "far", "mar", "event_f1", "mean_delay"]
    head = "".join(f"<th>{k}</th>" for k in keys)
    nab_cols = ""
    if "nab" in o:
        nab_cols = "<th>NAB standard</th><th>low FP</th><th>low FN</th>"

    def row(name: str, ov: dict[str, Any]) -> str:
        cells = "".join(f"<td>{'' if ov.get(k) is None else ov.get(k)}</td>" for k in keys)
        if nab_cols:
            n = ov.get("nab", {})
            cells += "".join(f"<td>{n.get(p, '')}</td>" for p in ("standard", "reward_low_FP_rate",
                                                                 "reward_low_FN_rate"))
        return f"<tr><td>{escape(name)}</td>{cells}</tr>"

    rows = [row("ours (LSTM autoencoder)", o)]
    if "nab_alerts" in o:  # the same detector scored by the alerts it raised, with no threshold sweep
        rows.append(row("ours, the alerts as raised", {"nab": o["nab_alerts"]}))
    rows += [row(f"baseline: {b}", v["overall"]) for b, v in summary["baselines"].items()]
    for name, pub in summary["published"].items():
        ov = {k: pub.get(k) for k in keys}
        if nab_cols:
            ov["nab"] = pub
        rows.append(row(f"published: {name}", ov))
    parts = [f"<html><head><meta charset='utf-8'><title>detector evaluate: {summary['format']}</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
             "</style></head><body>",
             f"<h1>detector evaluate: {escape(summary['format'])}, {len(files)} files</h1>",
             f"<p>Protocol: {escape(summary['protocol'])}. Point-wise metrics on the rows after each file's "
             "training part; event metrics count each labelled window once.</p>",
             f"<table><tr><th>detector</th>{head}{nab_cols}</tr>{''.join(rows)}</table>"]
    if "attribution" in o:
        a = o["attribution"]
        parts.append(f"<p>Attribution: {a['right']} of {a['alerts']} alerts raised inside labelled anomalies name "
                     "first a sensor the anomaly moved (its mean beyond the normal rows' on both sides by more "
                     f"than {MOVED_K:g} standard deviations); {a['undecided']} more fell in anomalies that moved "
                     "no sensor that far.</p>")
    if plots:
        for i, f in enumerate(files):
            parts.append(f"<h3>{escape(f.name)}</h3><img src='data:image/png;base64,{_plot(f, ours[i], base, i)}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


SENSOR_PANEL_INCHES = 0.7  # height of one sensor's panel in the report's figure ...
SENSOR_PANELS_MAX_INCHES = 14.0  # ... until the sensors' panels together reach this: then they share it


def _plain_number(v: float, _pos: int | None = None) -> str:
    """A tick value written out in full, never as a power of ten ("0.000123", "1047", "1.047")."""
    if v == 0 or not np.isfinite(v):
        return "0" if v == 0 else str(v)
    return np.format_float_positional(v, precision=4, unique=True, fractional=False, trim="-")


def _plain_ticks(ax: Any) -> None:
    """Tick labels as plain numbers on both axes: no offset, no scientific notation, no minor labels."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "linear":
            fmt = ScalarFormatter(useOffset=False, useMathText=False)
            fmt.set_scientific(False)
            axis.set_major_formatter(fmt)
        else:  # symlog / log: their own formatters write 1.04678x10^0
            axis.set_major_formatter(FuncFormatter(_plain_number))
        axis.set_minor_formatter(NullFormatter())


def _spans_decades(score: np.ndarray) -> bool:
    """The scores reach more than 30 times their low level (5th percentile of the positive ones, at least 1)."""
    pos = score[np.isfinite(score) & (score > 0)]
    return bool(len(pos)) and float(pos.max()) > 30 * max(float(np.percentile(pos, 5)), 1.0)


def signal_figure(f: LabelledFile, r: FileResult, base: dict[str, list[FileResult]], i: int) -> Any:
    """The report's figure of one file: a panel per sensor, then our score and each baseline's, on one row axis.

    Labelled windows are shaded green in every panel, flagged rows red in the score panels, and the end of the
    training rows is a blue line. The sensors' panels share a bounded height, so a file with many sensors
    gives a figure of bounded size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = np.arange(len(f.labels))
    n_sensors = len(f.features)
    panels = [("ours: score", r)] + [(f"{b}: score", res[i]) for b, res in base.items()]
    sensor_h = min(SENSOR_PANEL_INCHES, SENSOR_PANELS_MAX_INCHES / max(n_sensors, 1))
    score_h = 1.6
    heights = [sensor_h] * n_sensors + [score_h] * len(panels)
    fig, axes = plt.subplots(len(heights), 1, figsize=(12, sum(heights) + 0.8), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights, "hspace": 0.12})
    axes = list(axes[:, 0])
    label_size = 7 if sensor_h >= 0.4 else 6
    for ax, name, col in zip(axes[:n_sensors], f.features, f.values.T, strict=True):
        ax.plot(x, col, lw=0.6, color="tab:blue")
        ax.text(0.003, 0.92, name, transform=ax.transAxes, va="top", fontsize=label_size,
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "lw": 0})
        ax.tick_params(axis="y", labelsize=7)
        if sensor_h >= 0.4:
            ax.yaxis.set_major_locator(MaxNLocator(nbins=2))
        else:  # too small for readable values: the shape is what such a panel can show
            ax.set_yticks([])
    for ax, (label, res) in zip(axes[n_sensors:], panels, strict=True):
        ax.plot(x, res.score, lw=0.6, color="k")
        if np.isfinite(res.threshold):
            ax.axhline(res.threshold, color="tab:orange", lw=0.8, ls="--")
        ax.fill_between(x, 0, 1, where=res.pred, color="tab:red", alpha=0.25, transform=ax.get_xaxis_transform())
        ax.set_ylabel(label, fontsize=8)
        if _spans_decades(res.score):  # ours often does; HalfSpaceTrees' scores near 1 stay linear
            ax.set_yscale("symlog")
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes:
        for a, b in f.windows:
            ax.axvspan(a, b, color="tab:green", alpha=0.15)
        ax.axvline(f.train_rows, color="tab:blue", lw=0.8)
        _plain_ticks(ax)
    axes[-1].set_xlabel("row (green: labelled windows, red: flagged, blue line: end of training rows)")
    fig.subplots_adjust(left=0.07, right=0.99, top=1 - 0.25 / fig.get_figheight(),
                        bottom=0.55 / fig.get_figheight())
    return fig


def _plot(f: LabelledFile, r: FileResult, base: dict[str, list[FileResult]], i: int) -> str:
    """The file's figure as a base64 PNG."""
    import matplotlib.pyplot as plt

    fig = signal_figure(f, r, base, i)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=70)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
