"""Dead letters: a rejected record's bytes and why, cut to fit the dead-letter topic when they would not.

A dead letter carries the record's key and value as they came, and headers `reason`, `detail` and `source`
(`topic[partition]@offset`). When key, value and headers together would not fit `limit` (the smaller of the
producer's largest request and the dead-letter topic's `max.message.bytes`), the value is cut to the prefix that
fits and headers `value_bytes` (the full size, decimal) and `value_sha256` (hex digest of the full value) are
added; a key over 1 KiB is cut to 1 KiB likewise, with `key_bytes` and `key_sha256`. So a dead letter is
never refused for its size (where the limit is 4 KiB or more: Kafka's default is 1 MiB), and a record too large
for the dead-letter topic cannot stop the daemon.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from consumers.base import Record

__all__ = ["DeadLetter", "dead_letter", "FRAMING_BYTES", "KEY_PREFIX_BYTES"]

FRAMING_BYTES = 256
"""Bytes kept free for the record batch's and the record's own framing (61 and at most about 50 bytes)."""

KEY_PREFIX_BYTES = 1024
"""A key longer than this is cut to this many bytes when the dead letter would not fit whole."""


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """One record for the dead-letter topic."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    cut: bool  # the key or value was cut to fit


def _size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """Bytes of a record with these parts, framing included (each header's lengths as 5-byte varints, at most)."""
    return FRAMING_BYTES + len(key or b"") + len(value) + sum(len(k) + len(v) + 10 for k, v in headers)


def dead_letter(rec: Record, reason: str, detail: str, limit: int) -> DeadLetter:
    """The dead letter of `rec`, at most `limit` bytes with its framing.

    >>> rec = Record("in", 2, 7, b"p1", b"x" * 5000)
    >>> whole = dead_letter(rec, "oversize", "too big", 1 << 20)
    >>> whole.value == rec.value, whole.cut, [k for k, _ in whole.headers]
    (True, False, ['reason', 'detail', 'source'])
    >>> cut = dead_letter(rec, "oversize", "too big", 1000)
    >>> cut.value == rec.value[:len(cut.value)], len(cut.value) < 1000, dict(cut.headers)["value_bytes"]
    (True, True, b'5000')
    """
    headers = [("reason", reason.encode()), ("detail", detail.encode()[:1000]),
               ("source", f"{rec.topic}[{rec.partition}]@{rec.offset}".encode())]
    key, value = rec.key, rec.value or b""
    if _size(key, value, headers) <= limit:
        return DeadLetter(key, value, headers, False)
    if key is not None and len(key) > KEY_PREFIX_BYTES:
        headers += [("key_bytes", str(len(key)).encode()), ("key_sha256", hashlib.sha256(key).hexdigest().encode())]
        key = key[:KEY_PREFIX_BYTES]
    if _size(key, value, headers) > limit:
        headers += [("value_bytes", str(len(value)).encode()),
                    ("value_sha256", hashlib.sha256(value).hexdigest().encode())]
        value = value[: max(limit - _size(key, b"", headers), 0)]
    return DeadLetter(key, value, headers, True)
