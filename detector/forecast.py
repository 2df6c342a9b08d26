"""The forecast score: each reading against the model's prediction of it from the readings before.

A reconstruction follows a sensor that jumps to a new level within a window or two (the autoencoder learnt to
pass levels through), and a spike of a few readings averages out in a window's error. A forecast of the next
reading from the encoder's summary of the stream so far (a linear head beside the decoder,
model.LSTMAutoencoder(forecast=True), trained with it) sees the jump and the spike at the reading itself.
Each reading's forecast error is divided by its spread on the validation rows, so normal readings give z about
N(0, 1). A window's forecast score is the largest, over sensors, mean z^2 over its newest `hop` readings,
times a weight that puts its 0.999 quantile on the validation rows on the model's window score's (as for the
relation score, detector.relations), so that both cross the calibrated warning level about as often on
normal rows. A reading counts where its value is present and the stream had a reading before it (since its
last reset); a sensor held at one value all through training is never forecast.
"""

from __future__ import annotations

import torch

from detector.relations import Z_CAP

__all__ = ["forecast_z", "forecast_scores"]


def forecast_z(pred: torch.Tensor, x: torch.Tensor, counted: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Each reading's forecast error in validation spreads (..., F): NaN where not counted, |z| at most Z_CAP.

    >>> forecast_z(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[True, False]]),
    ...            torch.tensor([0.5, 0.5])).tolist()
    [[2.0, nan]]
    """
    z = ((x - pred) / std).clamp(-Z_CAP, Z_CAP)
    return torch.where(counted, z, torch.nan)


def forecast_scores(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw window scores (K,) (before the weight), per-sensor mean z^2 (K, F) and mean z (K, F) of windows'
    newest readings z (K, n, F), NaN where not counted (a sensor with none counts 0).

    >>> raw, part, zmean = forecast_scores(torch.tensor([[[1.0, 0.0], [3.0, float("nan")]]]))
    >>> raw.tolist(), part.tolist(), zmean.tolist()
    ([5.0], [[5.0, 0.0]], [[2.0, 0.0]])
    """
    m = ~torch.isnan(z)
    zz = torch.where(m, z, 0.0)
    n = m.sum(dim=1).clamp(min=1)
    part = (zz * zz).sum(dim=1) / n
    return part.max(dim=1).values, part, zz.sum(dim=1) / n
