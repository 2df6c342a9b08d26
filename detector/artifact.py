"""The trained-model folder: safetensors weights plus a JSON manifest, loaded without unpickling anything."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from detector import __version__
from detector.errors import ModelError
from detector.model import LSTMAutoencoder
from detector.score import AGGREGATES, COVARIANCES

__all__ = ["Manifest", "Artifact", "save_artifact", "load_artifact", "check_features", "check_shadow", "FORMAT_VERSION"]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild and use a model, besides its weights."""

    features: list[str]
    scaler_mean: list[float]
    scaler_std: list[float]
    window: int
    hop: int
    hidden_size: int
    num_layers: int
    error_mean: list[float]
    error_std: list[float]
    calibration_levels: list[float]
    calibration_scores: list[float]
    name: str = "default"
    model_version: str = ""
    format_version: int = FORMAT_VERSION
    detector_version: str = __version__
    training: dict[str, Any] = field(default_factory=dict)
    score_aggregate: str = "max"  # one of score.AGGREGATES; the calibration scores were computed with it
    # per feature, the longest run of equal consecutive values in the training rows (-1: held at one value all
    # through a stream's rows); the stuck-sensor check allows twice that (sensors.longest_runs); [] for older models
    longest_runs: list[int] = field(default_factory=list)
    # how a reading's error vector becomes one number (score.COVARIANCES); with "full", error_precision holds
    # the inverse correlation (F x F) of the standardised calibration errors
    covariance: str = "diagonal"
    error_precision: list[list[float]] = field(default_factory=list)
    # features held at one value all through the training rows: the model sees them at that value, and each
    # reading where one changes scores constant_z2 (twice the largest calibration window score)
    constant_features: list[str] = field(default_factory=list)
    constant_z2: float = 0.0
    # the smoothed score (score.smooth_update): half-life in readings (0: off), the smoothed errors' spread in
    # calibration (F) and the weight that puts its 0.99 calibration quantile on the window score's
    smooth_halflife: float = 0.0
    smooth_std: list[float] = field(default_factory=list)
    smooth_weight: float = 1.0
    # the cross-sensor relation score (detector.relations): each training stream's per-feature mean and spread
    # (streams x F), the fitted predictions (F x F linear and square terms, F biases), the residuals' spread,
    # which sensors are scored, and the weight (0: off)
    relation_streams: list[str] = field(default_factory=list)
    relation_mean: list[list[float]] = field(default_factory=list)
    relation_std: list[list[float]] = field(default_factory=list)
    relation_lin: list[list[float]] = field(default_factory=list)
    relation_quad: list[list[float]] = field(default_factory=list)
    relation_bias: list[float] = field(default_factory=list)
    relation_resid_std: list[float] = field(default_factory=list)
    relation_use: list[bool] = field(default_factory=list)
    relation_weight: float = 0.0
    # trained with --stream-scale: the model's input is each training stream on its own scale (relation_mean and
    # relation_std of relation_streams; other streams on the scaler's)
    stream_scaled: bool = False
    # the forecast score (detector.forecast): each feature's next-reading forecast error spread on the
    # validation rows, and the weight (0: off; the weights then hold no forecast head)
    forecast_std: list[float] = field(default_factory=list)
    forecast_weight: float = 0.0
    # per feature, the mean per-feature window score on the validation rows where errors are in the input's units
    # (train --error-scale input): the level the adaptation starts from (empty: 1, the validation spread's)
    adapt_base: list[float] = field(default_factory=list)
    # features whose relation to the other sensors did not hold on the validation rows (train --relation-holdout):
    # they drift in normal operation; scoring.adapt_features: drifting adapts only these
    drifting_features: list[str] = field(default_factory=list)
    # the spike score (detector.spikes): each feature's noise spread in the model's input units and the excursion
    # in noise spreads that makes a spike (0: the feature is not scored); both empty: no spike score
    spike_noise: list[float] = field(default_factory=list)
    spike_level: list[float] = field(default_factory=list)
    # > 0: the spike score also enters the window score as (excursion / level)^2 x this (the calibrated 0.999
    # window score); 0: spikes only raise at once
    spike_weight: float = 0.0

    def quantile(self, q: float) -> float:
        """The calibrated window score at quantile q (interpolated between the stored levels)."""
        return float(np.interp(q, self.calibration_levels, self.calibration_scores))


@dataclass(frozen=True)
class Artifact:
    """A loaded model folder: the module in eval mode and its manifest."""

    model: LSTMAutoencoder
    manifest: Manifest
    path: Path


