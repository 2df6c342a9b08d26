"""Per-stream checkpoints: the whole state of one stream as one safetensors record, keyed by its stream id.

A checkpoint record's value is a safetensors file (no pickle: loading it cannot run code) holding every
per-stream array of every stage (`engine.h`, `alerts.state`, `threshold.0.buf`, ...), each with a leading
axis of 1, and in its metadata the format version, the stream id, the model version and the input
(topic, partition) the stream's readings arrive on. The daemon writes one record per changed stream at
each commit to a compacted topic co-partitioned with the input, so the topic keeps the newest state of
every stream and a partition of it holds exactly the streams of the same input partition.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import numpy as np
import orjson
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from consumers.base import Stopped
from detector.pipeline import Pipeline

__all__ = ["FORMAT", "Checkpoint", "encode", "encode_many", "decode", "snapshot", "restore", "RestoreReport"]

FORMAT = "detector-state/1"


@dataclass(slots=True, frozen=True)
class Checkpoint:
    """One stream's state ready to send: its key, the input partition it belongs to, and the value."""

    stream: str
    topic: str
    partition: int
    value: bytes


def encode(stream: str, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """The safetensors bytes of one stream's arrays (each with a leading axis of 1) and metadata."""
    return st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                   metadata={"format": FORMAT, "stream": stream, **meta})


def decode(value: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Metadata and arrays of a checkpoint record; ValueError when it is not one this version can read."""
    if len(value) < 8:
        raise ValueError("not a safetensors record (shorter than its header)")
    (n,) = struct.unpack("<Q", value[:8])
    if n > len(value) - 8:
        raise ValueError("not a safetensors record (header longer than the record)")
    try:
        meta = orjson.loads(value[8 : 8 + n]).get("__metadata__") or {}
        arrays = st_load(value)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"not a safetensors record ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {meta.get('format')!r}, this version reads {FORMAT!r}")
    return meta, arrays


_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
           "uint8": "U8", "bool": "BOOL"}


def encode_many(arrays: dict[str, np.ndarray], metas: list[dict[str, str]]) -> list[bytes]:
    """One safetensors record per row of `arrays` (all rows share a layout), with each row's metadata.

    The same bytes as `encode` would give row by row, built with one copy of the data: the header's tensor
    part is the same for every row, and each row's data is one contiguous slice of a (rows, bytes) matrix.
    """
    n = len(metas)
    names = sorted(arrays)
    info, offset, parts = {}, 0, []
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        per_row = a[0].nbytes if n else 0
        info[name] = {"dtype": _DTYPES[a.dtype.name], "shape": [1, *a.shape[1:]],
                      "data_offsets": [offset, offset + per_row]}
        offset += per_row
        parts.append(a.reshape(n, -1).view(np.uint8).reshape(n, per_row))
    data = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.uint8)
    tensors = orjson.dumps(info)[1:-1]  # '"name":{...},...' without the braces
    out = []
    for i, meta in enumerate(metas):
        header = b'{"__metadata__":' + orjson.dumps({"format": FORMAT, **meta}) + b"," + tensors + b"}"
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        out.append(struct.pack("<Q", len(header)) + header + data[i].tobytes())
    return out


def snapshot(pipeline: Pipeline, rows: np.ndarray) -> list[Checkpoint]:
    """Checkpoints of these stream rows (those never seen on an input partition are left out)."""
    if len(rows) == 0:
        return []
    state = pipeline.export_rows(rows)
    topic_idx, parts = state["pipeline.in_topic"], state["pipeline.in_partition"]
    seen = np.flatnonzero(topic_idx >= 0)
    if len(seen) < len(rows):
        state = {k: v[seen] for k, v in state.items()}
        rows, topic_idx, parts = rows[seen], topic_idx[seen], parts[seen]
    version = pipeline.manifest.model_version or pipeline.manifest.name
    streams = pipeline.streams_at(rows)
    topics = [pipeline.topics[int(t)] for t in topic_idx.tolist()]
    metas = [{"stream": s, "model_version": version, "topic": t, "partition": str(p)}
             for s, t, p in zip(streams, topics, parts.tolist(), strict=True)]
    values = encode_many(state, metas)
    return [Checkpoint(s, t, int(p), v) for s, t, p, v in zip(streams, topics, parts.tolist(), values, strict=True)]


@dataclass(slots=True)
class RestoreReport:
    """What a restore did: streams restored, records skipped (with why), fields that did not fit."""

    restored: int = 0
    skipped: dict[str, int] | None = None
    misfit: list[str] | None = None


def restore(pipeline: Pipeline, values: list[bytes], only: set[tuple[str, int]] | None = None,
            stop: threading.Event | None = None) -> RestoreReport:
    """Load checkpoint records into the pipeline; a record that cannot be used leaves its stream fresh.

    With `only`, records of streams whose input (topic, partition) is not in it are skipped. Stopped when `stop`
    is set meanwhile (checked every 512 records: decoding 100,000 takes seconds), with the pipeline half-restored.
    """
    report = RestoreReport(skipped={}, misfit=[])
    version = pipeline.manifest.model_version or pipeline.manifest.name
    groups: dict[tuple, list[tuple[str, dict[str, np.ndarray]]]] = {}
    for i, value in enumerate(values):
        if stop is not None and i % 512 == 0 and stop.is_set():
            raise Stopped(f"restoring checkpoints ({i} of {len(values)} read)")
        try:
            meta, arrays = decode(value)
        except ValueError:
            report.skipped["unreadable"] = report.skipped.get("unreadable", 0) + 1
            continue
        if only is not None and (meta.get("topic"), int(meta.get("partition", -1))) not in only:
            report.skipped["other_partition"] = report.skipped.get("other_partition", 0) + 1
            continue
        if meta.get("model_version") != version:
            report.skipped["other_model"] = report.skipped.get("other_model", 0) + 1
            continue
        topic = meta.get("topic", "")
        if topic not in pipeline.topics:
            pipeline.topics.append(topic)
        arrays["pipeline.in_topic"] = np.array([pipeline.topics.index(topic)], np.int64)  # the writer's index
        sig = tuple(sorted((k, v.shape, v.dtype.str) for k, v in arrays.items()))
        groups.setdefault(sig, []).append((meta["stream"], arrays))
    for items in groups.values():  # streams with the same layout are restored in one call
        streams = np.array([s for s, _ in items], dtype=object)
        rows = pipeline.engine.rows_for(streams)
        state = {k: np.concatenate([a[k] for _, a in items]) for k in items[0][1]}
        report.misfit = sorted(set(report.misfit) | set(pipeline.import_rows(rows, state)))
        report.restored += len(items)
    return report
