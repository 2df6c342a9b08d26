"""Decoding: every kind of bad input becomes a Reject with its reason; good readings are never lost."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from consumers.base import Record
from detector.decode import REASONS, Decoder
from tests.helpers import FEATURES, record

NOW = 1_700_000_000.0


@pytest.fixture
def decoder() -> Decoder:
    return Decoder(FEATURES, max_message_bytes=2000, max_future_s=3600)


GOOD = {"stream": "p1", "ts": NOW - 10, "values": {"temp": 1.0, "vibration": 2, "pressure": 3.5}}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty_value"),
        (b"", "empty_value"),
        (b"x" * 3000, "oversize"),
        (b"{not json", "bad_json"),
        (b"\x00\xff\xfe", "bad_json"),
        ([1, 2], "not_an_object"),
        ({"ts": NOW, "values": {"temp": 1}}, "missing_stream"),
        ({"stream": "", "ts": NOW, "values": {"temp": 1}}, "missing_stream"),
        ({"stream": 7, "ts": NOW, "values": {"temp": 1}}, "missing_stream"),
        ({"stream": "p", "values": {"temp": 1}}, "missing_timestamp"),
        ({"stream": "p", "ts": "yesterday", "values": {"temp": 1}}, "bad_timestamp"),
        ({"stream": "p", "ts": True, "values": {"temp": 1}}, "bad_timestamp"),
        ({"stream": "p", "ts": -5, "values": {"temp": 1}}, "bad_timestamp"),
        ({"stream": "p", "ts": NOW + 86400 * 365, "values": {"temp": 1}}, "future_timestamp"),
        ({"stream": "p", "ts": NOW, "values": [1, 2]}, "bad_values"),
        ({"stream": "p", "ts": NOW, "values": {"humidity": 1}}, "unknown_feature"),
        ({"stream": "p", "ts": NOW, "values": {"temp": "NaN"}}, "non_numeric_value"),
        ({"stream": "p", "ts": NOW, "values": {"temp": "71.2"}}, "non_numeric_value"),
        ({"stream": "p", "ts": NOW, "values": {"temp": True}}, "non_numeric_value"),
        ({"stream": "p", "ts": NOW, "values": {"temp": 1e300}}, "non_numeric_value"),
        ({"stream": "p", "ts": NOW, "values": {}}, "no_values"),
        ({"stream": "p", "ts": NOW, "values": {"temp": None}}, "no_values"),
        ({"stream": "p", "readings": []}, "no_values"),
        ({"stream": "p", "readings": [{"ts": NOW, "values": {"temp": 1}}, 5]}, "not_an_object"),
        # the columnar batched form
        ({"stream": "p", "readings": {"values": {"temp": [1]}}}, "missing_timestamp"),
        ({"stream": "p", "readings": {"ts": NOW, "values": {"temp": [1]}}}, "bad_timestamp"),
        ({"stream": "p", "readings": {"ts": [], "values": {"temp": []}}}, "no_values"),
        ({"stream": "p", "readings": {"ts": [NOW, True], "values": {"temp": [1, 2]}}}, "bad_timestamp"),
        ({"stream": "p", "readings": {"ts": [NOW, -5], "values": {"temp": [1, 2]}}}, "bad_timestamp"),
        ({"stream": "p", "readings": {"ts": [NOW, "soon"], "values": {"temp": [1, 2]}}}, "bad_timestamp"),
        ({"stream": "p", "readings": {"ts": [NOW, NOW + 86400 * 365], "values": {"temp": [1, 2]}}}, "future_timestamp"),
        ({"stream": "p", "readings": {"ts": [NOW], "values": [[1]]}}, "bad_values"),
        ({"stream": "p", "readings": {"ts": [NOW], "values": {"temp": 1}}}, "bad_values"),
        ({"stream": "p", "readings": {"ts": [NOW, NOW - 1], "values": {"temp": [1]}}}, "bad_values"),
        ({"stream": "p", "readings": {"ts": [NOW], "values": {"humidity": [1]}}}, "unknown_feature"),
        ({"stream": "p", "readings": {"ts": [NOW], "values": {"temp": ["71.2"]}}}, "non_numeric_value"),
        ({"stream": "p", "readings": {"ts": [NOW], "values": {"temp": [False]}}}, "non_numeric_value"),
        ({"stream": "p", "readings": {"ts": [NOW], "values": {"temp": [1e300]}}}, "non_numeric_value"),
        ({"stream": "p", "readings": {"ts": [NOW, NOW - 1], "values": {"temp": [1, None]}}}, "no_values"),
        ({"stream": "p" * 257, "ts": NOW, "values": {"temp": 1}}, "stream_id_too_long"),
        ({"stream": "\u00e9" * 129, "ts": NOW, "values": {"temp": 1}}, "stream_id_too_long"),  # 258 bytes of UTF-8
    ],
)
def test_bad_records_are_rejected_with_their_reason(decoder: Decoder, value: object, reason: str) -> None:
    rd, rejects = decoder.decode([record(GOOD, 0), record(value, 1), record(GOOD | {"ts": NOW - 5}, 2)], NOW)
    assert [(r.index, r.reason) for r in rejects] == [(1, reason)]
    assert reason in REASONS and rejects[0].detail
    assert list(rd.source) == [0, 2], "good records on either side are kept"


def test_values_timestamps_and_gaps(decoder: Decoder) -> None:
    recs = [
        record({"stream": "a", "ts": 1_699_999_000_000, "values": {"pressure": 3, "temp": 70.5}}),
        record({"stream": "b", "ts": "2023-11-14T22:00:00+00:00", "values": {"vibration": None, "temp": 1}}),
    ]
    rd, rejects = decoder.decode(recs, NOW)
    assert not rejects
    assert rd.ts.tolist() == [1_699_999_000.0, 1_699_999_200.0]
    assert rd.values[0].tolist()[0] == 70.5 and rd.values[0].tolist()[2] == 3.0
    assert math.isnan(rd.values[0, 1]) and math.isnan(rd.values[1, 1]) and math.isnan(rd.values[1, 2])
    assert rd.values.dtype == np.float32


def test_batched_form_carries_many_readings_of_one_stream(decoder: Decoder) -> None:
    msg = {"stream": "pump-9", "readings": [{"ts": NOW - 3 + i, "values": {"temp": float(i)}} for i in range(3)]}
    rd, rejects = decoder.decode([record(msg, 0)], NOW)
    assert not rejects
    assert rd.streams.tolist() == ["pump-9"] * 3 and rd.source.tolist() == [0, 0, 0]
    assert rd.values[:, 0].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("ts", [[NOW - 3, (NOW - 2) * 1000, NOW - 1],  # epoch numbers: checked all at once
                                [NOW - 3, (NOW - 2) * 1000, "2023-11-14T22:13:19+00:00"]])  # one by one
def test_columnar_batched_form_decodes_as_the_row_form(decoder: Decoder, ts: list) -> None:
    rows = [{"temp": 1.0, "pressure": 2}, {"temp": None, "pressure": 3.5}, {"vibration": 4}]
    row_form = {"stream": "pump-9", "readings": [{"ts": t, "values": v} for t, v in zip(ts, rows, strict=True)]}
    col_form = {"stream": "pump-9", "readings": {"ts": ts, "values": {
        "temp": [1.0, None, None], "pressure": [2, 3.5, None], "vibration": [None, None, 4]}}}
    decoded = []
    for msg in (row_form, col_form):
        rd, rejects = decoder.decode([record(GOOD, 0), record(msg, 1), record(GOOD | {"ts": NOW - 5}, 2)], NOW)
        assert not rejects
        decoded.append(rd)
    rows_, cols = decoded
    assert cols.source.tolist() == rows_.source.tolist() == [0, 1, 1, 1, 2]  # in record order
    assert cols.streams.tolist() == rows_.streams.tolist() == ["p1"] + ["pump-9"] * 3 + ["p1"]
    assert cols.ts.tolist() == rows_.ts.tolist() and cols.ts[1:4].tolist() == [NOW - 3, NOW - 2, NOW - 1]
    np.testing.assert_array_equal(cols.values, rows_.values)  # missing values NaN in the same places
    assert cols.values.dtype == np.float32


def test_field_names_are_mapped(decoder: Decoder) -> None:
    d = Decoder(FEATURES, stream_field="machine", ts_field="time", values_field="sensors")
    body = record({"machine": "m", "time": NOW, "sensors": {"temp": 1}}).value
    rd, rejects = d.decode([Record("in", 0, 0, b"m", body, 0)], NOW)
    assert not rejects and rd.streams.tolist() == ["m"]


@pytest.mark.parametrize(
    "value",
    [
        b'{"stream": "p1", "stream": "p2", "ts": 1699999990, "values": {"temp": 1}}',
        b'{"stream": "p1", "ts": 1699999990, "ts": 1699999999, "values": {"temp": 1}}',
        b'{"stream": "p1", "ts": 1699999990, "values": {"temp": 1}, "values" : {"temp": 2}}',
        b'{"stream": "p1", "readings": [{"ts": 1699999990, "values": {"temp": 1}}], "stream": "p2"}',
    ],
)
def test_a_field_given_twice_is_ambiguous_and_rejected(decoder: Decoder, value: bytes) -> None:
    rd, rejects = decoder.decode([Record("t", 0, 0, b"p1", value, 0)], NOW)
    assert [r.reason for r in rejects] == ["duplicate_key"] and len(rd) == 0


@pytest.mark.parametrize(
    "value",
    [
        b'{"stream": "p1", "ts": 1699999990, "values": {"temp": 1, "temp": 2}}',
        b'{"stream": "p1", "ts": 1699999990, "values": {"temp": 1, "pressure": 3, "temp" : 2}}',  # spaced
        b'{"stream": "p1", "ts": "2023-11-14T22:13:10Z", "values": {"temp": 1, "temp": 2}}',  # colons in strings
        b'{"stream": "p1", "site": {"a": 1}, "ts": 1699999990, "values": {"temp": 1, "temp": 2}}',  # other fields
        b'{"stream": "p1", "site": "a:b", "ts": 1699999990, "values": {"temp": 1, "temp": 2}}',
        b'{"stream": "p1", "readings": [{"ts": 1699999990, "values": {"temp": 1}},'
        b' {"ts": 1699999991, "values": {"pressure": 1, "pressure": 2}}]}',
        b'{"stream": "p1", "readings": [{"ts": 1699999990, "ts": 1699999991, "values": {"temp": 1}}]}',
        b'{"stream": "p1", "readings": {"ts": [1699999990, 1699999991], "values": {"temp": [1, 2], "temp": [3, 4]}}}',
        b'{"stream": "p1", "readings": {"ts": ["2023-11-14T22:13:10Z"], "values": {"temp": [1]}, "values": {}}}',
        b'{"stream": "p1", "readings": {"ts": [1699999990], "ts": [1699999991], "values": {"temp": [1]}}}',
        # an escaped colon in the id would hide a colon from a count of the raw bytes
        b'{"stream": "p1\\u003a", "ts": "2023-11-14T22:13:10Z", "values": {"temp": 1, "temp": 2}}',
    ],
)
def test_a_feature_given_twice_is_rejected_in_every_form(decoder: Decoder, value: bytes) -> None:
    stream = b"p1:" if b"u003a" in value else b"p1"
    rd, rejects = decoder.decode([record(GOOD, 0), Record("t", 0, 1, stream, value, 0), record(GOOD, 2)], NOW)
    assert [(r.index, r.reason) for r in rejects] == [(1, "duplicate_key")], value
    assert list(rd.source) == [0, 2]


def test_repeated_names_that_are_not_keys_are_fine(decoder: Decoder) -> None:
    values = [b'{"stream": "stream", "ts": 1699999990, "values": {"temp": 1}}',  # the id is the field's name
              b'{"stream": "p1", "readings": [{"ts": 1699999990, "values": {"temp": 1}},'
              b' {"ts": 1699999991, "values": {"temp": 2}}]}',  # the batched form repeats ts and values
              b'{"stream": "a:b", "ts": "2023-11-14T22:13:10+00:00", "values": {"temp": 1, "pressure": 2}}',
              b'{"stream": "p1", "ts": 1699999990, "values": {"temp": 1}, "temp": {"temp": "x:\\"y\\":"}}',
              b'{"stream" : "p1", "ts" : 1699999992, "values" : {"temp" : 1}}',
              b'{"stream": "p1", "readings": {"ts": ["2023-11-14T22:13:10Z", 1699999999], "values": {"temp": [1, 2]}}}',
              b'{"stream": "a:b", "site": "x:y", "ts": "2023-11-14T22:13:11Z", "values": {"temp": 1}, "n": 2}']
    keys = [b"stream", b"p1", b"a:b", b"p1", b"p1", b"p1", b"a:b"]
    recs = [Record("t", 0, i, k, v, 0) for i, (k, v) in enumerate(zip(keys, values, strict=True))]
    rd, rejects = decoder.decode(recs, NOW)
    assert rejects == [] and len(rd) == 9


def test_a_key_that_is_not_the_stream_id_or_no_key_is_rejected_unless_allowed(decoder: Decoder) -> None:
    body = b'{"stream": "p1", "ts": 1699999990, "values": {"temp": 1}}'
    recs = [Record("t", 0, 0, b"p2", body, 0), Record("t", 0, 1, b"p1", body, 0), Record("t", 0, 2, None, body, 0)]
    rd, rejects = decoder.decode(recs, NOW)
    assert [(r.index, r.reason) for r in rejects] == [(0, "key_mismatch"), (2, "missing_key")]
    assert list(rd.source) == [1] and "input.require_stream_key" in rejects[1].detail
    lenient = Decoder(FEATURES, require_stream_key=False)
    rd, rejects = lenient.decode(recs, NOW)
    assert rejects == [] and len(rd) == 3


def test_a_stream_id_may_be_as_long_as_max_stream_id_bytes() -> None:
    d = Decoder(FEATURES, max_stream_id_bytes=8)
    ids = ["p" * 8, "p" * 9, "\u00e9" * 4, "\u00e9" * 5]  # 8, 9, 8 and 10 bytes of UTF-8
    recs = [record({"stream": s, "ts": NOW, "values": {"temp": 1}}, i) for i, s in enumerate(ids)]
    rd, rejects = d.decode(recs, NOW)
    assert [(r.index, r.reason) for r in rejects] == [(1, "stream_id_too_long"), (3, "stream_id_too_long")]
    assert list(rd.source) == [0, 2] and "input.max_stream_id_bytes (8)" in rejects[0].detail


def _scalar(obj: object, rng: random.Random) -> str:
    """JSON text of a scalar; a string's colons sometimes escaped (\\u003a), which hides them from a byte count."""
    if isinstance(obj, str) and rng.random() < 0.2:
        return json.dumps(obj).replace(":", "\\u003a")
    return json.dumps(obj)


