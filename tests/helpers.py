"""Small builders shared by the unit tests: a model with known shape, readings, records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import torch

from consumers.base import Record
from detector.artifact import Artifact, Manifest
from detector.decode import Readings
from detector.model import LSTMAutoencoder
from detector.train import CALIBRATION_LEVELS

FEATURES = ["temp", "vibration", "pressure"]


def random_artifact(window: int = 8, hop: int = 4, hidden: int = 16, layers: int = 1, seed: int = 0) -> Artifact:
    """An untrained model with a complete manifest: enough to test the engine's arithmetic."""
    torch.manual_seed(seed)
    model = LSTMAutoencoder(len(FEATURES), hidden, layers, window).eval()
    n = len(CALIBRATION_LEVELS)
    manifest = Manifest(
        features=list(FEATURES), scaler_mean=[50.0, 1.0, 3.0], scaler_std=[5.0, 0.2, 0.5], window=window, hop=hop,
        hidden_size=hidden, num_layers=layers, error_mean=[0.0] * 3, error_std=[1.0] * 3,
        calibration_levels=list(CALIBRATION_LEVELS), calibration_scores=list(np.linspace(0.5, 5.0, n)),
        name="test", model_version="test-1",
    )
    return Artifact(model, manifest, Path("."))


def sine_values(n: int, seed: int, phase: float = 0.0) -> np.ndarray:
    """(n, 3) plausible readings around the random_artifact scaler."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) + phase
    return np.stack([
        50 + 5 * np.sin(2 * np.pi * t / 50) + rng.normal(0, 0.5, n),
        1 + 0.2 * np.cos(2 * np.pi * t / 50) + rng.normal(0, 0.02, n),
        3 + 0.5 * np.sin(2 * np.pi * t / 25) + rng.normal(0, 0.05, n),
    ], axis=1).astype(np.float32)


def readings(stream: str | list[str], ts: np.ndarray, values: np.ndarray) -> Readings:
    """Readings of one stream (or one stream id per row)."""
    streams = np.array([stream] * len(ts) if isinstance(stream, str) else stream, dtype=object)
    return Readings(streams, np.asarray(ts, float), values.astype(np.float32), np.arange(len(ts)))


def record(value: object, offset: int = 0, topic: str = "in", partition: int = 0) -> Record:
    """A record whose value is JSON of `value` (or raw bytes)."""
    body = value if isinstance(value, bytes | type(None)) else orjson.dumps(value)
    stream = value.get("stream") if isinstance(value, dict) else None
    key = stream.encode() if isinstance(stream, str) else b"k"  # keyed by stream id, as producers should
    return Record(topic, partition, offset, key, body, 0)
