"""Pretraining on synthetic normal signals: a starting point for models that get only a few hundred rows.

The benchmarks' protocols give a model a few hundred normal rows per file (NAB's probationary period, SKAB's
first 400 rows); a model learnt from those alone overfits them. `pretrained` first fits the same model on
synthetic signals of the same width (sums of sines of random periods, autocorrelated noise, slow trends and
level steps, each standardised), and per-file training then starts from those weights instead of random
ones. The generator's shapes were set once, before any benchmark figure was seen, and use no benchmark data.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.signal import lfilter

from detector.model import LSTMAutoencoder
from detector.train import Series, TrainParams, train_model

__all__ = ["synthetic_series", "pretrained"]


def synthetic_series(n_features: int, n_series: int = 60, length: int = 3000, seed: int = 0) -> list[np.ndarray]:
    """`n_series` standardised (length, n_features) float32 series of plausible normal sensor behaviour.

    >>> s = synthetic_series(3, n_series=2, length=500)
    >>> len(s), s[0].shape, bool(abs(s[0].mean()) < 1e-5), bool(abs(s[0].std() - 1) < 1e-3)
    (2, (500, 3), True, True)
    """
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    out = []
    for _ in range(n_series):
        cols = []
        for _ in range(n_features):
            x = np.zeros(length)
            for _ in range(rng.integers(1, 4)):  # one to three periodic components
                x += rng.uniform(0.2, 1.5) * np.sin(2 * np.pi * t / rng.uniform(8, 600) + rng.uniform(0, 2 * np.pi))
            phi, sd = rng.uniform(0.0, 0.95), rng.uniform(0.05, 0.6)
            x += lfilter([1.0], [1.0, -phi], rng.normal(0.0, sd, length))  # AR(1) noise
            if rng.random() < 0.5:
                x += rng.uniform(-0.002, 0.002) * t  # a slow trend
            if rng.random() < 0.3:
                x[rng.integers(length // 4, length):] += rng.normal(0.0, 1.0)  # a level step
            cols.append((x - x.mean()) / (x.std() + 1e-9))
        out.append(np.stack(cols, axis=1).astype(np.float32))
    return out


def pretrained(features: list[str], params: TrainParams, n_series: int = 60, length: int = 3000,
               epochs: int = 40, steps_per_epoch: int = 60) -> LSTMAutoencoder:
    """A model of `params`' shape fitted on synthetic signals of len(features) features (params.seed seeds them)."""
    data = synthetic_series(len(features), n_series, length, params.seed)
    base = replace(params, epochs=epochs, steps_per_epoch=steps_per_epoch, patience=max(params.patience, 6),
                   name="synthetic-pretraining")
    model, _ = train_model(Series(list(features), [f"synthetic-{i}" for i in range(len(data))], data), base,
                           progress=False)
    return model
