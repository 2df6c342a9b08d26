"""Cross-sensor relations: each sensor predicted from the others in the same reading, on per-stream scales.

An autoencoder that sees a sensor rebuilds that sensor's shifted level (it learnt to pass levels through),
so a sensor that jumps to a new level and stays there shows only at the jump. A prediction of the sensor
from the *other* sensors does not see the shift: the residual stays as long as the shift does (MSET and
PCA-Q detectors work on the same idea). Fleets of unlike machines (a pump with another nominal speed or
flow) share their physics only after each stream is put on its own scale, so every stream's readings are
first standardised by that stream's mean and spread over its training rows; streams not in the training
data get no relation score (the model's own score still covers them).

The prediction of sensor i is linear in the other sensors and their squares (affinity laws: pressure goes
with speed squared), fitted by ridge regression over every training stream's standardised readings; the
residual is divided by its spread in training, so normal readings give z about N(0, 1). A window's relation
score is the largest, over sensors, mean z^2 over the window's newest `hop` readings, times a weight that
puts its 0.999 quantile on the validation rows on the model's window score's (train.RELATION_MATCH), so
that both cross the calibrated warning level about as often on normal rows. A reading with a sensor missing
adds nothing (the held value would break the others' predictions).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

__all__ = ["Relations", "fit_relations", "even_tails", "stream_scales", "relation_z", "relation_scores", "Z_CAP"]

RIDGE = 1e-3
"""Ridge penalty of each regression, relative to the standardised predictors' unit spread."""

RESID_FLOOR = 1e-3
"""Smallest residual spread, in units of the stream's spread: a sensor predicted almost exactly by another
does not turn its last digit into a large z."""

Z_CAP = 100.0
"""Largest |z| of one reading: a sensor held at one value in training that moves scores a bounded event."""


@dataclass(frozen=True)
class Relations:
    """The fitted relations: per sensor i, prediction bias[i] + lin[i] @ u + quad[i] @ u^2 (diagonals zero).

    resid_std: (F,) the residuals' spread in training; use: (F,) bool, sensors scored (not constant, F >= 2);
    weight: what a window's raw relation score is multiplied by.
    """

    lin: torch.Tensor
    quad: torch.Tensor
    bias: torch.Tensor
    resid_std: torch.Tensor
    use: torch.Tensor
    weight: float = 1.0


