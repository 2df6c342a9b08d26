"""Learning a model from normal data: load, scale, fit with early stopping, calibrate, save.

Each stream's series is split in time (`holdout_roles`): in each of `holdout_blocks` cycles through the span,
the first `1 - val - cal` part trains the model, windows that end in the next part decide early stopping and
the error statistics, windows that end in the last part give the calibration distribution of window scores.
Validation and calibration run the model continuously over the whole series, exactly as the engine does at
run time.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from detector import __version__
from detector.artifact import Manifest
from detector.errors import DataError
from detector.forecast import forecast_scores, forecast_z
from detector.model import LSTMAutoencoder
from detector.relations import Relations, even_tails, fit_relations, holding, relation_scores, stream_scales
from detector.resume import TrainState, fingerprint, load_state, save_state
from detector.score import COVARIANCES, ScoreSpec, precision_matrix, score_windows, smooth_decay
from detector.sensors import longest_runs
from detector.spikes import SIDE as SPIKE_SIDE
from detector.spikes import fit_spikes

__all__ = ["TrainParams", "Series", "load_series", "train_model", "scale_and_fill", "CALIBRATION_LEVELS",
           "ERROR_SCALES"]

log = logging.getLogger(__name__)

ERROR_SCALES = ("calibration", "input")
"""The unit of a reconstruction error in the score. `calibration`: each feature's error standardised by its mean
and spread on the validation rows, so every feature counts alike. `input`: the error as it is, in units of the
feature's training spread, so a feature the model reproduces closely (a smooth temperature) does not turn a
small drift into a large score; with no statistics to fit, the calibration scores then come from the
validation part as well as the calibration part."""

TRAIN, VAL, CAL = 0, 1, 2
"""A training row's role (holdout_roles): trained on, held back for validation, held back for calibration."""

ERROR_STD_FLOOR = 0.01
"""The least error spread of a feature, in units of its training spread (see `_calibrate`)."""

CALIBRATION_LEVELS = sorted(
    set(np.round(np.linspace(0.0, 1.0, 201), 4).tolist())
    | {0.991, 0.992, 0.993, 0.994, 0.996, 0.997, 0.998, 0.999, 0.9995, 0.9999}
)


@dataclass(frozen=True)
class TrainParams:
    """Model shape and training settings."""

    window: int = 32
    hop: int = 8
    hidden_size: int = 48
    num_layers: int = 1
    epochs: int = 30
    batch_size: int = 64
    steps_per_epoch: int = 60
    chunk_windows: int = 6
    lr: float = 3e-3
    patience: int = 4
    corrupt: float = 0.0  # share of training chunks whose input gets a synthetic fault (denoising); 0 = off
    score_aggregate: str = "max"  # see score.AGGREGATES
    error_scale: str = "input"  # see ERROR_SCALES (the default since 2026-12-07: docs/evaluation.md)
    covariance: str = "diagonal"  # see score.COVARIANCES
    smooth_halflife: float = 0.0  # readings; > 0: a smoothed score beside the window's own (score.smooth_update)
    relations: bool = True  # a cross-sensor relation score beside the model's (detector.relations); needs F >= 2
    relation_tails: bool = False  # each sensor's relation residual judged against its own tail (even_tails)
    relation_holdout: float = 1.5  # >0: score only relations that hold on the validation rows (relations.holding)
    forecast: bool = False  # a head that predicts the next reading, and a forecast score (detector.forecast)
    stream_scale: bool = False  # the model sees each training stream on its own scale (its trained-on rows')
    spikes: bool = True  # a spike score: one sensor's reading beyond both neighbours raises at once (detector.spikes)
    spike_score: bool = False  # with spikes: the excursion enters the window score too, (r / level)^2 x the 0.999 score
    val_fraction: float = 0.15
    cal_fraction: float = 0.15
    holdout_blocks: int = 1  # cycles of train, validation and calibration rows through the span (holdout_roles)
    seed: int = 0
    name: str = "default"


@dataclass(frozen=True)
class Series:
    """Normal-operation data: one (T_s, F) array of values (NaN where missing) per stream."""

    features: list[str]
    streams: list[str]
    values: list[np.ndarray]


