"""Window scores from reconstruction errors: normalised against calibration statistics, with feature shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from detector.relations import Relations

__all__ = ["score_windows", "smooth_decay", "smooth_update", "smooth_score", "ScoreSpec", "AGGREGATES", "COVARIANCES",
           "precision_matrix"]

AGGREGATES = ("max", "mean")
"""How a window's normalised errors become one score: the largest, or the mean over readings and features."""

COVARIANCES = ("diagonal", "full")
"""How a reading's standardised error vector becomes one number: the sum of its squares (`diagonal`, each
sensor alone), or its Mahalanobis distance under the errors' correlation in calibration (`full`, EncDec-AD):
errors that normal operation makes together (a load change every sensor lags behind) count less, an error
that breaks the sensors' usual relation counts more."""

SHRINK = 0.1
"""Shrinkage of the calibration errors' correlation towards the identity before it is inverted (Ledoit-Wolf
style, fixed): a few hundred calibration readings do not pin down every off-diagonal term."""


@dataclass(frozen=True)
class ScoreSpec:
    """What turns reconstruction errors into scores: the calibration statistics and the options of the model.

    err_mean, err_std: (F,) each feature's error mean and spread in calibration; precision: (F, F) inverse
    correlation of the standardised errors (None: diagonal); constant: (F,) features held at one value all
    through training, scored by `constant_z2` at each reading where they change (None: no such feature).
    smooth_decay: per window, how much of a stream's smoothed error it keeps (0: no smoothed score; see
    `smooth_update`); smooth_std: (F,) the smoothed errors' spread in calibration; smooth_weight: what the
    smoothed score is multiplied by before it competes with the window's own score. relations: the cross-sensor
    relation score beside the model's (None: off; detector.relations). forecast_std: (F,) the next-reading
    forecast errors' spread on the validation rows (None: no forecast score; detector.forecast);
    forecast_weight: what the forecast score is multiplied by. adapt_base: (F,) each feature's mean per-feature
    score on the validation windows, the level the per-stream adaptation starts from (None: 1, as where errors
    are standardised by their validation spread). spike_noise, spike_level: (F,) the spike score's noise spreads
    and levels (None: no spike score; detector.spikes); spike_weight: above 0, the window score is at least
    (excursion / level)^2 x it.
    """

    err_mean: torch.Tensor
    err_std: torch.Tensor
    aggregate: str = "max"
    precision: torch.Tensor | None = None
    constant: torch.Tensor | None = None
    constant_z2: float = 0.0
    smooth_decay: float = 0.0
    smooth_std: torch.Tensor | None = None
    smooth_weight: float = 1.0
    relations: Relations | None = None
    forecast_std: torch.Tensor | None = None
    forecast_weight: float = 1.0
    adapt_base: torch.Tensor | None = None
    spike_noise: torch.Tensor | None = None
    spike_level: torch.Tensor | None = None
    spike_weight: float = 0.0

    @staticmethod
    def diagonal(err_mean: torch.Tensor, err_std: torch.Tensor, aggregate: str = "max") -> ScoreSpec:
        """A spec with per-feature statistics only (no covariance, no constant features)."""
        return ScoreSpec(err_mean, err_std, aggregate)


def precision_matrix(z: np.ndarray, shrink: float = SHRINK) -> np.ndarray:
    """The inverse of the shrunk correlation of standardised errors z (N, F), NaN where missing.

    >>> z = np.random.default_rng(0).standard_normal((500, 2)); z[:, 1] = z[:, 0] + 0.1 * z[:, 1]
    >>> p = precision_matrix(z)
    >>> bool(p[0, 1] < 0), p.shape
    (True, (2, 2))
    """
    ok = ~np.isnan(z).any(axis=1)
    F = z.shape[1]
    if ok.sum() < 2 * F + 2:
        return np.eye(F)
    with np.errstate(invalid="ignore", divide="ignore"):  # a feature without spread correlates with nothing
        c = np.corrcoef(z[ok], rowvar=False)
    c = np.where(np.isfinite(c), c, 0.0)
    np.fill_diagonal(c, 1.0)
    return np.linalg.inv((1 - shrink) * c + shrink * np.eye(F))


