"""The batched engine: per-stream windows and LSTM state as rows of tensors, one model step per batch.

For each batch of readings the engine gathers the rows of the streams present, advances the encoder over
each stream's new readings in one call, reconstructs a window wherever a stream reaches a hop boundary,
scores those windows, and scatters the new state back. Nothing on this path loops in Python per reading
or per stream; the only loop is over gap segments, which is almost always one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from detector.artifact import Artifact
from detector.decode import Readings
from detector.errors import ModelError
from detector.rows import grown
from detector.rows import step as next_capacity
from detector.score import score_windows

__all__ = ["Engine", "WindowScores", "EngineResult", "pick_device", "use_threads", "check_precision", "PRECISIONS"]

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The model's arithmetic by config name: None runs in float32, the others under torch autocast."""


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for `auto`, `cpu` or `cuda` (auto takes CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a model.precision the device cannot run (float16 is for CUDA only)."""
    if precision == "float16" and device.type != "cuda":
        raise ModelError(f"model.precision float16 needs a CUDA device, and the model runs on {device.type}: "
                         "use bfloat16 or float32 there")


def use_threads(n: int) -> int:
    """Run torch's CPU work on `n` threads (0: leave its default, one per core); returns the number in use."""
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


@dataclass(slots=True)
class WindowScores:
    """K scored windows, ordered by stream row, then event time."""

    rows: np.ndarray  # (K,) int64 stream rows
    score: np.ndarray  # (K,) float64
    feature_score: np.ndarray  # (K, F) float32: each feature's own normalised error
    share: np.ndarray  # (K, F) float32: each feature's share of the window score
    direction: np.ndarray  # (K, F) int8: +1 above expected, -1 below
    start_ts: np.ndarray  # (K,) float64 event time of the window's first reading
    end_ts: np.ndarray  # (K,) float64 event time of the window's newest reading
    reading: np.ndarray  # (K,) int64 index (into the batch's Readings) of the window's newest reading
    nth: np.ndarray  # (K,) int64 readings of the stream since its last reset, up to the window's newest one

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: np.ndarray) -> WindowScores:
        """The windows at positions idx."""
        return WindowScores(*(getattr(self, f)[idx] for f in self.__slots__))  # type: ignore[attr-defined]

    @staticmethod
    def concat(parts: list[WindowScores], n_features: int) -> WindowScores:
        """All windows of `parts`, ordered by row then end time."""
        if not parts:
            z = np.empty(0)
            zf = np.empty((0, n_features), np.float32)
            return WindowScores(
                z.astype(np.int64), z, zf, zf, zf.astype(np.int8), z, z, z.astype(np.int64), z.astype(np.int64)
            )
        ws = WindowScores(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in WindowScores.__slots__)  # type: ignore[attr-defined]
        )
        return ws.take(np.lexsort((ws.end_ts, ws.rows))) if len(parts) > 1 else ws


@dataclass(slots=True)
class EngineResult:
    """What one batch produced: scored windows, and readings dropped as late or duplicate."""

    windows: WindowScores
    dropped: np.ndarray  # (D,) int64 indices into the batch's Readings
    dropped_reason: np.ndarray  # (D,) object: "late" or "duplicate_timestamp"
    resets: int  # streams whose state was reset (new, or back after a gap)


