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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import orjson
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from consumers.base import Stopped
from detector.pipeline import Pipeline

__all__ = ["FORMAT", "Checkpoint", "encode", "encode_many", "decode", "snapshot", "restore", "restore_chunks",
           "RestoreReport"]

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


def _header(value: bytes) -> tuple[dict, int]:
    """A record's safetensors header as a dict, and where its data starts; ValueError when it has none."""
    if len(value) < 8:
        raise ValueError("not a safetensors record (shorter than its header)")
    (n,) = struct.unpack("<Q", value[:8])
    if n > len(value) - 8:
        raise ValueError("not a safetensors record (header longer than the record)")
    try:
        header = orjson.loads(value[8 : 8 + n])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a safetensors record ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("not a safetensors record (its header is not an object)")
    return header, 8 + n


def decode(value: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Metadata and arrays of a checkpoint record; ValueError when it is not one this version can read."""
    header, _ = _header(value)
    meta = header.get("__metadata__") or {}
    try:
        arrays = st_load(value)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"not a safetensors record ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"this version reads {FORMAT!r}")
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
    also_restored: int = 0  # into the model a promotion replaced (restore_chunks' `also`)


_NP = {v: np.dtype(k) for k, v in _DTYPES.items()}


_META_OPEN = b'{"__metadata__":{'


def _split_written(value: bytes) -> tuple[dict, bytes, int] | None:
    """`_split`'s metadata, layout and data start for a header laid out as `encode_many` writes it; None for any
    other (or a broken) header."""
    if value[8:8 + len(_META_OPEN)] != _META_OPEN:
        return None
    (n,) = struct.unpack("<Q", value[:8])
    first = 8 + len(_META_OPEN) - 1  # the metadata object's opening brace
    end = value.find(b'},"', first, 8 + n) if n <= len(value) - 8 else -1
    if end < 0:
        return None
    try:
        meta = orjson.loads(value[first:end + 1])
    except orjson.JSONDecodeError:
        return None
    tensors = value[end + 2:8 + n].rstrip(b" ")
    return (meta, b"{" + tensors, 8 + n) if tensors.endswith(b"}") else None


def _split(value: bytes) -> tuple[dict[str, str], bytes, int]:
    """A record's metadata, the tensor part of its header (the layout: equal bytes for equal layouts) and where
    its data starts; ValueError when it is not a checkpoint this version can read.

    Records written by `encode_many` (every checkpoint the daemon writes) put a flat metadata object of strings
    first, so it ends at the first `},"` (a quote inside a JSON string is escaped): only that object is parsed,
    and the tensor part is its writer's bytes as they are, the same for every record of a layout. Any other
    header is parsed whole and its tensor part written back with sorted keys.
    """
    fast = _split_written(value)
    if fast is not None:
        meta, layout, start = fast
    else:
        header, start = _header(value)
        meta = header.pop("__metadata__", None) or {}
        layout = orjson.dumps(header, option=orjson.OPT_SORT_KEYS)
    if not isinstance(meta, dict) or not isinstance(meta.get("stream"), str):
        raise ValueError("not a checkpoint (no stream id in its metadata)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {meta.get('format')!r}, this version reads {FORMAT!r}")
    return meta, layout, start


def _spans(layout: bytes) -> list[tuple[int, int, str, np.dtype, list[int]]]:
    """Each tensor of a layout as (start, end, name, dtype, shape), in data order; ValueError when the layout is not
    a complete, contiguous set of tensors with a leading axis of 1."""
    try:
        info = orjson.loads(layout)
        spans = sorted((int(t["data_offsets"][0]), int(t["data_offsets"][1]), name, _NP.get(t.get("dtype")),
                        t.get("shape")) for name, t in info.items())
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a checkpoint layout ({exc!r})") from None
    end = 0
    for a, b, name, dtype, shape in spans:
        if (dtype is None or not isinstance(shape, list) or not shape or shape[0] != 1
                or not all(isinstance(d, int) and d >= 0 for d in shape) or a != end
                or b - a != int(np.prod(shape)) * dtype.itemsize):
            raise ValueError(f"not a checkpoint layout (tensor {name!r})")
        end = b
    return spans


def _columns(spans: list[tuple[int, int, str, np.dtype, list[int]]],
             data: list[bytes] | list[memoryview]) -> dict[str, np.ndarray]:
    """The arrays of records that share one layout, rows first, from their data parts (each as long as the layout
    says), with one copy of the data in all."""
    end = spans[-1][1] if spans else 0
    block = np.frombuffer(b"".join(data), np.uint8).reshape(len(data), end)
    return {name: block[:, a:b].copy().view(dtype).reshape(len(data), *shape[1:]) for a, b, name, dtype, shape in spans}


CHUNK_ROWS = 4096
"""Records decoded into arrays at a time: memory beyond the restored rows stays a few tens of MB, and the
engine adds this many streams at once, not one fetch's worth. (At 100,000 streams of 6 KB, 8,192
peaked at 1.18 times the steady state and 4,096 at 1.15, for 0.3 s more in 3.5 s; docs/benchmarks.md.)"""


def _gathered(chunks: Iterable[list], at_least: int) -> Iterator[list]:
    """The chunks joined, in order, into lists of at least `at_least` items (the last one may be shorter).

    >>> [len(c) for c in _gathered([[1], [2, 3], [4], [5], [6]], 2)]
    [3, 2, 1]
    """
    held: list = []
    for chunk in chunks:
        held.extend(chunk)
        if len(held) >= at_least:
            yield held
            held = []
    if held:
        yield held


def restore(pipeline: Pipeline, values: list[bytes], only: set[tuple[str, int]] | None = None,
            stop: threading.Event | None = None) -> RestoreReport:
    """Load checkpoint records (one per stream) into the pipeline; a record that cannot be used leaves its stream
    fresh. Stopped when `stop` is set meanwhile (checked every 4,096 records), with the pipeline half-restored.
    See `restore_chunks`."""

    def chunks() -> Iterator[list[tuple[bytes | None, bytes | None]]]:
        for lo in range(0, len(values), 4096):
            if stop is not None and stop.is_set():
                raise Stopped(f"restoring checkpoints ({lo} of {len(values)} read)")
            yield [(None, v) for v in values[lo : lo + 4096]]

    return restore_chunks(pipeline, chunks(), only)


def restore_chunks(pipeline: Pipeline, chunks: Iterable[list[tuple[bytes | None, bytes | None]]],
                   only: set[tuple[str, int]] | None = None, also: Pipeline | None = None) -> RestoreReport:
    """Load a state topic's records, oldest first, as they are fetched: (key, value) chunks, value None for a
    tombstone. Each stream ends with the state of its key's newest record; where that record is a tombstone or
    cannot be used (unreadable, another model, with `only` another input partition than those given) the stream
    is fresh, as if never seen. With `also` (the model a promotion or rollback replaced), records of its model
    version are restored into it instead (`report.also_restored`), never into `pipeline`.

    Records are decoded in bulk: those with the same layout (every stream of one model and config) become one
    array per field, CHUNK_ROWS at a time, and one `import_rows` call sets them. So a restore holds one fetch of
    records beside the rows it fills, not the whole topic. To stop it, the chunks' source raises (Stopped)
    between two chunks; the pipeline is then half-restored.
    """
    report = RestoreReport(skipped={}, misfit=[])
    skipped = report.skipped
    held: set[str] = set()  # the streams restored into `pipeline` (into `also`: its own set)
    targets = {(p.manifest.model_version or p.manifest.name): (p, held if p is pipeline else set())
               for p in (also, pipeline) if p is not None}  # the live pipeline's wins a tie of versions
    layouts: dict[bytes, list | None] = {}  # a layout's tensors (None: not a layout this version reads)
    for chunk in _gathered(chunks, CHUNK_ROWS):
        newest: dict[bytes, bytes | None] = {}
        unkeyed: list[bytes] = []
        for key, value in chunk:
            if key is None:
                if value is not None:
                    unkeyed.append(value)
            else:
                newest.pop(key, None)  # keeps the newest last: the order of the chunk
                newest[key] = value
        groups: dict[tuple[str, bytes], tuple[list[str], list[int], list[memoryview]]] = {}
        gone: list[str] = []
        for key, value in [*newest.items(), *((None, v) for v in unkeyed)]:
            why = None
            if value is None:
                gone.append(key.decode(errors="replace"))  # type: ignore[union-attr]
                continue
            try:
                meta, layout, start = _split(value)
            except ValueError:
                why = "unreadable"
            else:
                if layout not in layouts:
                    try:
                        layouts[layout] = _spans(layout)
                    except ValueError:
                        layouts[layout] = None
                spans = layouts[layout]
                topic, partition = meta.get("topic", ""), str(meta.get("partition", "-1"))
                if (spans is None or len(value) - start != (spans[-1][1] if spans else 0)
                        or not partition.lstrip("-").isdigit()):
                    why = "unreadable"
                elif only is not None and (topic, int(partition)) not in only:
                    why = "other_partition"
                elif meta.get("model_version") not in targets:
                    why = "other_model"
            if why is not None:
                skipped[why] = skipped.get(why, 0) + 1
                if key is not None:
                    gone.append(key.decode(errors="replace"))
                continue
            target = targets[meta["model_version"]][0]
            if topic not in target.topics:
                target.topics.append(topic)
            streams, topics, data = groups.setdefault((meta["model_version"], layout), ([], [], []))
            streams.append(meta["stream"])
            topics.append(target.topics.index(topic))  # the writer's index is this pipeline's
            data.append(memoryview(value)[start:])  # no copy: joined once in _columns
        if gone:  # an older record of these streams was restored: they start fresh after all
            for target, into in targets.values():
                rows = target.engine.find(gone)
                target.release(rows[rows >= 0])
                into.difference_update(gone)
        for (version, layout), (streams, topics, data) in groups.items():
            target, into = targets[version]
            for other, other_held in targets.values():  # a stream's newer record of the other model wins
                if other is not target:
                    rows = other.engine.find(streams)
                    other.release(rows[rows >= 0])
                    other_held.difference_update(streams)
            for lo in range(0, len(streams), CHUNK_ROWS):
                part = slice(lo, lo + CHUNK_ROWS)
                state = _columns(layouts[layout], data[part])  # type: ignore[arg-type]
                state["pipeline.in_topic"] = np.array(topics[part], np.int64)
                rows = target.engine.rows_for(np.array(streams[part], dtype=object))
                report.misfit = sorted(set(report.misfit) | set(target.import_rows(rows, state)))
                into.update(streams[part])
    report.restored = len(held)
    if also is not None and also.manifest.model_version != pipeline.manifest.model_version:
        report.also_restored = len(targets[also.manifest.model_version or also.manifest.name][1])
    return report