def save_artifact(path: str | Path, model: LSTMAutoencoder, manifest: Manifest) -> Path:
    """Write the weights (safetensors) and manifest (JSON) into folder `path`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    (out / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n", encoding="utf-8")
    return out


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Load a model folder; raise ModelError naming what is missing or inconsistent."""
    folder = Path(path)
    mpath, wpath = folder / MANIFEST, folder / WEIGHTS
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder not found (train one with `detector train --out {folder}`)")
    for p in (mpath, wpath):
        if not p.is_file():
            raise ModelError(f"{p}: missing from the model folder (expected {MANIFEST} and {WEIGHTS})")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{mpath}: not a readable JSON manifest ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{mpath}: manifest must be a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{mpath}: format_version {raw.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    known = set(Manifest.__dataclass_fields__)
    try:
        manifest = Manifest(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise ModelError(f"{mpath}: incomplete manifest ({exc})") from None
    if manifest.longest_runs and len(manifest.longest_runs) != len(manifest.features):
        raise ModelError(f"{mpath}: longest_runs has {len(manifest.longest_runs)} entries for "
                         f"{len(manifest.features)} features")
    if manifest.covariance not in COVARIANCES:
        raise ModelError(f"{mpath}: covariance {manifest.covariance!r} is not one of {', '.join(COVARIANCES)}")
    F = len(manifest.features)
    if manifest.covariance == "full" and np.shape(manifest.error_precision) != (F, F):
        raise ModelError(f"{mpath}: error_precision must be a {F} x {F} matrix with covariance full")
    if not set(manifest.constant_features) <= set(manifest.features):
        raise ModelError(f"{mpath}: constant_features names features the model does not have")
    if not set(manifest.drifting_features) <= set(manifest.features):
        raise ModelError(f"{mpath}: drifting_features names features the model does not have")
    if manifest.relation_weight > 0 and (
            np.shape(manifest.relation_lin) != (F, F) or np.shape(manifest.relation_quad) != (F, F)
            or np.shape(manifest.relation_bias) != (F,) or np.shape(manifest.relation_resid_std) != (F,)
            or np.shape(manifest.relation_use) != (F,)
            or np.shape(manifest.relation_mean) != (len(manifest.relation_streams), F)
            or np.shape(manifest.relation_std) != (len(manifest.relation_streams), F)):
        raise ModelError(f"{mpath}: the relation_* fields must hold {F} x {F} predictions, {F} biases, spreads and "
                         f"flags, and a mean and spread of {F} features for each of relation_streams")
    if manifest.stream_scaled and (
            np.shape(manifest.relation_mean) != (len(manifest.relation_streams), F)
            or np.shape(manifest.relation_std) != (len(manifest.relation_streams), F)):
        raise ModelError(f"{mpath}: stream_scaled needs relation_mean and relation_std of {F} features for each of "
                         f"relation_streams")
    if manifest.forecast_weight > 0 and np.shape(manifest.forecast_std) != (F,):
        raise ModelError(f"{mpath}: forecast_std must hold {F} spreads when forecast_weight is above 0")
    if (manifest.spike_noise or manifest.spike_level) and (
            np.shape(manifest.spike_noise) != (F,) or np.shape(manifest.spike_level) != (F,)):
        raise ModelError(f"{mpath}: spike_noise and spike_level must each hold {F} values (or both be empty)")
    if manifest.score_aggregate not in AGGREGATES:
        raise ModelError(f"{mpath}: score_aggregate {manifest.score_aggregate!r} is not one of {', '.join(AGGREGATES)}")
    model = LSTMAutoencoder(len(manifest.features), manifest.hidden_size, manifest.num_layers, manifest.window,
                            forecast=manifest.forecast_weight > 0)
    try:
        state = load_file(str(wpath), device="cpu")
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors raises its own error types; all mean a bad weights file
        raise ModelError(f"{wpath}: weights do not fit the manifest ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    return Artifact(model=model, manifest=manifest, path=folder)


def check_features(artifact: Artifact, expected: list[str] | None) -> None:
    """Raise ModelError unless the model's features are `expected`, in order (None expects nothing)."""
    have = artifact.manifest.features
    if expected is not None and list(expected) != list(have):
        raise ModelError(
            f"{artifact.path}: the model's features are {','.join(have)} but model.features asks for "
            f"{','.join(expected)} (point model.path at a model trained on those features, or fix model.features)"
        )


def check_shadow(shadow: Artifact, live: Artifact) -> None:
    """Raise ModelError unless the shadow model (model.shadow) has the live model's features, in order."""
    if list(shadow.manifest.features) != list(live.manifest.features):
        raise ModelError(
            f"{shadow.path}: model.shadow has the features {','.join(shadow.manifest.features)} but the live model "
            f"{live.path} has {','.join(live.manifest.features)}: a shadow must score the same readings "
            f"(train it on the same features)")
