"""Every record the pipeline writes has exactly the fields docs/operators.md lists for it ("Every record's fields")."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from consumers.base import Record
from detector.config import parse_config
from detector.control import Command
from detector.pipeline import Pipeline
from tests.helpers import FEATURES, random_artifact, sine_values
from tests.test_control import NOW, RULES, SRC, T0, readings

DOC = Path(__file__).resolve().parent.parent / "docs" / "operators.md"


def documented() -> dict[str, set[str]]:
    """The table of record fields in docs/operators.md: record (its first column, less any bracket) -> fields."""
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("### Every record's fields"):].split("\n\n")[2]
    out: dict[str, set[str]] = {}
    for line in table.splitlines()[2:]:
        name, fields = (c.strip() for c in line.strip("|").split("|"))
        out[re.sub(r"\s*\(.*\)$", "", name)] = set(re.findall(r"`([a-z_]+)`", fields))
    return out


def frozen(t0: int, t1: int) -> list[Record]:
    """Stream m9, whose pressure reads one value from reading 20 to 60 (a stuck sensor)."""
    out = []
    for t in range(t0, t1):
        v = sine_values(200, seed=9)[t].astype(float).tolist()
        v[2] = 3.0 if 20 <= t < 60 else v[2]
        body = {"stream": "m9", "ts": T0 + 60 * t, "values": dict(zip(FEATURES, v, strict=True))}
        out.append(Record("in", 0, 10_000 + t, b"m9", orjson.dumps(body), 0))
    return out


def test_every_record_has_the_fields_the_operators_guide_lists() -> None:
    docs = documented()
    rules = {**RULES, "sensors": {"flatline_readings": 10},
             "alerts": {**RULES["alerts"], "regime": {"enabled": True, "delta": 0.1, "threshold": 2.0,
                                                      "min_windows": 4}}}
    pipe = Pipeline(parse_config(rules), random_artifact())
    seen: dict[str, list[dict]] = {}

    def keep(name: str, records: list[dict]) -> None:
        for r in records:
            seen.setdefault(name(r) if callable(name) else name, []).append(r)

    def kind_of(r: dict) -> str:
        if r["kind"] == "anomaly":
            return "anomaly cleared by a mute" if r.get("reason") == "muted" else "anomaly raised, escalated or cleared"
        return {"sensor_fault": "sensor_fault raised or cleared", "regime_change": "regime_change detected"}[r["kind"]]

    keep(kind_of, pipe.process(readings(0, 150) + frozen(0, 150), NOW).alerts)  # m1 raised, m9's pressure stuck
    keep("anomaly acknowledged", pipe.command(Command("ack", "m1", reason="on it", by="ann", at=NOW), SRC)[0])
    keep(kind_of, pipe.process(readings(150, 320), NOW).alerts)  # escalated (silently), cleared
    keep(kind_of, pipe.process(readings(320, 420), NOW).alerts)
    pipe2 = Pipeline(parse_config(rules), random_artifact())  # a second one for the mute and the promote
    pipe2.process(readings(0, 150), NOW)
    pipe2.command(Command("mute", "m1"), SRC)
    keep(kind_of, pipe2.process(readings(150, 200), NOW).alerts)
    pipe2.command(Command("unmute", "m1"), SRC)
    pipe2.process(readings(200, 260) + frozen(0, 40), NOW)  # open again, and m9's sensor stuck
    cmd = Record("ctl", 0, 7, b"model:*", b"{}", 0)
    for r in pipe2.retire("model_promoted", cmd):
        keep("anomaly cleared by a promote or rollback" if r["kind"] == "anomaly"
             else "sensor_fault cleared by a promote or rollback", [r])

    assert set(seen) == set(docs), f"records seen {sorted(seen)}, documented {sorted(docs)}"
    for name, records in seen.items():
        for r in records:
            assert set(r) == docs[name], f"{name}: written {sorted(r)}, documented {sorted(docs[name])}"
