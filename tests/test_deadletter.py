"""Dead letters fit the dead-letter topic: whole when they can, else a prefix with the full size and digest."""

from __future__ import annotations

import hashlib

import pytest
from kafka.record.default_records import DefaultRecordBatchBuilder

from consumers.base import Record
from detector.deadletter import KEY_PREFIX_BYTES, dead_letter


def batch_bytes(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """kafka-python's upper bound of a one-record batch: what max_request_size and max.message.bytes see."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


@pytest.mark.parametrize("limit", [4_096, 100_000, 1_000_000])  # 4 KiB at least: topics take far more
@pytest.mark.parametrize("size", [0, 500, 5_000, 3_000_000])
@pytest.mark.parametrize("key", [None, b"m1", b"k" * 10_000])
def test_a_dead_letter_fits_its_limit_and_keeps_what_it_can(limit: int, size: int, key: bytes | None) -> None:
    value = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    letter = dead_letter(Record("in", 3, 99, key, value), "oversize", "d" * 5000, limit)
    headers = dict(letter.headers)
    assert batch_bytes(letter.key, letter.value, letter.headers) <= limit
    assert headers["reason"] == b"oversize" and headers["source"] == b"in[3]@99" and len(headers["detail"]) == 1000
    if not letter.cut:
        assert (letter.key, letter.value) == (key, value) and set(headers) == {"reason", "detail", "source"}
        return
    assert value.startswith(letter.value) and (letter.key is None) == (key is None)
    if letter.value != value:
        assert headers["value_bytes"] == str(size).encode()
        assert headers["value_sha256"] == hashlib.sha256(value).hexdigest().encode()
    if key is not None and letter.key != key:
        assert letter.key == key[:KEY_PREFIX_BYTES] and headers["key_bytes"] == str(len(key)).encode()
        assert headers["key_sha256"] == hashlib.sha256(key).hexdigest().encode()


def test_what_fits_is_sent_whole_and_the_rest_is_cut_to_nearly_the_limit() -> None:
    rec = Record("in", 0, 1, b"m1", b"v" * 900_000)
    assert not dead_letter(rec, "oversize", "", 1_000_000).cut
    letter = dead_letter(Record("in", 0, 1, b"m1", b"v" * 1_100_000), "oversize", "", 1_000_000)
    assert letter.cut and 999_000 < len(letter.value) < 1_000_000