def stream_scales(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One stream's per-feature mean and spread over its rows (N, F), NaN where missing; floored spreads.

    >>> m, s = stream_scales(np.array([[1.0, 5.0], [3.0, 5.0], [np.nan, 5.0]]))
    >>> m.tolist(), s.tolist()
    ([2.0, 5.0], [1.0, 0.005])
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature with no value in this stream
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
    mean = np.nan_to_num(mean)
    std = np.nan_to_num(std)
    return mean, np.maximum(std, np.maximum(1e-3 * np.abs(mean), 1e-6))


def _design(u: np.ndarray, i: int) -> np.ndarray:
    """Predictors of sensor i: the other sensors, their squares, and a constant."""
    other = np.delete(u, i, axis=1)
    return np.concatenate([other, other**2, np.ones((len(u), 1))], axis=1)


def fit_relations(u: np.ndarray, constant: np.ndarray | None = None) -> Relations:
    """Fit every sensor's prediction from the others on standardised readings u (N, F), NaN where missing.

    Rows with a missing value are left out. A sensor constant in training, or a model of one sensor, is not
    scored (use False); a constant sensor predicts nothing.

    >>> rng = np.random.default_rng(0)
    >>> a = rng.standard_normal(2000)
    >>> u = np.stack([a, a + 0.1 * rng.standard_normal(2000), a**2 + 0.1 * rng.standard_normal(2000)], 1)
    >>> r = fit_relations(u)
    >>> [round(float(s), 2) for s in r.resid_std], r.use.tolist()
    ([0.1, 0.1, 0.1], [True, True, True])
    """
    N, F = u.shape
    use = np.ones(F, bool) if constant is None else ~np.asarray(constant, bool)
    if F < 2:
        use[:] = False
    lin, quad, bias, resid = np.zeros((F, F)), np.zeros((F, F)), np.zeros(F), np.ones(F)
    rows = u[~np.isnan(u).any(axis=1)]
    if len(rows) < 4 * F:
        use[:] = False
    for i in np.flatnonzero(use):
        others = np.flatnonzero(np.arange(F) != i)
        X, y = _design(rows, i), rows[:, i]
        coef = np.linalg.solve(X.T @ X + RIDGE * len(X) * np.eye(X.shape[1]), X.T @ y)
        keep = use[others]
        lin[i, others] = np.where(keep, coef[: F - 1], 0.0)
        quad[i, others] = np.where(keep, coef[F - 1 : 2 * (F - 1)], 0.0)
        bias[i] = coef[-1]
        pred = bias[i] + rows @ lin[i] + rows**2 @ quad[i]
        resid[i] = max(float(np.std(y - pred)), RESID_FLOOR)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return Relations(as_t(lin), as_t(quad), as_t(bias), as_t(resid), torch.tensor(use))


TAIL_QUANTILE = 0.999
"""The quantile of each sensor's window part (mean z^2 over `hop` readings) on the fitted rows that `even_tails`
brings to the sensors' median."""


def even_tails(rel: Relations, blocks: list[np.ndarray], hop: int) -> Relations:
    """`rel` with each scored sensor's residual spread widened or narrowed so that its window parts' tail on the
    fitted rows `blocks` (per stream, (N_s, F) standardised, NaN where missing) is the scored sensors' median.

    A sensor whose residual has heavy tails in normal operation (a temperature that lags a load change its
    prediction follows at once) otherwise sets the level that every sensor must pass, and a sensor whose
    relation holds tightly (a vibration, a voltage) hides a fault below that level.

    >>> rng = np.random.default_rng(1)
    >>> a = rng.standard_normal(4000)
    >>> wide = 1 + 9 * (rng.random(4000) < 0.02)  # sensor 1's residual: 2 % of readings ten times as wide
    >>> u = np.stack([a + 0.1 * rng.standard_normal(4000), a + 0.1 * rng.standard_normal(4000) * wide], 1)
    >>> r = even_tails(fit_relations(u), [u], 8)
    >>> bool(r.resid_std[1] > r.resid_std[0])
    True
    """
    use = rel.use.numpy()
    parts = []
    with torch.inference_mode():
        for u in blocks:
            n = len(u) // hop * hop
            if n == 0:
                continue
            x = torch.from_numpy(np.nan_to_num(u[:n])).float().reshape(-1, hop, u.shape[1])
            present = torch.from_numpy(~np.isnan(u[:n])).reshape(-1, hop, u.shape[1])
            parts.append(relation_scores(x, present, rel)[1].numpy())
    if not parts or use.sum() < 2:
        return rel
    tail = np.quantile(np.concatenate(parts)[:, use], TAIL_QUANTILE, axis=0)
    if not np.all(tail > 0):
        return rel
    factor = np.ones(len(use))
    factor[use] = np.sqrt(tail / np.median(tail))
    return replace(rel, resid_std=rel.resid_std * torch.tensor(factor, dtype=torch.float32))


def holding(rel: Relations, blocks: list[np.ndarray], bound: float) -> Relations:
    """`rel` scoring only the sensors whose relation holds on rows it was not fitted on: the rms of the residual on
    `blocks` (per stream, (N_s, F) standardised, NaN where missing; rows later in time than the fitted ones), in
    units of the fitted spread, at most `bound`. The others still predict; they are no longer scored.

    A sensor that drifts away from what the others predict within the training period itself (a temperature
    that follows the weather, not the machine) would otherwise score its drift as a broken relation.

    >>> rng = np.random.default_rng(2)
    >>> a = rng.standard_normal(3000)
    >>> u = np.stack([a + 0.05 * rng.standard_normal(3000), a + 0.05 * rng.standard_normal(3000),
    ...               a + 0.5 * rng.standard_normal(3000)], 1)  # 0 and 1 tightly related, 2 loosely
    >>> holding(fit_relations(u[:2000]), [u[2000:]], 1.5).use.tolist()
    [True, True, True]
    >>> later = u[2000:].copy(); later[:, 2] += np.linspace(0, 2, 1000)  # sensor 2 walks off later
    >>> holding(fit_relations(u[:2000]), [later], 1.5).use.tolist()
    [True, True, False]
    """
    rows = [u[~np.isnan(u).any(axis=1)] for u in blocks]
    rows = np.concatenate(rows) if rows else np.zeros((0, len(rel.use)))
    if len(rows) < 2:
        return rel
    with torch.inference_mode():
        z = relation_z(torch.from_numpy(rows).float(), rel).numpy()
    rms = np.sqrt(np.mean(z**2, axis=0))
    return replace(rel, use=rel.use & torch.from_numpy(rms <= bound))


def relation_z(u: torch.Tensor, rel: Relations) -> torch.Tensor:
    """Each sensor's residual against its prediction from the others, in training spreads, (..., F); 0 where
    not scored, |z| at most Z_CAP."""
    pred = rel.bias + u @ rel.lin.T + (u * u) @ rel.quad.T
    z = (u - pred) / rel.resid_std
    return torch.where(rel.use, z.clamp(-Z_CAP, Z_CAP), 0.0)


def relation_scores(u: torch.Tensor, present: torch.Tensor,
                    rel: Relations) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw window scores (K,) (before `rel.weight`), per-sensor mean z^2 (K, F) and mean z (K, F: its sign is the
    direction) of windows' newest readings.

    u: (K, n, F) standardised readings (missing ones held at the last value), present: (K, n, F) bool; only
    readings with every scored sensor present count.
    """
    z = relation_z(u, rel)
    # a reading with a sensor missing (a gap, or a stuck value the sensor gate masked) has no whole relation to
    # check: the held value would break the others' predictions, so none of its residuals count
    whole = (present | ~rel.use).all(dim=-1, keepdim=True)
    m = present & rel.use & whole
    n = m.sum(dim=1).clamp(min=1)
    part = (z * z * m).sum(dim=1) / n
    return part.max(dim=1).values, part, (z * m).sum(dim=1) / n