class Engine:
    """Scores batches of readings for any number of streams with one stateful model."""

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu", max_gap_s: float = 3600.0,
                 capacity: int = 256, adapt_halflife: float = 0.0, precision: str = "float32") -> None:
        m = artifact.manifest
        self.device = torch.device(device)
        check_precision(precision, self.device)
        self._autocast = PRECISIONS[precision]  # the state table stays float32 whatever the model computes in
        self.model = artifact.model.to(self.device).eval()
        self.manifest = m
        self.window, self.hop, self.n_features = m.window, m.hop, len(m.features)
        self.max_gap_s = max_gap_s
        # per-stream, per-feature error level (1 = as in calibration), learned when adapt_halflife > 0 windows
        self.adapt_rate = 1.0 - 0.5 ** (1.0 / adapt_halflife) if adapt_halflife > 0 else 0.0
        self._mean = np.asarray(m.scaler_mean, np.float32)
        self._std = np.asarray(m.scaler_std, np.float32)
        with torch.inference_mode():
            self._err_mean = torch.tensor(m.error_mean, dtype=torch.float32, device=self.device)
            self._err_std = torch.tensor(m.error_std, dtype=torch.float32, device=self.device)
        self.streams: list[str] = []
        self._index = pd.Index([], dtype=object)
        self.capacity = 0
        self._grow(capacity)

    # ----- the state table -------------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        old = self.capacity
        L, H, W, F = self.model.num_layers, self.model.hidden_size, self.window, self.n_features
        with torch.inference_mode():
            h = torch.zeros((L, capacity, H), device=self.device)
            c = torch.zeros((L, capacity, H), device=self.device)
            buf = torch.zeros((capacity, W, F), device=self.device)
            bmask = torch.zeros((capacity, W, F), dtype=torch.bool, device=self.device)
            if old:
                h[:, :old], c[:, :old], buf[:old], bmask[:old] = self.h, self.c, self.buf, self.bmask
        self.h, self.c, self.buf, self.bmask = h, c, buf, bmask
        self.bts = grown(getattr(self, "bts", np.zeros((0, W))), capacity)
        self.count = grown(getattr(self, "count", np.zeros(0, np.int64)), capacity)
        self.last_ts = grown(getattr(self, "last_ts", np.zeros(0)), capacity, -np.inf)
        self.last_val = grown(getattr(self, "last_val", np.zeros((0, F), np.float32)), capacity)
        self.level = grown(getattr(self, "level", np.zeros((0, F), np.float32)), capacity, 1.0)
        self.capacity = capacity

    def rows_for(self, streams: np.ndarray) -> np.ndarray:
        """The table row of each stream id, adding rows for streams never seen."""
        codes, uniques = pd.factorize(streams)
        rows_u = self._index.get_indexer(uniques)
        new = rows_u < 0
        if new.any():
            names = [str(s) for s in uniques[new]]
            first = len(self.streams)
            rows_u[new] = np.arange(first, first + len(names))
            self.streams.extend(names)
            self._index = pd.Index(self.streams, dtype=object)
            if len(self.streams) > self.capacity:
                self._grow(max(next_capacity(self.capacity), len(self.streams)))
        return rows_u[codes].astype(np.int64)

    def reset(self, rows: np.ndarray) -> None:
        """Forget the model state and window of these rows (new stream, or back after a gap)."""
        if len(rows) == 0:
            return
        with torch.inference_mode():
            rt = torch.as_tensor(rows, device=self.device)
            self.h[:, rt] = 0.0
            self.c[:, rt] = 0.0
            self.buf[rt] = 0.0
            self.bmask[rt] = False
        self.bts[rows] = 0.0
        self.count[rows] = 0
        self.last_val[rows] = 0.0

    _ROW_ARRAYS = {"bts": 0.0, "count": 0, "last_ts": -np.inf, "last_val": 0.0, "level": 1.0}

    def export_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The state of these streams as numpy arrays, rows first: LSTM h and c, window, counters."""
        with torch.inference_mode():
            rt = torch.as_tensor(rows, device=self.device)
            out = {"h": self.h[:, rt].transpose(0, 1).cpu().numpy(), "c": self.c[:, rt].transpose(0, 1).cpu().numpy(),
                   "buf": self.buf[rt].cpu().numpy(), "bmask": self.bmask[rt].cpu().numpy()}
        out.update({name: getattr(self, name)[rows] for name in self._ROW_ARRAYS})
        return out

    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set these streams' state (None: fresh, as a new stream); return the fields that did not fit."""
        misfit: list[str] = []
        if len(rows) == 0:
            return misfit
        self.reset(rows)
        self.last_ts[rows] = -np.inf
        self.level[rows] = 1.0
        if state is None:
            return misfit
        L, H, W, F = self.model.num_layers, self.model.hidden_size, self.window, self.n_features
        shapes = {"h": (L, H), "c": (L, H), "buf": (W, F), "bmask": (W, F), "bts": (W,), "count": (),
                  "last_ts": (), "last_val": (F,), "level": (F,)}
        misfit = [k for k, shape in shapes.items() if k not in state or state[k].shape != (len(rows), *shape)]
        if misfit:  # another model's state (window, layers or features differ): the streams start fresh
            return misfit
        with torch.inference_mode():
            rt = torch.as_tensor(rows, device=self.device)
            self.h[:, rt] = torch.as_tensor(state["h"], device=self.device).transpose(0, 1)
            self.c[:, rt] = torch.as_tensor(state["c"], device=self.device).transpose(0, 1)
            self.buf[rt] = torch.as_tensor(state["buf"], device=self.device)
            self.bmask[rt] = torch.as_tensor(state["bmask"], device=self.device)
        for name in self._ROW_ARRAYS:
            getattr(self, name)[rows] = state[name]
        return misfit

    # ----- scoring ---------------------------------------------------------------------------------------
    def score_batch(self, readings: Readings, rows: np.ndarray | None = None) -> EngineResult:
        """Advance every stream in the batch and score the windows it completes (`rows`: from rows_for)."""
        n = len(readings)
        if n == 0:
            return EngineResult(WindowScores.concat([], self.n_features), np.empty(0, np.int64),
                                np.empty(0, object), 0)
        rows = self.rows_for(readings.streams) if rows is None else rows
        order, dropped, reason = self._in_order(rows, readings.ts)
        r, t = rows[order], readings.ts[order]
        if len(r) == 0:
            return EngineResult(WindowScores.concat([], self.n_features), dropped, reason, 0)

        first = _group_starts(r)
        prev = np.empty(len(t))
        prev[0] = -np.inf
        prev[1:] = t[:-1]
        prev[first] = self.last_ts[r[first]]
        gap = (t - prev) > self.max_gap_s
        mid = gap & ~first
        group = np.cumsum(first) - 1
        cum = np.cumsum(mid)
        seg = cum - cum[np.flatnonzero(first)][group]
        resets = np.unique(r[gap])
        self.reset(r[first & gap])
        parts = []
        for g in range(int(seg.max()) + 1):
            sel = seg == g
            if g:
                self.reset(r[sel & mid])
            parts.append(self._advance(order[sel], r[sel], t[sel], readings.values))
        return EngineResult(WindowScores.concat(parts, self.n_features), dropped, reason, len(resets))

    def admit(self, rows: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which readings come after their stream's last one: a keep mask, and the dropped ones with why.

        A reading at or before the newest event time of its stream (in the table or earlier in the batch) is
        `late`, or `duplicate_timestamp` when the time is equal; it is never scored.
        """
        _, dropped, reason = self._in_order(rows, ts)
        keep = np.ones(len(ts), bool)
        keep[dropped] = False
        return keep, dropped, reason

    def _in_order(self, rows: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Readings kept, sorted by row then time; and those dropped as late or duplicate, with the reason."""
        order = np.lexsort((ts, rows))
        r, t = rows[order], ts[order]
        first = _group_starts(r)
        prev = np.empty(len(t))
        if len(t):
            prev[0] = -np.inf
        prev[1:] = t[:-1]
        prev[first] = -np.inf
        prev = np.maximum(prev, self.last_ts[r])
        keep = t > prev
        reason = np.where(t[~keep] == prev[~keep], "duplicate_timestamp", "late").astype(object)
        return order[keep], order[~keep], reason

    def _advance(self, idx: np.ndarray, r: np.ndarray, t: np.ndarray, values: np.ndarray) -> WindowScores:
        """Advance rows r (sorted, grouped) over their readings idx, return the windows they complete."""
        W, F, hop, dev = self.window, self.n_features, self.hop, self.device
        u, start, counts = np.unique(r, return_index=True, return_counts=True)
        R, T = len(u), int(counts.max())
        gid = np.repeat(np.arange(R), counts)
        j = np.arange(len(r)) - start[gid]

        pad = np.full((R, T + 1, F), np.nan, np.float32)
        pad[:, 0] = self.last_val[u]
        pad[gid, j + 1] = (values[idx] - self._mean) / self._std
        present = ~np.isnan(pad)
        pos = np.where(present, np.arange(T + 1)[None, :, None], 0)
        np.maximum.accumulate(pos, axis=1, out=pos)
        filled = np.take_along_axis(pad, pos, axis=1)  # missing values hold the last present value
        ts_pad = np.zeros((R, T))
        ts_pad[gid, j] = t

        with torch.inference_mode():
            ut = torch.as_tensor(u, device=dev)
            x = torch.as_tensor(filled[:, 1:], device=dev)
            m = torch.as_tensor(present[:, 1:], device=dev)
            with self._mixed():
                out, (hn, cn) = self.model.encode(x, torch.as_tensor(counts), (self.h[:, ut], self.c[:, ut]))
            ext = torch.cat([self.buf[ut], x], dim=1)
            mext = torch.cat([self.bmask[ut], m], dim=1)
            text = np.concatenate([self.bts[u], ts_pad], axis=1)

            nth = self.count[u][:, None] + np.arange(T)[None, :] + 1
            boundary = (np.arange(T)[None, :] < counts[:, None]) & (nth % hop == 0) & (nth >= W)
            gi, gj = np.nonzero(boundary)
            if len(gi):
                gi_t, gj_t = torch.as_tensor(gi, device=dev), torch.as_tensor(gj, device=dev)
                win = ext.unfold(1, W, 1)[gi_t, gj_t + 1].transpose(1, 2)
                wmask = mext.unfold(1, W, 1)[gi_t, gj_t + 1].transpose(1, 2)
                with self._mixed():
                    recon = self.model.decode(out[gi_t, gj_t]).float()
                scale = torch.as_tensor(self.level[u[gi]], device=dev) if self.adapt_rate else None
                score, per_feature, share, direction = score_windows(
                    win, recon, wmask, self._err_mean, self._err_std, hop, self.manifest.score_aggregate, scale
                )
                if self.adapt_rate:
                    self._adapt(u[gi], (per_feature * scale).cpu().numpy())
                result = WindowScores(
                    rows=u[gi],
                    score=score.double().cpu().numpy(),
                    feature_score=per_feature.cpu().numpy(),
                    share=share.cpu().numpy(),
                    direction=direction.to(torch.int8).cpu().numpy(),
                    start_ts=text[gi, gj + 1],
                    end_ts=text[gi, gj + W],
                    reading=idx[start[gi] + gj],
                    nth=nth[gi, gj],
                )
            else:
                result = WindowScores.concat([], F)

            keep = torch.as_tensor(counts[:, None] + np.arange(W)[None, :], device=dev)
            self.h[:, ut], self.c[:, ut] = hn.float(), cn.float()
            self.buf[ut] = ext.gather(1, keep[..., None].expand(R, W, F))
            self.bmask[ut] = mext.gather(1, keep[..., None].expand(R, W, F))
        self.bts[u] = np.take_along_axis(text, counts[:, None] + np.arange(W)[None, :], axis=1)
        self.count[u] += counts
        self.last_ts[u] = t[start + counts - 1]
        self.last_val[u] = filled[np.arange(R), counts]
        return result

    def _mixed(self) -> torch.autocast:
        """The autocast context of model.precision (a no-op for float32)."""
        return torch.autocast(self.device.type, dtype=self._autocast or torch.bfloat16,
                              enabled=self._autocast is not None)

    def _adapt(self, rows: np.ndarray, level: np.ndarray) -> None:
        """Move each stream's per-feature error level towards what its windows show, never below 1.

        A feature whose errors run higher than in calibration (a temperature that drifts with the season)
        slowly stops dominating the score, while a fault that appears within a few half-lives stands out.
        Each window pulls the level towards its own error at most as far as four times the current level,
        so one extreme window moves it little.
        """
        first = _group_starts(rows)
        starts = np.flatnonzero(first)
        rank = np.arange(len(rows)) - starts[np.cumsum(first) - 1]
        a = self.adapt_rate
        for step in range(int(rank.max()) + 1):
            w = rank == step
            r = rows[w]
            cur = self.level[r]
            self.level[r] = np.maximum(cur + a * (np.minimum(level[w], 4.0 * cur) - cur), 1.0)


def _group_starts(r: np.ndarray) -> np.ndarray:
    first = np.ones(len(r), dtype=bool)
    first[1:] = r[1:] != r[:-1]
    return first
