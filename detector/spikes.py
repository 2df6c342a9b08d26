"""The spike score: one sensor's reading far from its neighbours on both sides while the machine's other sensors hold.

A spike of a few readings averages out in a window's reconstruction error, and a forecast from the past cannot
tell it from the start of a load change. Looking at both sides can: each reading is compared with the median
of the `SIDE` readings before it and the median of the `SIDE` after it. A step or a ramp (a load change, a
level shift) lies between the two medians, so its readings score 0; a spike lies beyond both, on the same side.
The excursion (the smaller of the two distances) is in units of the sensor's noise: the fleet's median over
training streams of 1.4826 x MAD(first differences) / sqrt(2), the standard robust estimate of white noise
(first differences see the noise twice and the smooth signal hardly at all). A reading counts as a spike only
while every other sensor of the stream stays under `ISOLATION` noise spreads at that reading: when the machine
reverses a load change, rpm, flow and pressure peak together, and a spike is one sensor's.

Each sensor's level is `MARGIN` x the largest isolated excursion it showed anywhere in the training rows (a
sensor's normal operation sets its own bar), and never below `FLOOR`. A window whose readings reach a level is
a spike window: it raises an alert at once, without waiting for k of n windows (detector.alert), and names the
sensor. The newest `SIDE` readings of a window have no after-side yet, so a reading is judged `SIDE` readings
later, at the window that holds both sides. Missing values (held by the engine) score 0.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SIDE", "FLOOR", "MARGIN", "ISOLATION", "noise_scale", "spike_z", "isolated", "fit_spikes", "spike_parts"]

SIDE = 6
"""Readings on each side whose median a reading is compared with."""

FLOOR = 5.0
"""The lowest level, in noise spreads: under it, white noise alone crosses too often."""

MARGIN = 1.25
"""A sensor's level is this times the largest isolated excursion it showed on the training rows."""

ISOLATION = 3.0
"""Another sensor at or past this many noise spreads at the same reading makes it a move of the machine."""


def noise_scale(x: np.ndarray) -> np.ndarray:
    """Each feature's white-noise spread in one stream's readings x (T, F), NaN where missing (0: no estimate).

    >>> rng = np.random.default_rng(0)
    >>> x = np.stack([np.linspace(0, 50, 4000) + rng.normal(0, 2.0, 4000), np.full(4000, 3.0)], 1)
    >>> [round(float(v), 1) for v in noise_scale(x)]
    [2.0, 0.0]
    """
    d = np.diff(x, axis=0)
    out = np.zeros(x.shape[1])
    for f in range(x.shape[1]):
        df = d[:, f][~np.isnan(d[:, f])]
        if len(df) >= 2:
            out[f] = 1.4826 * float(np.median(np.abs(df - np.median(df)))) / np.sqrt(2.0)
    return out


def _median(v: torch.Tensor) -> torch.Tensor:
    """The median over the last axis, the mean of the two middle values for an even count (as numpy's)."""
    s = v.sort(dim=-1).values
    n = s.shape[-1]
    return s[..., n // 2] if n % 2 else 0.5 * (s[..., n // 2 - 1] + s[..., n // 2])


def spike_z(x: torch.Tensor, present: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Readings SIDE .. n-SIDE-1 of x (B, n, F): each one's excursion beyond both neighbouring medians, signed, in
    noise spreads (B, n - 2 SIDE, F); 0 where the reading is missing, lies between the medians, or the sensor has
    no noise estimate.

    >>> x = torch.zeros(1, 13, 2); x[0, 6, 0] = 8.0; x[0, 7:, 1] = 8.0  # a spike on 0, a step on 1
    >>> spike_z(x, torch.ones(1, 13, 2, dtype=torch.bool), torch.tensor([1.0, 1.0])).tolist()
    [[[8.0, 0.0]]]
    """
    n = x.shape[1]
    if n < 2 * SIDE + 1:
        return x.new_zeros((x.shape[0], 0, x.shape[2]))
    med = _median(x.unfold(1, SIDE, 1))  # (B, n - SIDE + 1, F): the median of x[i .. i + SIDE - 1]
    mid = x[:, SIDE : n - SIDE]
    before, after = mid - med[:, : n - 2 * SIDE], mid - med[:, SIDE + 1 :]
    same = torch.sign(before) * torch.sign(after) > 0
    z = torch.where(same, torch.sign(before) * torch.minimum(before.abs(), after.abs()), 0.0)
    ok = present[:, SIDE : n - SIDE] & (noise > 0)
    return torch.where(ok, z / noise.clamp(min=1e-12), 0.0)


def isolated(z: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Where z (..., F) is one sensor's own: every other scored sensor under ISOLATION at that reading.

    >>> isolated(torch.tensor([[9.0, 0.5, 1.0], [9.0, 4.0, 1.0]]), torch.tensor([True, True, True])).tolist()
    [[True, False, False], [False, False, False]]
    """
    big = (z.abs() >= ISOLATION) & scored
    return (big.sum(dim=-1, keepdim=True) - big.int()) == 0


def fit_spikes(blocks: list[tuple[np.ndarray, np.ndarray]], constant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The noise spreads (F,) and levels (F,) of the spike score from training streams' (x (T, F) with missing
    values held, present (T, F)); a sensor constant in training, or with no noise estimate, gets level 0 (not
    scored)."""
    F = len(constant)
    est = [noise_scale(np.where(p, x, np.nan)) for x, p in blocks if len(x) >= 2 * SIDE + 1]
    if not est:
        return np.zeros(F), np.zeros(F)
    noise = np.median(np.stack(est), axis=0)
    scored = (noise > 0) & ~np.asarray(constant, bool)
    noise = np.where(scored, noise, 0.0)
    noise_t, scored_t = torch.tensor(noise, dtype=torch.float32), torch.from_numpy(scored)
    top = np.zeros(F)
    with torch.inference_mode():
        for x, p in blocks:
            z = spike_z(torch.from_numpy(x).float()[None], torch.from_numpy(p)[None], noise_t)[0]
            if len(z):
                own = torch.where(isolated(z, scored_t), z.abs(), 0.0)
                top = np.maximum(top, own.amax(dim=0).numpy())
    return noise, np.where(scored, np.maximum(FLOOR, MARGIN * top), 0.0)


def spike_parts(x: torch.Tensor, present: torch.Tensor, noise: torch.Tensor,
                level: torch.Tensor, hop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For windows x (K, W, F): each sensor's largest isolated excursion over the `hop` readings judged at this
    window (the ones SIDE readings before its newest, whose both sides it holds), as a multiple of the sensor's
    level (K, F; 1 or more: a spike), and its sign (K, F)."""
    W = x.shape[1]
    n = min(W, hop + 2 * SIDE)
    z = spike_z(x[:, W - n :], present[:, W - n :], noise)
    if z.shape[1] == 0:  # a window too short to hold both sides of any reading
        return x.new_zeros((x.shape[0], x.shape[2])), x.new_zeros((x.shape[0], x.shape[2]))
    scored = level > 0
    ratio = torch.where(isolated(z, scored) & scored, z.abs() / level.clamp(min=1e-12), 0.0)
    top, at = ratio.max(dim=1)
    return top, torch.sign(z.gather(1, at[:, None]).squeeze(1))