def load_series(path: str | Path, features: list[str] | None = None, ts_col: str = "timestamp",
                stream_col: str = "stream") -> Series:
    """Read a CSV or Parquet file of readings into per-stream series ordered by time."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found (pass --data PATH to a .csv or .parquet file)")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p, sep=None, engine="python") if p.suffix.lower() != ".csv" else pd.read_csv(p)
    except Exception as exc:  # pandas raises many parser error types; each means the same to a user
        raise DataError(f"{p}: cannot read as {'Parquet' if p.suffix == '.parquet' else 'CSV'} ({exc})") from None
    missing = [c for c in (ts_col, stream_col) if c not in df.columns]
    if missing:
        raise DataError(
            f"{p}: no column {missing[0]!r} (columns are: {', '.join(map(str, df.columns))}; "
            f"name the right one with --{'timestamp' if missing[0] == ts_col else 'stream'}-col)"
        )
    if features is None:
        features = [c for c in df.columns if c not in (ts_col, stream_col) and pd.api.types.is_numeric_dtype(df[c])]
    absent = [f for f in features if f not in df.columns]
    if absent:
        raise DataError(f"{p}: feature column(s) {', '.join(absent)} not found (columns are: "
                        f"{', '.join(map(str, df.columns))})")
    if not features:
        raise DataError(f"{p}: no numeric feature columns (name them with --features a,b,c)")
    ts = df[ts_col]
    if not pd.api.types.is_numeric_dtype(ts):
        ts = pd.to_datetime(ts, utc=True, errors="coerce")
        if ts.isna().any():
            raise DataError(f"{p}: column {ts_col!r} has values that are neither numbers nor dates")
        ts = (ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    df = df.assign(_ts=ts.astype(float)).sort_values([stream_col, "_ts"], kind="stable")
    try:
        vals = df[features].to_numpy(dtype=np.float32)
    except ValueError:
        raise DataError(f"{p}: feature columns must be numeric ({', '.join(features)})") from None
    keys = df[stream_col].astype(str).to_numpy()
    bounds = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
    streams = [str(keys[a]) for a in bounds[:-1]]
    values = [vals[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return Series(list(features), streams, values)


def scale_and_fill(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale, and hold the last present value where one is missing (0 before the first); return (x, mask)."""
    x = (values - mean) / std
    present = ~np.isnan(x)
    pos = np.where(present, np.arange(len(x))[:, None], -1)
    np.maximum.accumulate(pos, axis=0, out=pos)
    filled = np.where(pos >= 0, x[np.maximum(pos, 0), np.arange(x.shape[1])], 0.0).astype(np.float32)
    return filled, present


def _noise_scale(x: np.ndarray) -> np.ndarray:
    """Each feature's reading-to-reading noise level (F,), from the median absolute first difference."""
    d = np.abs(np.diff(x, axis=0))
    return np.maximum(np.median(d, axis=0) * 1.4826 / np.sqrt(2), 1e-3).astype(np.float32)


