"""The engine on a CUDA device scores exactly what it scores on the CPU (runs only where torch sees a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import detector.engine as engine_mod
from detector.engine import Engine
from tests.helpers import random_artifact, readings, sine_values

T0 = 1_700_000_000.0

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.py's machine)")


def feed(seed: int = 0) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """Batches with late joiners, missing values, shuffled order, a late reading, a duplicate and a long gap."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(30):
        join = 0 if s < 20 else int(rng.integers(10, 60))
        ts = T0 + 60.0 * np.arange(join, 150)
        if s == 3:
            ts[ts > T0 + 60.0 * 90] += 7200.0  # two hours of silence: the stream starts over
        v = sine_values(len(ts), seed=s, phase=s)
        v[rng.random(v.shape) < 0.03] = np.nan
        rows += [(t, f"m{s}", v[i]) for i, t in enumerate(ts)]
    rows.sort(key=lambda r: r[0])
    batches, pos = [], 0
    while pos < len(rows):
        size = int(rng.integers(1, 400))
        chunk = [rows[pos + i] for i in rng.permutation(min(size, len(rows) - pos))]
        pos += size
        batches.append(([s for _, s, _ in chunk], np.array([t for t, _, _ in chunk]), np.stack([v for *_, v in chunk])))
    last = batches[-1]  # a late reading and a duplicate of a stream's newest one
    batches.append(([last[0][0], "m0"], np.array([T0, T0 + 60.0 * 149]), sine_values(2, seed=99)))
    return batches


def test_cuda_engine_scores_like_the_cpu_engine(monkeypatch) -> None:
    monkeypatch.setattr(engine_mod, "CHUNK", 7)  # several chunked LSTM calls per batch
    art = random_artifact(window=8, hop=4, hidden=16, layers=2)
    engines = {d: Engine(art, device=d, capacity=4, adapt_halflife=20) for d in ("cpu", "cuda")}
    assert next(art.model.parameters()).device.type == "cpu"  # each engine moved its own copy
    n_windows = 0
    for streams, ts, values in feed():
        out = {d: e.score_batch(readings(streams, ts, values)) for d, e in engines.items()}
        a, b = out["cpu"], out["cuda"]
        assert a.dropped.tolist() == b.dropped.tolist() and a.dropped_reason.tolist() == b.dropped_reason.tolist()
        assert a.resets == b.resets
        wa, wb = a.windows, b.windows
        for field in ("rows", "start_ts", "end_ts", "reading", "nth"):
            assert getattr(wa, field).tolist() == getattr(wb, field).tolist(), field
        assert (wa.direction == wb.direction).mean() > 0.99 if len(wa) else True  # a sign near 0 may differ
        assert np.allclose(wa.score, wb.score, rtol=1e-3, atol=1e-5)
        assert np.allclose(wa.share, wb.share, atol=1e-3)
        n_windows += len(wa)
    assert n_windows > 500
    assert sorted(out["cpu"].dropped_reason.tolist()) == ["duplicate_timestamp", "late"]
    rows = np.arange(len(engines["cpu"].streams))
    sa, sb = (e.export_rows(rows) for e in engines.values())
    for name in sa:  # cuDNN runs float32 LSTMs in TF32 by default: h and c drift apart by over 1e-4 in 150 steps
        tol = 5e-3 if name in ("h", "c") else 1e-4
        assert np.allclose(sa[name].astype(float), sb[name].astype(float), rtol=1e-3, atol=tol), name