def score_windows(
    x: torch.Tensor,
    recon: torch.Tensor,
    mask: torch.Tensor,
    spec: ScoreSpec,
    tail: int,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score K windows (K, W, F) on their newest `tail` readings.

    The error of each reading and feature is standardised by the calibration mean and spread of the error.
    Only the newest `tail` readings are scored, so each reading is scored exactly once, in the context of its
    whole window. With diagonal covariance the window score is the largest squared standardised error among
    their present values (`max`: a fault in one sensor for one reading counts in full) or their mean (`mean`:
    diluted across readings and sensors); with `spec.precision` it is the largest Mahalanobis distance of a
    reading's error vector under the calibration errors' correlation (`max`), or their mean per value.
    A feature constant in training is not scored by its error: each reading where it changes adds
    `spec.constant_z2` (a bounded, attributed event; the model never learnt its variation). Returns
    (score (K,), per-feature score (K, F), share (K, F) summing to 1, direction (K, F): +1 where readings were
    above what the model expected, -1 below, and zmean (K, F): each feature's mean standardised error over the
    scored readings, 0 where it had none, for `smooth_update`). `scale` (K, F), when given, divides each
    feature's squared errors: the engine's per-stream adaptation to a feature that runs noisier than in
    calibration.

    >>> x = torch.zeros(1, 4, 2); x[0, -1, 1] = 3.0
    >>> spec = ScoreSpec.diagonal(torch.zeros(2), torch.ones(2))
    >>> s, pf, share, d, zm = score_windows(x, torch.zeros_like(x), torch.ones_like(x, dtype=torch.bool), spec, 2)
    >>> round(float(s[0]), 2), [round(float(v), 2) for v in share[0]], d[0].tolist()
    (9.0, [0.0, 1.0], [0.0, 1.0])
    >>> mean = ScoreSpec.diagonal(torch.zeros(2), torch.ones(2), "mean")
    >>> round(float(score_windows(x, torch.zeros_like(x), torch.ones_like(x, dtype=torch.bool), mean, 2)[0][0]), 2)
    2.25
    """
    err = (x - recon)[:, -tail:]
    m = mask[:, -tail:]
    z = torch.where(m, (err - spec.err_mean) / spec.err_std, 0.0)
    if scale is not None:
        z = z / scale[:, None, :].sqrt()
    if spec.constant is not None:
        prev = x[:, -tail - 1:-1] if tail < x.shape[1] else torch.cat([x[:, :1], x[:, :-1]], dim=1)
        changed = m & ((x[:, -tail:] - prev).abs() > 1e-6) & spec.constant
        z = torch.where(spec.constant, 0.0, z)
    z2 = z**2
    if spec.precision is not None:
        contrib = z * torch.einsum("kwf,fg->kwg", z, spec.precision)  # sums to the Mahalanobis distance
    else:
        contrib = z2
    if spec.constant is not None:
        contrib = torch.where(changed, spec.constant_z2, contrib)
        z2 = torch.where(changed, spec.constant_z2, z2)
    if spec.aggregate == "max":  # diagonal: the largest single squared error; full: the largest distance
        score = (contrib.sum(dim=2).clamp(min=0.0) if spec.precision is not None else contrib).flatten(1).amax(dim=1)
    else:
        score = contrib.sum(dim=(1, 2)).clamp(min=0.0) / m.sum(dim=(1, 2)).clamp(min=1)
    per_feature = z2.sum(dim=1) / m.sum(dim=1).clamp(min=1)
    pos = contrib.clamp(min=0.0).sum(dim=1)
    share = pos / pos.sum(dim=1, keepdim=True).clamp(min=1e-12)
    direction = torch.sign(torch.where(m, err, 0.0).sum(dim=1))
    zmean = z.sum(dim=1) / m.sum(dim=1).clamp(min=1)
    return score, per_feature, share, direction, zmean


def smooth_decay(hop: int, halflife: float) -> float:
    """The share of the smoothed error a window keeps, for windows every `hop` readings and a half-life in readings.

    >>> smooth_decay(8, 8.0)
    0.5
    """
    return 0.5 ** (hop / halflife) if halflife > 0 else 0.0


def smooth_update(ewma: torch.Tensor, zmean: torch.Tensor, decay: float) -> torch.Tensor:
    """The smoothed standardised error (K, F) after one more window: an exponentially weighted mean.

    A fault that moves a sensor by less than its noise per reading, but for many readings (a level shift the
    model half follows, a slow drift), stands out in the smoothed error long before single readings do.

    >>> smooth_update(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 2.0]]), 0.5).tolist()
    [[2.0, 1.0]]
    """
    return decay * ewma + (1.0 - decay) * zmean


def smooth_score(ewma: torch.Tensor, spec: ScoreSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The smoothed score of windows (K,): the largest squared smoothed error in units of its calibration
    spread, times `spec.smooth_weight`; and each feature's part of it (K, F)."""
    assert spec.smooth_std is not None
    part = (ewma / spec.smooth_std) ** 2 * spec.smooth_weight
    return part.amax(dim=1), part