def _corrupt(x: np.ndarray, noise: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """A copy of chunks (B, T, F) where `share` of them carry one synthetic fault on one feature.

    The model then learns to rebuild the clean readings from faulty input (a denoising autoencoder), so a
    fault in one sensor is not passed through to the reconstruction. The kinds mirror what breaks on
    machines: offset, spike, stuck value, noise burst, and a ramp, of 4 to 12 times the feature's noise.
    """
    out = x.copy()
    B, T, F = x.shape
    for b in np.flatnonzero(rng.random(B) < share):
        f = int(rng.integers(F))
        kind = int(rng.integers(5))
        n = int(rng.integers(1, 6)) if kind == 1 else int(rng.integers(T // 4, T))
        a = int(rng.integers(0, T - n + 1))
        span = slice(a, a + n)
        size = float(rng.uniform(4.0, 12.0)) * noise[f] * float(rng.choice([-1.0, 1.0]))
        if kind in (0, 1):  # offset, spike
            out[b, span, f] += size
        elif kind == 2:  # stuck
            out[b, span, f] = out[b, max(a - 1, 0), f]
        elif kind == 3:  # noise burst
            out[b, span, f] += rng.normal(0.0, abs(size) / 2, n).astype(np.float32)
        else:  # ramp
            out[b, span, f] += size * np.linspace(0.0, 1.5, n, dtype=np.float32)
    return out


def _continuous(model: LSTMAutoencoder, x: torch.Tensor, hop: int, window: int,
                chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the model over one whole series (T, F) as the engine would; return window ends, reconstructions and
    the encoder's outputs (T, H)."""
    out, _ = model.encode(x[None], torch.tensor([len(x)]), model.zero_state(1))
    ends = torch.arange(hop - 1, len(x), hop)
    ends = ends[ends >= window - 1]
    recon = torch.cat([model.decode(out[0, ends[i:i + chunk]]) for i in range(0, len(ends), chunk)]) \
        if len(ends) else torch.empty(0, window, x.shape[1])
    return ends, recon, out[0]


def _next_errors(model: LSTMAutoencoder, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each reading's error (T, F) against the forecast from the encoder's output before it (the first: NaN)."""
    err = torch.full_like(x, torch.nan)
    if len(x) > 1:
        err[1:] = x[1:] - model.predict_next(out[:-1])
    return err


def train_model(series: Series, params: TrainParams = TrainParams(), progress: bool = True,
                init: LSTMAutoencoder | None = None, checkpoint: str | Path | None = None,
                resume: bool = False) -> tuple[LSTMAutoencoder, Manifest]:
    """Fit an LSTM autoencoder on normal series and calibrate its scores; return the model and manifest.

    `init`, a model of the same shape, gives the starting weights (a copy; `init` itself is not changed).
    `checkpoint`: a folder where the run's state is written after every epoch (detector.resume); with
    `resume`, training goes on from the state there instead of starting afresh. Progress: a bar in readings
    per second with the time left on a terminal, one plain log line per epoch elsewhere (a log file).
    """
    t0 = time.monotonic()
    if not 0.0 <= params.corrupt <= 1.0:
        raise DataError(f"corrupt must be between 0 and 1 (got {params.corrupt})")
    if params.relation_holdout < 0:
        raise DataError(f"relation_holdout must be 0 (off) or above (got {params.relation_holdout:g})")
    if params.error_scale not in ERROR_SCALES:
        raise DataError(f"error_scale must be one of {', '.join(ERROR_SCALES)} (got {params.error_scale!r})")
    if params.covariance not in COVARIANCES:
        raise DataError(f"covariance must be one of {', '.join(COVARIANCES)} (got {params.covariance!r})")
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    W, hop, F = params.window, params.hop, len(series.features)
    usable = [(s, v) for s, v in zip(series.streams, series.values, strict=True) if len(v) >= W + 3 * hop]
    if not usable:
        raise DataError(f"no stream has at least window + 3*hop = {W + 3 * hop} readings to learn from")
    chunk_len = W + hop * (params.chunk_windows - 1)
    role = {s: holdout_roles(len(v), params, chunk_len) for s, v in usable}

    stacked = np.concatenate([v[role[s] == TRAIN] for s, v in usable])
    mean = np.nanmean(stacked, axis=0)
    std = np.nanstd(stacked, axis=0)
    if np.isnan(mean).any():
        bad = [series.features[i] for i in np.flatnonzero(np.isnan(mean))]
        raise DataError(f"feature(s) {', '.join(bad)} have no values in the training part of the data")
    every = np.concatenate([v for _, v in usable])
    with np.errstate(invalid="ignore"):
        constant = np.nanmax(every, axis=0) == np.nanmin(every, axis=0)  # one value through all training rows
    if constant.any():
        log.info("feature(s) %s held one value all through the training rows: a change of one is scored as an "
                 "event, not by the model", ", ".join(f for f, c in zip(series.features, constant, strict=True) if c))
    # a spread of at least 0.1 % of the feature's magnitude: a nearly constant sensor does not turn its last
    # digit into a large error
    std = np.where(constant, 1.0, np.maximum(std, np.maximum(1e-3 * np.abs(mean), 1e-6))).astype(np.float32)
    mean = mean.astype(np.float32)
    # with stream_scale each stream is put on its own scale: a pump with another nominal speed or flow no longer
    # hides one sensor's noise in the fleet's spread
    own = {s: _own_scale(v[role[s] == TRAIN], mean, std, constant) for s, v in usable} if params.stream_scale else {}
    filled = {s: scale_and_fill(v, *own.get(s, (mean, std))) for s, v in usable}

    if init is None:
        model = LSTMAutoencoder(F, params.hidden_size, params.num_layers, W, forecast=params.forecast)
    else:
        have = (init.n_features, init.hidden_size, init.num_layers, init.window)
        if have != (F, params.hidden_size, params.num_layers, W):
            raise DataError(f"the starting model has features, hidden size, layers and window {have}; training "
                            f"needs {(F, params.hidden_size, params.num_layers, W)}")
        model = copy.deepcopy(init).train()
        if params.forecast and not model.forecasts:
            if params.epochs == 0:
                raise DataError("the starting model has no forecast head to calibrate: train with epochs > 0")
            model.next_head = torch.nn.Linear(params.hidden_size, F)
        elif not params.forecast:
            model.next_head = None
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    starts_pool = [(s, st, end) for s, _ in usable for st, end in _chunk_starts(role[s] == TRAIN, chunk_len, hop)]
    if not starts_pool:
        raise DataError(f"the training part is shorter than one chunk of {chunk_len} readings: "
                        f"use a smaller --window or more data")
    ends_in_chunk = torch.arange(W - 1, chunk_len, hop)

    noise = _noise_scale(np.concatenate([filled[s][0][role[s] == TRAIN] for s, _ in usable]))

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pick = rng.integers(0, len(starts_pool), params.batch_size)
        xs, ms = [], []
        for i in pick:
            s, st, end = starts_pool[i]
            x, m = filled[s]
            seg_x, seg_m = x[st:min(st + chunk_len, end)], m[st:min(st + chunk_len, end)]
            if len(seg_x) < chunk_len:  # a stream shorter than a chunk: left-pad by repeating its start
                need = chunk_len - len(seg_x)
                seg_x = np.concatenate([np.repeat(seg_x[:1], need, 0), seg_x])
                seg_m = np.concatenate([np.zeros((need, F), bool), seg_m])
            xs.append(seg_x)
            ms.append(seg_m)
        clean = np.stack(xs)
        noisy = _corrupt(clean, noise, rng, params.corrupt) if params.corrupt > 0 else clean
        return torch.from_numpy(noisy), torch.from_numpy(clean), torch.from_numpy(np.stack(ms))

    def loss_of(x_in: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        out, _ = model.encode(x_in, torch.full((len(x),), chunk_len), model.zero_state(len(x)))
        z = out[:, ends_in_chunk].reshape(-1, params.hidden_size)
        recon = model.decode(z).reshape(len(x), len(ends_in_chunk), W, F)
        idx = ends_in_chunk[:, None] - W + 1 + torch.arange(W)[None, :]
        target, tmask = x[:, idx], m[:, idx]
        loss = ((recon - target) ** 2 * tmask).sum() / tmask.sum().clamp(min=1)
        if model.forecasts:  # each reading from the encoder's output before it
            fmask = m[:, 1:]
            loss = loss + ((model.predict_next(out[:, :-1]) - x[:, 1:]) ** 2 * fmask).sum() / fmask.sum().clamp(min=1)
        return loss

    def validation() -> float:
        model.eval()
        tot, cnt, ftot, fcnt = 0.0, 0.0, 0.0, 0.0
        with torch.inference_mode():
            for s, _ in usable:
                x, m = (torch.from_numpy(a) for a in filled[s])
                ends, recon, out = _continuous(model, x, hop, W)
                sel = torch.from_numpy(role[s][ends.numpy()] == VAL)
                if not sel.any():
                    continue
                idx = ends[sel][:, None] - W + 1 + torch.arange(W)[None, :]
                tm = m[idx]
                tot += float((((recon[sel] - x[idx]) ** 2) * tm).sum())
                cnt += float(tm.sum())
                if model.forecasts:  # as in training: the forecast's mean squared error is added
                    fm = m & torch.from_numpy(role[s] == VAL)[:, None]
                    fm[0] = False
                    fe = torch.nan_to_num(_next_errors(model, out, x))
                    ftot += float((fe**2 * fm).sum())
                    fcnt += float(fm.sum())
        model.train()
        return tot / max(cnt, 1.0) + ftot / max(fcnt, 1.0)

    best, best_state, bad_epochs, history = math.inf, copy.deepcopy(model.state_dict()), 0, []
    per_step = params.batch_size * chunk_len  # readings the model is fed per step
    run = {"params": asdict(params), "data": fingerprint(series.features, series.streams, series.values)}
    first = 0
    if checkpoint is not None and resume:
        st = load_state(checkpoint, run)
        model.load_state_dict(st.model)
        opt.load_state_dict(st.optimizer)
        best, best_state, bad_epochs, history, first = st.best, st.best_model, st.bad_epochs, st.history, st.epoch
        rng.bit_generator.state = st.numpy_rng
        if st.torch_rng is not None:
            torch.set_rng_state(st.torch_rng)
        log.info("resuming training from %s after epoch %d of %d", checkpoint, first, params.epochs)
    live = progress and sys.stderr.isatty()
    per_epoch = params.steps_per_epoch * per_step
    bar = tqdm(total=params.epochs * per_epoch, initial=first * per_epoch, desc="train", unit="reading",
               unit_scale=True, disable=not live, leave=False)
    model.train()
    fed_s = 0.0
    for epoch in range(first, params.epochs):
        if bad_epochs >= params.patience:  # a resumed run that had already stopped early
            break
        t_epoch = time.monotonic()
        running = 0.0
        for _ in range(params.steps_per_epoch):
            loss = loss_of(*batch())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            running += loss.item()
            bar.update(per_step)
        val = validation()
        took = time.monotonic() - t_epoch
        fed_s += took
        rate = per_epoch / max(took, 1e-9)
        history.append({"epoch": epoch, "train_loss": running / params.steps_per_epoch, "val_loss": val,
                        "readings_per_s": round(rate)})
        bar.set_postfix(loss=f"{running / params.steps_per_epoch:.4f}", val=f"{val:.4f}")
        if val < best - 1e-5:
            best, best_state, bad_epochs = val, copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
        if progress and not live:
            left = (params.epochs - epoch - 1) * took
            log.info("train epoch %d/%d: loss %.4f, validation %.4f, %s readings/s, at most %s left%s", epoch + 1,
                     params.epochs, running / params.steps_per_epoch, val, f"{rate:,.0f}", _duration(left),
                     " (stopping early)" if bad_epochs >= params.patience else "")
        if checkpoint is not None:
            save_state(checkpoint, TrainState(epoch + 1, best, bad_epochs, history, model.state_dict(), best_state,
                                              opt.state_dict(), rng.bit_generator.state, torch.get_rng_state(), run))
        if bad_epochs >= params.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()

    const_t = torch.from_numpy(constant) if constant.any() else None
    rel, scales, drifting = (_fit_relations(usable, role, constant, params.hop if params.relation_tails else 0,
                                            own or None, params.relation_holdout)
                             if params.relations and F >= 2 else (None, {}, np.zeros(F, bool)))
    if drifting.any():
        log.info("feature(s) %s left their relation to the other sensors on the validation rows: they drift in normal "
                 "operation, are not scored by the relation score, and are the ones scoring.adapt_features: drifting "
                 "adapts", ", ".join(f for f, d in zip(series.features, drifting, strict=True) if d))
    if rel is not None and not bool(rel.use.any()):  # every sensor constant or drifting: no relation to score
        rel, scales = None, {}
    scales = own or scales
    # each stream's scale in the model's standardised units, where the calibration windows are (with stream_scale
    # the windows are on it already)
    rel_scales = {s: (torch.from_numpy((m - mean) / std).float(), torch.from_numpy(sd / std).float()) if not own
                  else (torch.zeros(F), torch.ones(F)) for s, (m, sd) in scales.items()}
    spec, cal_scores = _calibrate(model, usable, filled, role, W, hop, F, params.score_aggregate,
                                  params.error_scale, params.covariance, const_t, params.smooth_halflife,
                                  (rel, rel_scales) if rel is not None else None)
    levels = CALIBRATION_LEVELS
    values = np.quantile(cal_scores, levels).tolist() if len(cal_scores) else [1.0] * len(levels)
    spikes = params.spikes and W >= 2 * SPIKE_SIDE + 1  # a window must hold both sides of a reading
    if params.spikes and not spikes:
        log.info("no spike score: a window of %d readings cannot hold the %d readings on each side of one", W,
                 SPIKE_SIDE)
    spike_noise, spike_level = fit_spikes([filled[s] for s, _ in usable], constant) if spikes else ([], [])
    if spikes:
        named = zip(series.features, spike_level, strict=True)
        log.info("spike levels (noise spreads): %s",
                 ", ".join(f"{f} {lv:.1f}" if lv > 0 else f"{f} not scored" for f, lv in named))
    manifest = Manifest(
        features=list(series.features),
        scaler_mean=mean.tolist(),
        scaler_std=std.tolist(),
        window=W,
        hop=hop,
        hidden_size=params.hidden_size,
        num_layers=params.num_layers,
        error_mean=spec.err_mean.tolist(),
        error_std=spec.err_std.tolist(),
        covariance=params.covariance,
        error_precision=spec.precision.tolist() if spec.precision is not None else [],
        constant_features=[f for f, c in zip(series.features, constant, strict=True) if c],
        constant_z2=2.0 * float(cal_scores.max()) if len(cal_scores) and constant.any() else 0.0,
        smooth_halflife=params.smooth_halflife if spec.smooth_std is not None else 0.0,
        smooth_std=spec.smooth_std.tolist() if spec.smooth_std is not None else [],
        smooth_weight=spec.smooth_weight,
        relation_streams=list(scales),
        relation_mean=[m.tolist() for m, _ in scales.values()],
        relation_std=[sd.tolist() for _, sd in scales.values()],
        relation_lin=spec.relations.lin.tolist() if spec.relations is not None else [],
        relation_quad=spec.relations.quad.tolist() if spec.relations is not None else [],
        relation_bias=spec.relations.bias.tolist() if spec.relations is not None else [],
        relation_resid_std=spec.relations.resid_std.tolist() if spec.relations is not None else [],
        relation_use=spec.relations.use.tolist() if spec.relations is not None else [],
        relation_weight=spec.relations.weight if spec.relations is not None else 0.0,
        stream_scaled=bool(own),
        forecast_std=spec.forecast_std.tolist() if spec.forecast_std is not None else [],
        forecast_weight=spec.forecast_weight if spec.forecast_std is not None else 0.0,
        adapt_base=spec.adapt_base.tolist() if spec.adapt_base is not None else [],
        drifting_features=[f for f, d in zip(series.features, drifting, strict=True) if d],
        spike_noise=[float(v) for v in spike_noise],
        spike_level=[float(v) for v in spike_level],
        spike_weight=float(np.interp(0.999, levels, values)) if spikes and params.spike_score else 0.0,
        calibration_levels=list(levels),
        calibration_scores=values,
        score_aggregate=params.score_aggregate,
        longest_runs=longest_runs([v for _, v in usable]),  # what the stuck-sensor check must allow
        name=params.name,
        model_version=f"{params.name}-{int(time.time())}",
        training={
            "streams": len(usable),
            "readings": int(sum(len(v) for _, v in usable)),
            "epochs_run": len(history),
            "best_val_loss": best,
            "history": history,
            "calibration_windows": int(len(cal_scores)),
            "seconds": round(time.monotonic() - t0, 1),
            # readings fed to the model per second of training steps and validation, this run's epochs
            "readings_per_s": round(per_epoch * (len(history) - first) / fed_s) if fed_s > 0 else None,
            "resumed_after_epoch": first,
            "params": params.__dict__,
            "torch": torch.__version__,
            "detector_version": __version__,
        },
    )
    return model, manifest


def _calibrate(model: LSTMAutoencoder, usable: list[tuple[str, np.ndarray]],
               filled: dict[str, tuple[np.ndarray, np.ndarray]], role: dict[str, np.ndarray],
               W: int, hop: int, F: int, aggregate: str, error_scale: str,
               covariance: str = "diagonal", constant: torch.Tensor | None = None,
               smooth_halflife: float = 0.0,
               relations: tuple[Relations, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
               ) -> tuple[ScoreSpec, np.ndarray]:
    """Error statistics from the validation part (see ERROR_SCALES), then window scores on the rows after it.

    Under `input` no statistics are fitted, so the window scores come from the validation part as well: twice
    the rows for the calibration quantiles, none of them trained on. With covariance `full` the standardised
    errors' correlation is fitted on the validation part too. Each feature's error spread is at least 1 % of
    its training spread (ERROR_STD_FLOOR): a sensor the model rebuilds almost exactly does not turn a last
    digit into a large score. With a smoothed score, each stream's smoothed errors run over all its windows
    in order, as in the engine; their spread and the weight that puts the smoothed score's 0.99 quantile on the
    window score's come from the validation part, and the calibration scores are the larger of the two. With
    `relations` (the fitted relations and each stream's scale), the relation score's weight comes from the
    validation part the same way, and it competes for the calibration scores too. So does the forecast score of
    a model with a forecast head: its errors' spread and its weight come from the validation part.
    """
    errs, cal = [], []
    with torch.inference_mode():
        runs, next_err = [], []
        for s, _ in usable:
            x, m = (torch.from_numpy(a) for a in filled[s])
            seen = x if constant is None else x * ~constant
            ends, recon, out = _continuous(model, seen, hop, W)
            idx = ends[:, None] - W + 1 + torch.arange(W)[None, :]
            runs.append((s, ends, x[idx], recon, m[idx]))
            if model.forecasts:
                counted = m if constant is None else m & ~constant
                next_err.append(torch.where(counted, _next_errors(model, out, x), torch.nan))
        for s, ends, xw, recon, mw in runs:
            sel = torch.from_numpy(role[s][ends.numpy()] == VAL)
            e = (xw[sel] - recon[sel])[:, -hop:]
            errs.append(torch.where(mw[sel][:, -hop:], e, torch.nan).reshape(-1, F))
        e_all = torch.cat(errs).numpy() if errs else np.zeros((0, F), np.float32)
        err_mean, err_std = np.zeros(F), np.ones(F)
        if error_scale == "calibration" and len(e_all):
            err_mean = np.nan_to_num(np.nanmean(e_all, axis=0))
            err_std = np.nanstd(e_all, axis=0)
            err_std = np.where(np.isfinite(err_std), np.maximum(err_std, ERROR_STD_FLOOR), ERROR_STD_FLOOR)
        if constant is not None:
            err_mean, err_std = np.where(constant.numpy(), 0.0, err_mean), np.where(constant.numpy(), 1.0, err_std)
        precision = None
        if covariance == "full":
            z = (e_all - err_mean) / err_std
            if constant is not None:
                z[:, constant.numpy()] = 0.0
            precision = torch.tensor(precision_matrix(z), dtype=torch.float32)
        spec = ScoreSpec(torch.tensor(err_mean, dtype=torch.float32), torch.tensor(err_std, dtype=torch.float32),
                         aggregate, precision, constant, 0.0)
        scored_roles = (VAL, CAL) if error_scale == "input" else (CAL,)
        scored = [(s, ends, *score_windows(xw, recon, mw, spec, hop)) for s, ends, xw, recon, mw in runs]
        if error_scale == "input":  # the adaptation's level 1: what a validation window's features score
            pf = [pf.numpy()[role[s][ends.numpy()] == VAL] for s, ends, _, pf, *_ in scored]
            base = np.concatenate(pf).mean(axis=0) if sum(map(len, pf)) else np.ones(F)
            if constant is not None:  # no reconstruction error to adapt to: a change scores its bounded event
                base = np.where(constant.numpy(), 1.0, base)
            spec = replace(spec, adapt_base=torch.tensor(np.maximum(base, ERROR_STD_FLOOR**2), dtype=torch.float32))
        decay = smooth_decay(hop, smooth_halflife)
        smoothed = [_ewma(zmean.numpy(), decay) for *_, zmean in scored] if decay > 0 else []
        if smoothed:
            val = [(s, ends, score) for s, ends, score, *_ in scored]
            in_val = [torch.from_numpy(role[s][ends.numpy()] == VAL) for s, ends, _ in val]
            ew_val = np.concatenate([e[v.numpy()] for e, v in zip(smoothed, in_val, strict=True)])
            if len(ew_val) >= 2:
                sd = np.maximum(np.std(ew_val, axis=0), 1e-3)
                point = np.concatenate([sc.numpy()[v.numpy()] for (_, _, sc), v in zip(val, in_val, strict=True)])
                raw = ((ew_val / sd) ** 2).max(axis=1)
                weight = float(np.quantile(point, 0.99) / max(np.quantile(raw, 0.99), 1e-9))
                spec = replace(spec, smooth_decay=decay, smooth_std=torch.tensor(sd, dtype=torch.float32),
                               smooth_weight=weight)
        rel_raw: list[np.ndarray] = []
        if relations is not None:
            rel, scale = relations
            for s, _, xw, _, mw in runs:
                a, b = scale[s]
                rel_raw.append(relation_scores((xw[:, -hop:] - a) / b, mw[:, -hop:], rel)[0].numpy())
            where = [role[s][ends.numpy()] == VAL for s, ends, *_ in runs]
            point = np.concatenate([sc.numpy()[v] for (_, _, sc, *_), v in zip(scored, where, strict=True)])
            raw = np.concatenate([r[v] for r, v in zip(rel_raw, where, strict=True)])
            q = RELATION_MATCH
            weight = float(np.quantile(point, q) / max(np.quantile(raw, q), 1e-9)) if len(raw) >= 2 else 1.0
            spec = replace(spec, relations=replace(rel, weight=weight))
        fc_raw: list[np.ndarray] = []
        if next_err:
            fc_raw, spec = _forecast_weight(next_err, runs, scored, role, hop, spec)
        for i, (s, ends, score, *_) in enumerate(scored):
            sel = np.isin(role[s][ends.numpy()], scored_roles)
            if sel.any():
                sc = score.numpy()
                if spec.smooth_std is not None:
                    sc = np.maximum(sc, ((smoothed[i] / spec.smooth_std.numpy()) ** 2).max(axis=1) * spec.smooth_weight)
                if rel_raw and spec.relations is not None:
                    sc = np.maximum(sc, rel_raw[i] * spec.relations.weight)
                if fc_raw:
                    sc = np.maximum(sc, fc_raw[i] * spec.forecast_weight)
                cal.append(sc[sel])
    return spec, (np.concatenate(cal) if cal else np.zeros(0))


RELATION_MATCH = 0.999
"""The validation quantile at which the relation score (and the forecast score) is put on the model's window
score: the calibrated warning level's, so that both cross the warning level at the same rate on normal rows."""


def _forecast_weight(next_err: list[torch.Tensor], runs: list[tuple], scored: list[tuple], role: dict[str, np.ndarray],
                     hop: int, spec: ScoreSpec) -> tuple[list[np.ndarray], ScoreSpec]:
    """Each stream's raw forecast window scores, and `spec` with the forecast errors' spread (validation rows,
    floored at ERROR_STD_FLOOR) and the weight that puts the score's validation 0.999 quantile on the model's."""
    val_err = np.concatenate([e.numpy()[role[s] == VAL] for e, (s, *_) in zip(next_err, runs, strict=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature never counted (constant) has no spread
        sd = np.nanstd(val_err, axis=0) if len(val_err) else np.ones(next_err[0].shape[1])
    sd = np.where(np.isfinite(sd), np.maximum(sd, ERROR_STD_FLOOR), 1.0)
    std = torch.tensor(sd, dtype=torch.float32)
    raws = []
    for e, (_, ends, *_) in zip(next_err, runs, strict=True):
        idx = ends[:, None] - hop + 1 + torch.arange(hop)[None, :]
        raws.append(forecast_scores(forecast_z(torch.zeros(()), e, ~torch.isnan(e), std)[idx])[0].numpy())
    where = [role[s][ends.numpy()] == VAL for s, ends, *_ in runs]
    point = np.concatenate([sc.numpy()[v] for (_, _, sc, *_), v in zip(scored, where, strict=True)])
    raw = np.concatenate([r[v] for r, v in zip(raws, where, strict=True)])
    q = RELATION_MATCH
    weight = float(np.quantile(point, q) / max(np.quantile(raw, q), 1e-9)) if len(raw) >= 2 else 1.0
    # above 0 whatever the data: a weight of 0 would say "no forecast head" to the loader
    return raws, replace(spec, forecast_std=std, forecast_weight=max(weight, 1e-6))


def _fit_relations(usable: list[tuple[str, np.ndarray]], role: dict[str, np.ndarray], constant: np.ndarray,
                   tails_hop: int = 0, scales: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   holdout: float = 0.0) -> tuple[Relations, dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Each stream's scale over its trained-on rows (unless given), the relations fitted on those rows on that
    scale (with each sensor's tail evened over windows of `tails_hop` readings, when above 0; with `holdout` above
    0, scoring only the sensors whose relation holds on the validation rows to that rms, relations.holding), and
    which sensors that holdout stopped scoring (F,): the ones that drift in normal operation."""
    scales = scales or {s: stream_scales(v[role[s] == TRAIN]) for s, v in usable}
    blocks = [(v[role[s] == TRAIN] - scales[s][0]) / scales[s][1] for s, v in usable]
    rel = fit_relations(np.concatenate(blocks), constant)
    rel = even_tails(rel, blocks, tails_hop) if tails_hop > 0 else rel
    fitted = rel.use.numpy().copy()
    if holdout > 0:
        rel = holding(rel, [(v[role[s] == VAL] - scales[s][0]) / scales[s][1] for s, v in usable], holdout)
    return rel, scales, fitted & ~rel.use.numpy()


def _own_scale(rows: np.ndarray, mean: np.ndarray, std: np.ndarray,
               constant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One stream's mean and spread over its trained-on rows (relations.stream_scales), float32; the fleet's
    `mean` and `std` for a feature the stream never had a value of, or one constant in all training."""
    m, sd = stream_scales(rows)
    seen = ~np.isnan(rows).all(axis=0) & ~constant if len(rows) else np.zeros(len(mean), bool)
    return np.where(seen, m, mean).astype(np.float32), np.where(seen, sd, std).astype(np.float32)


def _duration(seconds: float) -> str:
    """A plain duration: 45 s, 12 min, 2.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def holdout_roles(n: int, params: TrainParams, chunk_len: int) -> np.ndarray:
    """Each of a stream's n training rows as TRAIN, VAL or CAL: `params.holdout_blocks` cycles through the span.

    Each cycle is trained on for its first 1 - val_fraction - cal_fraction, then held back for validation
    (early stopping, error statistics), then for calibration (window scores). Spread over the whole span, the
    held-back rows see what the trained-on rows see (a warm-up at the start, a drift through the run), so
    the calibrated levels fit the whole training period, not only its end. Fewer cycles are used where a
    cycle's trained part would be shorter than one training chunk; one cycle is the plain split in time.

    >>> p = TrainParams(holdout_blocks=2, val_fraction=0.2, cal_fraction=0.2)
    >>> "".join("tvc"[r] for r in holdout_roles(20, p, chunk_len=4))
    'ttttttvvccttttttvvcc'
    """
    train_share = 1.0 - params.val_fraction - params.cal_fraction
    cycles = max(1, min(params.holdout_blocks, int(n * train_share // max(chunk_len, 1))))
    edges = np.linspace(0, n, cycles + 1)
    role = np.full(n, TRAIN, np.int8)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        t = int(round(a + (b - a) * train_share))
        v = int(round(a + (b - a) * (1.0 - params.cal_fraction)))
        role[t:v], role[v:int(round(b))] = VAL, CAL
    return role


def _chunk_starts(train: np.ndarray, chunk_len: int, hop: int) -> list[tuple[int, int]]:
    """(start, end of its run) of every training chunk inside the runs of trained-on rows, every `hop` rows; a
    stream whose runs are all shorter than a chunk gives its longest run once (the chunk is padded)."""
    edges = np.flatnonzero(np.diff(np.r_[0, train.astype(np.int8), 0]))
    runs = list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    out = [(st, b) for a, b in runs for st in range(a, b - chunk_len + 1, hop)]
    if not out and runs:
        a, b = max(runs, key=lambda r: r[1] - r[0])
        out = [(a, b)]
    return out


def _ewma(zmean: np.ndarray, decay: float) -> np.ndarray:
    """The smoothed errors (K, F) after each of one stream's windows in order, from zero (score.smooth_update)."""
    out = np.empty_like(zmean)
    acc = np.zeros(zmean.shape[1], zmean.dtype)
    for k in range(len(zmean)):
        acc = decay * acc + (1.0 - decay) * zmean[k]
        out[k] = acc
    return out