def test_the_duplicate_check_agrees_with_a_full_parse_on_random_messages(decoder: Decoder) -> None:
    rng = random.Random(7)
    for n in range(600):
        stream = rng.choice(["p1", "a:b", "x" * 30])
        stamp = rng.choice([NOW - 5, "2023-11-14T22:13:10Z", "2023-11-14T22:13:10+00:00"])
        values = {f: rng.choice([1.5, None, 2]) for f in rng.sample(FEATURES, rng.randint(1, 3))}
        values[rng.choice(list(values))] = 1.0  # at least one value
        shape = n % 4
        if shape == 0:
            msg: dict = {"stream": stream, "ts": stamp, "values": values}
        elif shape == 1:
            msg = {"stream": stream, "site": rng.choice(["s:1", "s", {"rack": "r:2"}]), "ts": stamp, "values": values}
        elif shape == 2:
            msg = {"stream": stream, "readings": [{"ts": stamp, "values": values}, {"ts": NOW - 1, "values": values}]}
        else:
            msg = {"stream": stream, "readings": {"ts": [stamp], "values": {f: [v] for f, v in values.items()}}}
        # one object of the message (chosen at random, as deep as it goes) gets a name twice, or none does
        twice = rng.random() < 0.5
        objects = [msg, *(o for o in msg.values() if isinstance(o, dict))]
        if isinstance(msg.get("readings"), list):
            objects += [*msg["readings"], msg["readings"][0]["values"]]
        elif isinstance(msg.get("readings"), dict):
            objects.append(msg["readings"]["values"])
        else:
            objects.append(values)
        target = rng.choice(objects) if twice else None
        text = _dumps_with(msg, rng, target)
        rd, rejects = decoder.decode([Record("t", 0, n, stream.encode(), text.encode(), 0)], NOW)
        reasons = [r.reason for r in rejects]
        assert reasons == (["duplicate_key"] if twice else []), text


def _dumps_with(obj: object, rng: random.Random, target: object) -> str:
    """JSON text of `obj` in a random style (spacing, escapes), a name given twice in the object `target`."""
    if isinstance(obj, dict):
        pairs = list(obj.items())
        if obj is target:
            pairs.insert(rng.randrange(len(pairs) + 1), rng.choice(pairs))
        sep = rng.choice([":", ": ", " : ", "\t:"])
        return "{" + ", ".join(f"{json.dumps(k)}{sep}{_dumps_with(v, rng, target)}" for k, v in pairs) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(_dumps_with(v, rng, target) for v in obj) + "]"
    return _scalar(obj, rng)
