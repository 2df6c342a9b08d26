"""Small builders shared by the unit tests: a model with known shape, readings, records."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from consumers.base import Record
from detector.artifact import Artifact, Manifest
from detector.decode import Readings
from detector.engine import Engine
from detector.errors import ModelError
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


def bfloat16_error(device: str = "cpu") -> str | None:
    """Why the engine refuses model.precision bfloat16 on `device` on this machine (None: it runs there)."""
    with torch.random.fork_rng(devices=[]):  # random_artifact seeds torch: leave the caller's generator alone
        art = random_artifact()
    try:
        Engine(art, device=device, capacity=1, precision="bfloat16")
    except ModelError as exc:
        return str(exc)
    return None


def needs_bfloat16(test: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a test that runs the model in bfloat16 on the CPU: skipped, with why, where this CPU cannot."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        why = bfloat16_error()
        if why is not None:
            pytest.skip(f"needs a CPU that runs bfloat16 LSTMs (AVX-512 BF16 or AMX): {why}")
        return test(*args, **kwargs)

    return run


SKAB_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "SKAB"
SKAB_SLICES = {"valve1/0.csv": "valve1/0.csv", "valve2/0.csv": "valve1/1.csv", "other/9.csv": "valve1/2.csv"}
"""A small SKAB layout: each test file (its folder as in SKAB) and the real file whose first rows it holds."""


def skab_layout(root: Path, rows: int = 700) -> Path:
    """A SKAB data folder under `root` with SKAB_SLICES' files (first `rows` rows) and 500 anomaly-free rows."""
    if not (SKAB_DATA / "valve1").is_dir():
        pytest.fail(f"the labelled benchmark data is missing: expected valve1/ under {SKAB_DATA}")
    sources = {**SKAB_SLICES, "anomaly-free/anomaly-free.csv": "anomaly-free/anomaly-free.csv"}
    for name, source in sources.items():
        lines = (SKAB_DATA / source).read_text(encoding="utf-8").splitlines(keepends=True)
        (root / "SKAB" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "SKAB" / name).write_text("".join(lines[: 1 + (500 if "anomaly-free" in name else rows)]))
    return root / "SKAB"
