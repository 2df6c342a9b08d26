"""The batched engine: per-stream windows and LSTM state as rows of tensors, one model step per batch.

For each batch of readings the engine gathers the rows of the streams present, advances the encoder over
each stream's new readings in one call, reconstructs a window wherever a stream reaches a hop boundary,
scores those windows, and scatters the new state back. The whole state table and all of this bookkeeping
(sorting, padding, filling gaps, window times and counts) are torch tensors on the model's device, so that on
a GPU a batch crosses to the host only as readings in and scored windows out. Nothing on this path loops in
Python per reading or per stream; the only loops are over gap segments (almost always one) and over chunks
of CHUNK streams per LSTM call.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch

from detector.artifact import Artifact, Manifest
from detector.decode import Readings
from detector.errors import ModelError
from detector.forecast import forecast_scores, forecast_z
from detector.model import LSTMAutoencoder
from detector.relations import Relations, relation_scores
from detector.rows import step as next_capacity
from detector.score import ScoreSpec, score_windows, smooth_decay, smooth_score, smooth_update
from detector.spikes import spike_parts

__all__ = ["Engine", "WindowScores", "EngineResult", "pick_device", "use_threads", "check_precision", "probe_model",
           "PRECISIONS", "score_spec"]

log = logging.getLogger(__name__)

CHUNK = 32768
"""Most streams (or windows) per LSTM call: bounds the cuDNN workspace, which for one call decoding a million
windows asked for 255 GiB (H200, float32)."""

GATE_QUANTILE = 0.999
"""The calibration quantile that a feature's own relation part must reach to stop its adaptation (the calibrated
warning level's default, and the quantile the relation weight is matched at)."""

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The model's arithmetic by config name: None runs in float32, the others under torch autocast. model.precision
may also be `auto`: bfloat16 where the model runs in it on its device, float32 elsewhere."""

_PROBED: dict[tuple[object, ...], str | None] = {}
"""What probing a precision on a device with a model of one shape found: None where it ran, else torch's error."""


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for `auto`, `cpu` or `cuda` (auto takes CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _mixed(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context the model runs in at `precision` on `device` (a no-op for float32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def probe_model(model: LSTMAutoencoder, device: torch.device, precision: str) -> None:
    """Run `model` (already on `device`) once at `precision` as the engine does: 2 streams, 3 steps; raise on failure.

    The encoder runs once with both streams the same length and once with different lengths (the LSTM runs
    unpacked in the first case and packed in the second: different kernels), then the decoder.
    """
    with torch.inference_mode(), _mixed(device, precision):
        x = torch.zeros((2, 3, model.n_features), device=device)
        state = model.zero_state(2, device)
        for lengths in ([3, 3], [3, 2]):
            out, _ = model.encode(x, torch.tensor(lengths, device=device), state)
        model.decode(out[:, -1]).float()


def _probe_error(model: LSTMAutoencoder, device: torch.device, precision: str) -> str | None:
    """Why `model` cannot run at `precision` on `device` (None: it can); probed once per device, precision and
    model shape."""
    key = (str(device), precision, model.n_features, model.hidden_size, model.num_layers, model.window)
    if key not in _PROBED:
        try:
            probe_model(model, device, precision)
            _PROBED[key] = None
        except RuntimeError as exc:  # oneDNN or cuDNN without the kernel (a CPU without bfloat16 LSTM)
            _PROBED[key] = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". Run workload")[0]
    return _PROBED[key]


def check_precision(precision: str, device: torch.device, model: LSTMAutoencoder) -> str:
    """The precision `model` (on `device`) computes in for model.precision `precision` (auto resolved); ModelError
    when it cannot run in it there."""
    if precision != "auto" and precision not in PRECISIONS:
        raise ModelError(f"model.precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if _probe_error(model, device, "bfloat16") is None else "float32"
    if precision == "float16" and device.type != "cuda":
        raise ModelError(f"model.precision float16 needs a CUDA device, and the model runs on {device}: "
                         "use float32 (or auto) there")
    if precision != "float32" and (why := _probe_error(model, device, precision)) is not None:
        raise ModelError(f"model.precision {precision} does not run on {device} here (a test pass of the model "
                         f"failed: {why}): use float32 there (or auto: bfloat16 where it runs, float32 elsewhere)")
    return precision


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
    spike: np.ndarray  # (K,) bool: a sensor's reading in the window reached its spike level (detector.spikes)

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
                z.astype(np.int64), z, zf, zf, zf.astype(np.int8), z, z, z.astype(np.int64), z.astype(np.int64),
                z.astype(bool)
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


ADAPT_FEATURES = ("all", "drifting")
"""Which features the per-stream adaptation may move: every one, or only those the model's relations found drifting
in normal operation (manifest drifting_features)."""

FINETUNE_QUANTILE = 0.99
"""Online fine-tuning learns only from windows scored below this quantile of the calibration scores."""


class Engine:
    """Scores batches of readings for any number of streams with one stateful model."""

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu", max_gap_s: float = 3600.0,
                 capacity: int = 256, adapt_halflife: float = 0.0, precision: str = "float32",
                 adapt_gate: bool = True, learn_scale: int = 0, finetune_rate: float = 0.0,
                 adapt_features: str = "all") -> None:
        m = artifact.manifest
        self.device = torch.device(device)
        # its own copy: moving the artifact's module in place would move it under any other user of the artifact
        self.model = copy.deepcopy(artifact.model).to(self.device).eval()
        self.precision = check_precision(precision, self.device, self.model)  # in use: auto resolved
        # the state table stays float32 whatever the model computes in
        self.manifest = m
        self.window, self.hop, self.n_features = m.window, m.hop, len(m.features)
        self.max_gap_s = max_gap_s
        # per-stream, per-feature error level (1 = as in calibration), learned when adapt_halflife > 0 windows
        self.adapt_rate = 1.0 - 0.5 ** (1.0 / adapt_halflife) if adapt_halflife > 0 else 0.0
        # which features adapt: all, or only those the model found drifting in normal operation (none: off)
        if adapt_features not in ADAPT_FEATURES:
            raise ValueError(f"adapt_features must be one of {', '.join(ADAPT_FEATURES)} (got {adapt_features!r})")
        drifting = [f in m.drifting_features for f in m.features]
        self._adapt_fixed = (None if adapt_features == "all" else
                             torch.tensor([not d for d in drifting], dtype=torch.bool, device=device))
        if adapt_features == "drifting" and not any(drifting):
            self.adapt_rate = 0.0
        # a feature that breaks its relations to the other sensors (its own relation part at the calibrated
        # warning quantile) is a fault, not a new normal: it does not adapt in that window (streams the
        # relations were trained on only)
        self.adapt_gate = adapt_gate and m.relation_weight > 0
        self._gate_level = m.quantile(GATE_QUANTILE)
        with torch.inference_mode():
            as_t = partial(torch.tensor, dtype=torch.float32, device=self.device)
            self._mean, self._std = as_t(m.scaler_mean), as_t(m.scaler_std)
            self.spec = score_spec(m, self.device)
            # the model sees a feature that was constant in training at that value (it never learnt its variation)
            self._model_sees = ~self.spec.constant if self.spec.constant is not None else None
            # each training stream's own scale, in the model's standardised units (the relation score's input)
            # a model trained with --stream-scale sees each known stream on that stream's own scale (the others:
            # on the fleet's, the scaler's)
            self._stream_scaled = m.stream_scaled
            self._warned_unscaled = False
            self._rel_index = pd.Index(m.relation_streams if self.spec.relations is not None or m.stream_scaled else [],
                                       dtype=object)
            self._rel_shift = (as_t(m.relation_mean).reshape(-1, len(m.features)) - self._mean) / self._std
            self._rel_scale = as_t(m.relation_std).reshape(-1, len(m.features)) / self._std
            # with two scored sensors a broken relation does not say which side moved (each is as far off against
            # the other): the model's own shares and directions stay; decided once, not per batch on the device
            rel = self.spec.relations
            self._rel_attributes = rel is not None and int(rel.use.sum()) >= 3
        # online fine-tuning: one Adam step per batch on the decoder (bridge, positions, decoder LSTM, head) over
        # the batch's windows scored below the calibrated 0.99 quantile; the encoder (whose state is checkpointed)
        # and the score's calibration stay as trained, so the score keeps its scale
        self.finetune_rate = finetune_rate
        if finetune_rate > 0:
            tuned = [p for name, p in self.model.named_parameters()
                     if name.split(".")[0] in ("bridge", "position", "decoder", "head")]
            self._opt = torch.optim.Adam(tuned, lr=finetune_rate)
            self._tune_below = m.quantile(FINETUNE_QUANTILE)
        self._tables = dict(self._TABLES)
        # a stream the model was not trained on learns its own scale from its first `learn_scale` readings (per
        # feature: count, sum and sum of squares in the scaler's units), then gets the relation score and, with a
        # stream-scaled model, its own input scale, as a training stream would
        scaled = self.spec.relations is not None or m.stream_scaled
        self.learn_scale = learn_scale if learn_scale > 0 and scaled else 0
        if self.learn_scale:
            self._tables |= {name: (torch.float64, 0.0) for name in self._LEARNT}
        if self.spec.forecast_std is not None:  # each stream's newest `hop` forecast errors (NaN: not counted)
            self._tables["fz"] = (torch.float32, math.nan)
        self.streams: list[str] = []  # stream id by row; "" where the row was released (reused first)
        self._free: list[int] = []
        self._index = pd.Index([], dtype=object)  # the ids of the rows in use, with their rows beside
        self._index_rows = np.zeros(0, np.int64)
        self._recent: dict[str, int] = {}  # ids given rows since the index was built (it is rebuilt when these
        #   reach an eighth of it, so that adding a million streams 4,096 at a time builds it 40 times, not 244)
        self.capacity = 0
        self._filled = 0  # rows [0, _filled) hold a fresh row's values or a stream's; the rest is untouched memory
        self._first_capacity = capacity
        self._grow(capacity)

    # ----- the state table: one row per stream, on the model's device ------------------------------------
    _TABLES = {"h": (torch.float32, 0.0), "c": (torch.float32, 0.0), "buf": (torch.float32, 0.0),
               "bmask": (torch.bool, False), "bts": (torch.float64, 0.0), "count": (torch.int64, 0),
               "last_ts": (torch.float64, -math.inf), "last_val": (torch.float32, 0.0), "level": (torch.float32, 1.0),
               "ewma": (torch.float32, 0.0)}
    """Every per-stream table: dtype and the value of a fresh row. h and c hold the layer first, then the row.
    A model with a forecast head adds `fz` (Engine._tables)."""
    _ADDED = ("ewma", "fz", "ls_n", "ls_sum", "ls_sq")
    """Tables added after the first checkpoint format: a checkpoint without one restores it fresh."""
    _FROM_MODEL = {"rel_shift": (torch.float32, 0.0), "rel_scale": (torch.float32, 1.0),
                   "rel_known": (torch.bool, False)}
    """Per-stream tables that come from the model, not from the stream's readings (never checkpointed): the
    stream's own scale for the relation score, and whether the model knows the stream (or learnt its scale)."""
    _LEARNT = ("ls_n", "ls_sum", "ls_sq")
    """A new stream's scale being learnt (Engine.learn_scale): per feature, readings, sum and sum of squares."""
    _KEPT = ("last_ts", "level", *_LEARNT)
    """Tables a reset (new stream, back after a gap) leaves as they are."""

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Each table's shape per stream (h and c: per layer)."""
        L, H, W, F = self.model.num_layers, self.model.hidden_size, self.window, self.n_features
        shapes = {"h": (L, H), "c": (L, H), "buf": (W, F), "bmask": (W, F), "bts": (W,), "count": (),
                  "last_ts": (), "last_val": (F,), "level": (F,), "ewma": (F,), "fz": (self.hop, F),
                  "ls_n": (F,), "ls_sum": (F,), "ls_sq": (F,)}
        return {name: shape for name, shape in shapes.items() if name in self._tables}

    def _all_tables(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, object]]:
        """Every per-stream table, checkpointed or from the model: its shape per stream, dtype and fresh value."""
        F = self.n_features
        return {name: (shape, *(self._tables.get(name) or self._FROM_MODEL[name]))
                for name, shape in {**self._shapes(), "rel_shift": (F,), "rel_scale": (F,), "rel_known": ()}.items()}

    @torch.inference_mode()
    def _grow(self, capacity: int) -> None:
        """Room for `capacity` rows. Rows past those in use are left unwritten (_fill_to writes them when they are
        taken), so on the CPU a large table costs resident memory only for the rows in use."""
        keep = self._filled
        for name, (shape, dtype, _) in self._all_tables().items():
            layered = name in ("h", "c")
            t = torch.empty((shape[0], capacity, *shape[1:]) if layered else (capacity, *shape), dtype=dtype,
                            device=self.device)
            if keep:
                at = (slice(None), slice(keep)) if layered else slice(keep)
                t[at] = getattr(self, name)[at]
            setattr(self, name, t)
        self.capacity = capacity

    @torch.inference_mode()
    def _fill_to(self, n: int) -> None:
        """Give rows up to `n` a fresh row's values, where not done yet."""
        if n <= self._filled:
            return
        for name, (_, _, fill) in self._all_tables().items():
            at = (slice(None), slice(self._filled, n)) if name in ("h", "c") else slice(self._filled, n)
            getattr(self, name)[at] = fill
        self._filled = n

    @property
    def rows_used(self) -> int:
        """Rows ever handed to a stream (the high-water mark): every row index the engine gives out is below it."""
        return self._filled

    def reserve(self, streams: int) -> None:
        """Make room for this many more streams at once (a restore about to add them), so the table is not grown,
        and copied, step by step. Only on the CPU, where rows not yet taken cost no resident memory; an
        allocation the machine refuses (an estimate far too high) leaves the table as it was."""
        want = self.live_streams + streams
        if self.device.type != "cpu" or want <= self.capacity:
            return
        try:
            self._grow(want)
        except RuntimeError as exc:  # out of memory, even as address space: grow step by step as usual
            log.info("could not reserve state rows for %d streams (%s); growing as they come", want, exc)

    def rows_for(self, streams: np.ndarray) -> np.ndarray:
        """The table row of each stream id, adding rows for streams never seen (released rows first)."""
        codes, uniques = pd.factorize(streams)
        rows_u = self._lookup(uniques)
        new = rows_u < 0
        if new.any():
            names = [str(s) for s in uniques[new]]
            reuse = self._free[len(self._free) - min(len(names), len(self._free)):][::-1]
            del self._free[len(self._free) - len(reuse):]
            first = len(self.streams)
            rows_new = np.concatenate([np.array(reuse, np.int64), np.arange(first, first + len(names) - len(reuse))])
            for r, name in zip(reuse, names, strict=False):
                self.streams[r] = name
            self.streams.extend(names[len(reuse):])
            rows_u[new] = rows_new
            self._recent.update(zip(names, rows_new.tolist(), strict=True))
            if len(self._recent) > max(len(self._index_rows) // 8, 4096):
                self._reindex()
            if len(self.streams) > self.capacity:
                self._grow(max(next_capacity(self.capacity), len(self.streams)))
            self._fill_to(len(self.streams))
            if len(self._rel_index):
                self._known_scales(rows_new, self._rel_index.get_indexer(names))
        return rows_u[codes].astype(np.int64)

    def find(self, streams: list[str]) -> np.ndarray:
        """The row of each stream id held, -1 for those not held (nothing is added)."""
        return self._lookup(np.array(streams, dtype=object))

    def _lookup(self, names: np.ndarray) -> np.ndarray:
        """The row of each stream id (an object array) held, -1 for those not held."""
        pos = self._index.get_indexer(pd.Index(names, dtype=object))
        rows = np.where(pos >= 0, self._index_rows[np.maximum(pos, 0)] if len(self._index_rows) else -1, -1)
        if self._recent:
            miss = np.flatnonzero(pos < 0)
            if len(miss):
                rows[miss] = [self._recent.get(n, -1) for n in names[miss].tolist()]
        return rows.astype(np.int64, copy=False)

    def _reindex(self) -> None:
        """Rebuild the lookup from stream id to row over the rows in use."""
        live = self.live_rows()
        self._index_rows = live
        names = self.streams if not self._free else np.array(self.streams, dtype=object)[live]
        self._index = pd.Index(names, dtype=object)
        self._recent = {}

    def live_rows(self) -> np.ndarray:
        """The rows that hold a stream (not released), in order."""
        if not self._free:
            return np.arange(len(self.streams), dtype=np.int64)
        free = np.zeros(len(self.streams), bool)
        free[self._free] = True
        return np.flatnonzero(~free)

    @property
    def live_streams(self) -> int:
        """How many streams the table holds (rows in use)."""
        return len(self.streams) - len(self._free)

    @torch.inference_mode()
    def release(self, rows: np.ndarray) -> None:
        """Forget these rows' streams: their state is fresh and their rows go to the next new streams."""
        rows = np.unique(np.asarray(rows, np.int64))
        rows = rows[[bool(self.streams[r]) for r in rows.tolist()]]  # a row released twice is freed once
        if not len(rows):
            return
        if len(rows) == self.live_streams:  # every stream goes (a rewind): the table starts afresh, its memory freed
            self._clear()
            return
        self.import_rows(rows, None)
        rt = torch.as_tensor(rows, device=self.device)
        for name, (_, fill) in self._FROM_MODEL.items():
            self._put(name, rt, fill)
        for r in rows.tolist():
            self.streams[r] = ""  # stream ids are never empty (decode refuses them)
        self._free.extend(rows.tolist())
        self._reindex()

    def _clear(self) -> None:
        """No stream held: a new table of the first size, so that rows a member no longer needs (its partitions
        went to another at a rebalance) do not stay in memory; the old tables are freed."""
        self.streams.clear()  # in place: the threshold overrides, maintenance windows and mutes read this list
        self._free.clear()
        self._index, self._index_rows, self._recent = pd.Index([], dtype=object), np.zeros(0, np.int64), {}
        self.capacity = self._filled = 0
        self._grow(self._first_capacity)

    @torch.inference_mode()
    def _known_scales(self, rows: np.ndarray, at: np.ndarray) -> None:
        """Give new rows the scale their stream had in training (at: its index there, -1: not in training)."""
        hit = at >= 0
        if self._stream_scaled and not hit.all() and not self._warned_unscaled:  # once: a fleet may add many
            self._warned_unscaled = True
            names = [self.streams[r] for r in rows[~hit][:3].tolist()]
            if self.learn_scale:
                log.info("stream(s) not in the training data of a model trained with --stream-scale (e.g. %s): "
                         "seen on the fleet's scale until each has learnt its own from %d readings (logged once)",
                         ", ".join(names), self.learn_scale)
            else:
                log.warning("stream(s) not in the training data of a model trained with --stream-scale (e.g. %s): "
                            "seen on the fleet's scale, which the model never saw, so expect high scores; retrain "
                            "with them in the data, or set scoring.learn_scale_readings (logged once)",
                            ", ".join(names))
        if hit.any():
            r = torch.as_tensor(rows[hit], device=self.device)
            i = torch.as_tensor(at[hit], device=self.device)
            self.rel_shift[r], self.rel_scale[r], self.rel_known[r] = self._rel_shift[i], self._rel_scale[i], True

    @torch.inference_mode()
    def last_times(self) -> np.ndarray:
        """The newest event time of every stream, by row (-inf: none yet)."""
        return self.last_ts[: len(self.streams)].cpu().numpy().copy()

    @torch.inference_mode()
    def readings_seen(self) -> np.ndarray:
        """How many readings every stream has had since its last reset, by row."""
        return self.count[: len(self.streams)].cpu().numpy().copy()

    @torch.inference_mode()
    def reset(self, rows: np.ndarray | torch.Tensor) -> None:
        """Forget the model state and window of these rows (new stream, or back after a gap).

        The last event time (late readings stay late), the adaptation levels and a learnt scale are kept.
        """
        if len(rows) == 0:
            return
        rt = torch.as_tensor(rows, device=self.device)
        for name, (_, fill) in self._tables.items():
            if name not in self._KEPT:
                self._put(name, rt, fill)

    def _put(self, name: str, rt: torch.Tensor, value: torch.Tensor | float) -> None:
        """Set rows rt of table `name` to a scalar or to per-row values (rows first, h and c too)."""
        table = getattr(self, name)
        if name in ("h", "c"):
            table[:, rt] = value.transpose(0, 1) if isinstance(value, torch.Tensor) else value
        else:
            table[rt] = value

    @torch.inference_mode()
    def export_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The state of these streams as numpy arrays, rows first: LSTM h and c, window, counters."""
        rt = torch.as_tensor(rows, device=self.device)
        return {name: (getattr(self, name)[:, rt].transpose(0, 1) if name in ("h", "c") else getattr(self, name)[rt])
                .cpu().numpy() for name in self._tables}

    @torch.inference_mode()
    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set these streams' state (None: fresh, as a new stream); return the fields that did not fit."""
        if len(rows) == 0:
            return []
        rt = torch.as_tensor(rows, device=self.device)
        for name, (_, fill) in self._tables.items():
            self._put(name, rt, fill)
        if state is None:
            return []
        misfit = [k for k, shape in self._shapes().items()
                  if (k in state or k not in self._ADDED) and (k not in state or state[k].shape != (len(rows), *shape))]
        if misfit:  # another model's state (window, layers or features differ): the streams start fresh
            return misfit
        for name, (dtype, _) in self._tables.items():
            if name in state:
                self._put(name, rt, torch.as_tensor(state[name], device=self.device).to(dtype))
        if self.learn_scale:
            self._learnt_scales(rt, restart=False)  # a scale learnt before the checkpoint holds again
        return []

    # ----- scoring ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_batch(self, readings: Readings, rows: np.ndarray | None = None) -> EngineResult:
        """Advance every stream in the batch and score the windows it completes (`rows`: from rows_for)."""
        n = len(readings)
        if n == 0:
            return EngineResult(WindowScores.concat([], self.n_features), np.empty(0, np.int64),
                                np.empty(0, object), 0)
        rows = self.rows_for(readings.streams) if rows is None else rows
        dev = self.device
        rows_t = torch.as_tensor(rows, device=dev)
        ts_t = torch.as_tensor(readings.ts, dtype=torch.float64, device=dev)
        order, dropped, reason = self._in_order(rows_t, ts_t)
        if len(order) == 0:
            return EngineResult(WindowScores.concat([], self.n_features), dropped, reason, 0)

        r, t = rows_t[order], ts_t[order]
        first = _group_starts(r)
        prev = torch.empty_like(t)
        prev[1:] = t[:-1]
        prev[first] = self.last_ts[r[first]]
        gap = (t - prev) > self.max_gap_s
        mid = gap & ~first
        cum = torch.cumsum(mid, 0)
        seg = cum - cum[first.nonzero().squeeze(1)][torch.cumsum(first, 0) - 1]  # gaps so far within the stream
        resets = int(torch.unique(r[gap]).numel())
        self.reset(r[first & gap])
        values = torch.as_tensor(readings.values, dtype=torch.float32, device=dev)
        n_seg = int(seg.max()) + 1
        if n_seg == 1:
            parts = [self._advance(order, r, t, values)]
        else:
            parts = []
            for g in range(n_seg):
                sel = seg == g
                if g:
                    self.reset(r[sel & mid])
                parts.append(self._advance(order[sel], r[sel], t[sel], values))
        return EngineResult(WindowScores.concat(parts, self.n_features), dropped, reason, resets)

    @torch.inference_mode()
    def admit(self, rows: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which readings come after their stream's last one: a keep mask, and the dropped ones with why.

        A reading at or before the newest event time of its stream (in the table or earlier in the batch) is
        `late`, or `duplicate_timestamp` when the time is equal; it is never scored.
        """
        _, dropped, reason = self._in_order(torch.as_tensor(rows, device=self.device),
                                            torch.as_tensor(ts, dtype=torch.float64, device=self.device))
        keep = np.ones(len(ts), bool)
        keep[dropped] = False
        return keep, dropped, reason

    def _in_order(self, rows: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Readings kept, sorted by row then time; and those dropped as late or duplicate (host), with the reason."""
        order = torch.argsort(ts, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]
        r, t = rows[order], ts[order]
        prev = torch.empty_like(t)
        prev[1:] = t[:-1]
        prev[_group_starts(r)] = -math.inf
        prev = torch.maximum(prev, self.last_ts[r])
        keep = t > prev
        if bool(keep.all()):
            return order, np.empty(0, np.int64), np.empty(0, object)
        duplicate = (t == prev)[~keep].cpu().numpy()
        reason = np.where(duplicate, "duplicate_timestamp", "late").astype(object)
        return order[keep], order[~keep].cpu().numpy(), reason

    def _advance(self, idx: torch.Tensor, r: torch.Tensor, t: torch.Tensor, values: torch.Tensor) -> WindowScores:
        """Advance rows r (sorted, grouped) over their readings idx, return the windows they complete."""
        W, F, hop, dev = self.window, self.n_features, self.hop, self.device
        u, counts = torch.unique_consecutive(r, return_counts=True)
        start = torch.cumsum(counts, 0) - counts
        R, T = len(u), int(counts.max())
        gid = torch.repeat_interleave(torch.arange(R, device=dev), counts)
        j = torch.arange(len(r), device=dev) - start[gid]

        pad = torch.full((R, T + 1, F), math.nan, dtype=torch.float32, device=dev)
        pad[:, 0] = self.last_val[u]
        xin = raw = (values[idx] - self._mean) / self._std
        if self._stream_scaled:  # known streams on their own scale (a stream not in training: rel_* are 0 and 1)
            xin = (xin - self.rel_shift[r]) / self.rel_scale[r]
        pad[gid, j + 1] = xin
        present = ~torch.isnan(pad)
        pos = torch.where(present, torch.arange(T + 1, device=dev)[None, :, None], 0)
        filled = pad.gather(1, pos.cummax(dim=1).values)  # missing values hold the last present value
        ts_pad = torch.zeros((R, T), dtype=torch.float64, device=dev)
        ts_pad[gid, j] = t

        x, m = filled[:, 1:], present[:, 1:]
        out, hn, cn = self._encode(x if self._model_sees is None else x * self._model_sees, counts, u)
        ext = torch.cat([self.buf[u], x], dim=1)
        mext = torch.cat([self.bmask[u], m], dim=1)
        text = torch.cat([self.bts[u], ts_pad], dim=1)
        steps = torch.arange(T, device=dev)
        nth = self.count[u][:, None] + steps[None, :] + 1
        fext = self._forecast_errors(u, out, x, m, nth, steps < counts[:, None]) if "fz" in self._tables else None
        boundary = (steps[None, :] < counts[:, None]) & (nth % hop == 0) & (nth >= W)
        gi, gj = boundary.nonzero(as_tuple=True)
        if len(gi):
            win = ext.unfold(1, W, 1)[gi, gj + 1].transpose(1, 2)
            wmask = mext.unfold(1, W, 1)[gi, gj + 1].transpose(1, 2)
            recon = self._decode(out[gi, gj])
            scale = self.level[u[gi]] if self.adapt_rate else None
            score, per_feature, share, direction, zmean = score_windows(win, recon, wmask, self.spec, hop, scale)
            broken = None
            if self.spec.relations is not None:
                score, share, direction, broken = self._relations(u[gi], win[:, -hop:], wmask[:, -hop:], score,
                                                                  share, direction)
            if fext is not None:
                score, share, direction = self._forecast(fext.unfold(1, hop, 1)[gi, gj + 1].transpose(1, 2), score,
                                                         share, direction)
            if self.spec.smooth_decay > 0:
                score, share = self._smooth(u[gi], zmean, score, share)
            spike = torch.zeros(len(gi), dtype=torch.bool, device=dev)
            if self.spec.spike_level is not None:
                spike, score, share, direction = self._spikes(win, wmask, score, share, direction)
            if self.adapt_rate:
                base = self.spec.adapt_base
                self._adapt(u[gi], per_feature * scale / (1.0 if base is None else base),
                            broken if self.adapt_gate else None)
            if self.finetune_rate:
                self._finetune(out[gi, gj], win, wmask, score)
            fields = {"rows": u[gi], "score": score.double(), "feature_score": per_feature, "share": share,
                      "direction": direction.to(torch.int8), "start_ts": text[gi, gj + 1], "end_ts": text[gi, gj + W],
                      "reading": idx[start[gi] + gj], "nth": nth[gi, gj], "spike": spike}
            result = WindowScores(**{name: v.cpu().numpy() for name, v in fields.items()})  # to the host
        else:
            result = WindowScores.concat([], F)

        keep = counts[:, None] + torch.arange(W, device=dev)[None, :]
        self.h[:, u], self.c[:, u] = hn, cn
        self.buf[u] = ext.gather(1, keep[..., None].expand(R, W, F))
        self.bmask[u] = mext.gather(1, keep[..., None].expand(R, W, F))
        self.bts[u] = text.gather(1, keep)
        if fext is not None:
            kf = counts[:, None] + torch.arange(hop, device=dev)[None, :]
            self.fz[u] = fext.gather(1, kf[..., None].expand(R, hop, F))
        self.count[u] += counts
        self.last_ts[u] = t[start + counts - 1]
        self.last_val[u] = filled[torch.arange(R, device=dev), counts]
        if self.learn_scale:
            self._learn(u, gid, raw)
        return result

    def _finetune(self, z: torch.Tensor, win: torch.Tensor, wmask: torch.Tensor, score: torch.Tensor) -> None:
        """One Adam step of the decoder towards the windows win (K, W, F; wmask: present) scored below the tuning
        level, from their encoder outputs z (K, H)."""
        keep = score < self._tune_below
        if not bool(keep.any()):
            return
        with torch.inference_mode(False), torch.enable_grad():
            z, x, m = z[keep].float().clone(), win[keep].clone(), wmask[keep].float().clone()  # out of inference
            if self._model_sees is not None:
                m = m * self._model_sees
            loss = ((self.model.decode(z) - x) ** 2 * m).sum() / m.sum().clamp(min=1)
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()

    def _learn(self, u: torch.Tensor, gid: torch.Tensor, xin: torch.Tensor) -> None:
        """Add the new readings xin (scaler units, NaN: missing) of the rows u still learning their scale (gid:
        each reading's index into u) to their sums; rows that reach `learn_scale` readings take their scale."""
        learning = ~self.rel_known[u]
        if not bool(learning.any()):
            return
        x = xin.double()
        seen = ~torch.isnan(x) & learning[gid][:, None]
        x = torch.where(seen, x, 0.0)
        for name, v in (("ls_n", seen.double()), ("ls_sum", x), ("ls_sq", x * x)):
            table = getattr(self, name)
            table[u] = table[u].index_add(0, gid, v)
        self._learnt_scales(u[learning])

    def _learnt_scales(self, rows: torch.Tensor, restart: bool = True) -> None:
        """Give rows not known to the model that have `learn_scale` readings their learnt scale (the training
        streams' rule, relations.stream_scales: spread floored at 1e-3 of the mean; a feature with fewer than two
        readings, or constant in training, keeps the fleet's); with `restart`, a stream-scaled model's window of
        such a row starts over (not on a restore: the checkpointed window is already on the learnt scale)."""
        rows = rows[~self.rel_known[rows] & (self.ls_n[rows].amax(dim=1) >= self.learn_scale)]
        if not len(rows):
            return
        n = self.ls_n[rows]
        mean = self.ls_sum[rows] / n.clamp(min=1)
        std = (self.ls_sq[rows] / n.clamp(min=1) - mean**2).clamp(min=0).sqrt()
        mu, sd = self._mean.double(), self._std.double()  # to the sensors' units for the floor, and back
        floor = (1e-3 * (mean * sd + mu).abs()).clamp(min=1e-6) / sd
        use = n >= 2
        if self.spec.constant is not None:
            use &= ~self.spec.constant
        self.rel_shift[rows] = torch.where(use, mean, 0.0).float()
        self.rel_scale[rows] = torch.where(use, torch.maximum(std, floor), 1.0).float()
        self.rel_known[rows] = True
        if self._stream_scaled and restart:  # the window so far is on the fleet's scale: start it over on its own
            self.reset(rows)

    def _encode(self, x: torch.Tensor, counts: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The encoder over rows u's new readings x, CHUNK streams per call: outputs and new float32 (h, c)."""
        outs, hs, cs = [], [], []
        for a in range(0, len(u), CHUNK):
            b = slice(a, a + CHUNK)
            with self._mixed():
                out, (h, c) = self.model.encode(x[b], counts[b], (self.h[:, u[b]], self.c[:, u[b]]))
            outs.append(out)
            hs.append(h.float())
            cs.append(c.float())
        if len(outs) == 1:
            return outs[0], hs[0], cs[0]
        return torch.cat(outs), torch.cat(hs, dim=1), torch.cat(cs, dim=1)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstructed windows (K, W, F) in float32 from encoder outputs z (K, H), CHUNK windows per call."""
        parts = []
        for a in range(0, len(z), CHUNK):
            with self._mixed():
                parts.append(self.model.decode(z[a : a + CHUNK]).float())
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _mixed(self) -> torch.autocast:
        """The autocast context of the precision in use (a no-op for float32)."""
        return _mixed(self.device, self.precision)

    def _relations(self, rows: torch.Tensor, x: torch.Tensor, present: torch.Tensor, score: torch.Tensor,
                   share: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The windows' scores, shares and directions with the relation score taking over wherever it is the
        larger (only streams the model was trained on have a scale for it), and which features' own relation
        parts reach the adaptation gate (K, F)."""
        rel = self.spec.relations
        assert rel is not None
        u = x if self._stream_scaled else (x - self.rel_shift[rows][:, None]) / self.rel_scale[rows][:, None]
        raw, part, zmean = relation_scores(u, present, rel)
        known = self.rel_known[rows]
        rscore = torch.where(known, raw * rel.weight, 0.0).to(score.dtype)
        broken = known[:, None] & (part * rel.weight >= self._gate_level)
        wins = rscore > score
        if self._rel_attributes:
            share = torch.where(wins[:, None], part / part.sum(dim=1, keepdim=True).clamp(min=1e-12), share)
            direction = torch.where(wins[:, None], torch.sign(zmean).to(direction.dtype), direction)
        return torch.maximum(score, rscore), share, direction, broken

    def _forecast_errors(self, u: torch.Tensor, out: torch.Tensor, x: torch.Tensor, m: torch.Tensor,
                         nth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Rows u's forecast errors (R, hop + T, F): the `hop` kept before this batch, then each new reading x
        against the forecast from the encoder's output before it (NaN where not counted: detector.forecast)."""
        spec = self.spec
        assert spec.forecast_std is not None
        prev = torch.cat([self.h[-1, u][:, None], out[:, :-1].float()], dim=1)  # the summary before each reading
        with self._mixed():
            pred = self.model.predict_next(prev).float()
        counted = m & (valid & (nth >= 2))[..., None]  # the first reading of a stream has nothing before it
        if spec.constant is not None:
            counted = counted & ~spec.constant
        return torch.cat([self.fz[u], forecast_z(pred, x, counted, spec.forecast_std)], dim=1)

    def _forecast(self, z: torch.Tensor, score: torch.Tensor, share: torch.Tensor,
                  direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The windows' scores, shares and directions with the forecast score (of their newest readings' errors
        z, (K, hop, F)) taking over wherever it is the larger."""
        raw, part, zmean = forecast_scores(z)
        fscore = (raw * self.spec.forecast_weight).to(score.dtype)
        wins = fscore > score
        share = torch.where(wins[:, None], part / part.sum(dim=1, keepdim=True).clamp(min=1e-12), share)
        direction = torch.where(wins[:, None], torch.sign(zmean).to(direction.dtype), direction)
        return torch.maximum(score, fscore), share, direction

    def _spikes(self, win: torch.Tensor, wmask: torch.Tensor, score: torch.Tensor, share: torch.Tensor,
                direction: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Which windows hold a spike (K,); their scores (with the spike score's part where the model has a weight
        for it), shares and directions, the spiking sensors' own where they do."""
        spec = self.spec
        assert spec.spike_noise is not None and spec.spike_level is not None
        ratio, sign = spike_parts(win, wmask, spec.spike_noise, spec.spike_level, self.hop)
        hit = ratio >= 1.0
        spike = hit.any(dim=1)
        part = torch.where(hit, ratio * ratio, 0.0)
        share = torch.where(spike[:, None], part / part.sum(dim=1, keepdim=True).clamp(min=1e-12), share)
        direction = torch.where(spike[:, None] & hit, sign.to(direction.dtype), direction)
        if spec.spike_weight > 0:
            score = torch.maximum(score, (ratio.amax(dim=1) ** 2 * spec.spike_weight).to(score.dtype))
        return spike, score, share, direction

    def _smooth(self, rows: torch.Tensor, zmean: torch.Tensor, score: torch.Tensor,
                share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance each stream's smoothed error over its windows in order; return the windows' scores and shares
        with the smoothed score taking over wherever it is the larger (score.smooth_score)."""
        first = _group_starts(rows)
        rank = torch.arange(len(rows), device=rows.device) - first.nonzero().squeeze(1)[torch.cumsum(first, 0) - 1]
        ewma = torch.empty_like(zmean)
        for step in range(int(rank.max()) + 1):
            w = rank == step
            r = rows[w]
            self.ewma[r] = smooth_update(self.ewma[r], zmean[w], self.spec.smooth_decay)
            ewma[w] = self.ewma[r]
        sscore, part = smooth_score(ewma, self.spec)
        wins = sscore > score
        share = torch.where(wins[:, None], part / part.sum(dim=1, keepdim=True).clamp(min=1e-12), share)
        return torch.maximum(score, sscore), share

    def _adapt(self, rows: torch.Tensor, level: torch.Tensor, frozen: torch.Tensor | None = None) -> None:
        """Move each stream's per-feature error level towards what its windows show, never below 1.

        A feature whose errors run higher than in calibration (a temperature that drifts with the season)
        slowly stops dominating the score, while a fault that appears within a few half-lives stands out.
        Each window pulls the level towards its own error at most as far as four times the current level,
        so one extreme window moves it little. Where `frozen` (K, F) is set, that window leaves the level as it is,
        and a feature that does not adapt (adapt_features) keeps its level of 1.
        """
        first = _group_starts(rows)
        rank = torch.arange(len(rows), device=rows.device) - first.nonzero().squeeze(1)[torch.cumsum(first, 0) - 1]
        a = self.adapt_rate
        if self._adapt_fixed is not None:
            frozen = self._adapt_fixed.expand_as(level) if frozen is None else frozen | self._adapt_fixed
        for step in range(int(rank.max()) + 1):
            w = rank == step
            r = rows[w]
            cur = self.level[r]
            new = torch.clamp(cur + a * (torch.minimum(level[w], 4.0 * cur) - cur), min=1.0)
            self.level[r] = new if frozen is None else torch.where(frozen[w], cur, new)


def score_spec(m: Manifest, device: torch.device | str = "cpu") -> ScoreSpec:
    """The scoring statistics and options of a model's manifest, as tensors on `device`."""
    as_t = partial(torch.tensor, dtype=torch.float32, device=device)
    const = None
    if m.constant_features:
        const = torch.tensor([f in m.constant_features for f in m.features], dtype=torch.bool, device=device)
    precision = as_t(m.error_precision) if m.covariance == "full" else None
    smooth = m.smooth_halflife > 0 and len(m.smooth_std) == len(m.features)
    rel = None
    if m.relation_weight > 0:
        rel = Relations(as_t(m.relation_lin), as_t(m.relation_quad), as_t(m.relation_bias), as_t(m.relation_resid_std),
                        torch.tensor(m.relation_use, dtype=torch.bool, device=device), m.relation_weight)
    forecast = m.forecast_weight > 0
    spikes = len(m.spike_level) == len(m.features) and any(v > 0 for v in m.spike_level)
    return ScoreSpec(as_t(m.error_mean), as_t(m.error_std), m.score_aggregate, precision, const, m.constant_z2,
                     smooth_decay(m.hop, m.smooth_halflife) if smooth else 0.0,
                     as_t(m.smooth_std) if smooth else None, m.smooth_weight, rel,
                     as_t(m.forecast_std) if forecast else None, m.forecast_weight,
                     as_t(m.adapt_base) if len(m.adapt_base) == len(m.features) else None,
                     as_t(m.spike_noise) if spikes else None, as_t(m.spike_level) if spikes else None,
                     m.spike_weight if spikes else 0.0)


def _group_starts(r: torch.Tensor) -> torch.Tensor:
    first = torch.ones(len(r), dtype=torch.bool, device=r.device)
    first[1:] = r[1:] != r[:-1]
    return first
