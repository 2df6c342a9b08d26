"""Window scores from reconstruction errors: normalised against calibration statistics, with feature shares."""

from __future__ import annotations

import torch

__all__ = ["score_windows", "AGGREGATES"]

AGGREGATES = ("max", "mean")
"""How a window's normalised errors become one score: the largest, or the mean over readings and features."""


def score_windows(
    x: torch.Tensor,
    recon: torch.Tensor,
    mask: torch.Tensor,
    err_mean: torch.Tensor,
    err_std: torch.Tensor,
    tail: int,
    aggregate: str = "max",
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score K windows (K, W, F) on their newest `tail` readings.

    The error of each reading and feature is standardised by the calibration mean and spread of the error
    (a Mahalanobis distance with diagonal covariance). Only the newest `tail` readings are scored, so each
    reading is scored exactly once, in the context of its whole window. The window score is the largest
    squared standardised error among their present values (`max`: a fault in one sensor for one reading
    counts in full) or their mean (`mean`: diluted across readings and sensors). Returns (score (K,),
    per-feature score (K, F), share (K, F) summing to 1, direction (K, F): +1 where readings were above
    what the model expected, -1 below). `scale` (K, F), when given, divides each feature's squared errors:
    the engine's per-stream adaptation to a feature that runs noisier than in calibration.

    >>> x = torch.zeros(1, 4, 2); x[0, -1, 1] = 3.0
    >>> s, pf, share, d = score_windows(x, torch.zeros_like(x), torch.ones_like(x, dtype=torch.bool),
    ...                                 torch.zeros(2), torch.ones(2), tail=2)
    >>> round(float(s[0]), 2), [round(float(v), 2) for v in share[0]], d[0].tolist()
    (9.0, [0.0, 1.0], [0.0, 1.0])
    >>> round(float(score_windows(x, torch.zeros_like(x), torch.ones_like(x, dtype=torch.bool),
    ...                           torch.zeros(2), torch.ones(2), tail=2, aggregate="mean")[0][0]), 2)
    2.25
    """
    err = (x - recon)[:, -tail:]
    m = mask[:, -tail:]
    z2 = torch.where(m, ((err - err_mean) / err_std) ** 2, 0.0)
    if scale is not None:
        z2 = z2 / scale[:, None, :]
    per_feature_sum = z2.sum(dim=1)
    if aggregate == "max":
        score = z2.amax(dim=(1, 2))
    else:
        score = per_feature_sum.sum(dim=1) / m.sum(dim=(1, 2)).clamp(min=1)
    per_feature = per_feature_sum / m.sum(dim=1).clamp(min=1)
    share = per_feature_sum / per_feature_sum.sum(dim=1, keepdim=True).clamp(min=1e-12)
    direction = torch.sign(torch.where(m, err, 0.0).sum(dim=1))
    return score, per_feature, share, direction
