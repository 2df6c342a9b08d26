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
from dataclasses import dataclass

import numpy as np
import orjson
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from detector.pipeline import Pipeline

__all__ = ["FORMAT", "Checkpoint", "encode", "decode", "snapshot", "restore", "RestoreReport"]

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


def snapshot(pipeline: Pipeline, rows: np.ndarray) -> list[Checkpoint]:
    """Checkpoints of these stream rows (those never seen on an input partition are left out)."""
    if len(rows) == 0:
        return []
    state = pipeline.export_rows(rows)
    topic_idx, parts = state["pipeline.in_topic"], state["pipeline.in_partition"]
    version = pipeline.manifest.model_version or pipeline.manifest.name
    out = []
    for i, stream in enumerate(pipeline.streams_at(rows)):
        if topic_idx[i] < 0:
            continue
        topic = pipeline.topics[int(topic_idx[i])]
        value = encode(stream, {k: v[i : i + 1] for k, v in state.items()},
                       {"model_version": version, "topic": topic, "partition": str(int(parts[i]))})
        out.append(Checkpoint(stream, topic, int(parts[i]), value))
    return out


@dataclass(slots=True)
class RestoreReport:
    """What a restore did: streams restored, records skipped (with why), fields that did not fit."""

    restored: int = 0
    skipped: dict[str, int] | None = None
    misfit: list[str] | None = None


def restore(pipeline: Pipeline, values: list[bytes], only: set[tuple[str, int]] | None = None) -> RestoreReport:
    """Load checkpoint records into the pipeline; a record that cannot be used leaves its stream fresh.

    With `only`, records of streams whose input (topic, partition) is not in it are skipped.
    """
    report = RestoreReport(skipped={}, misfit=[])
    version = pipeline.manifest.model_version or pipeline.manifest.name
    groups: dict[tuple, list[tuple[str, dict[str, np.ndarray]]]] = {}
    for value in values:
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
