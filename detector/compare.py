"""`detector compare`: the live model's alerts beside a shadow's (model.shadow), read from their two topics.

How many episodes each raised by kind, which streams only one of them raised, and the scores of the raised
alerts side by side (quantiles): what an operator reads before promoting a candidate. And
`detector evaluate --labels-from-topic`: each side scored against what operators labelled alerts
(`detector control label`): how many confirmed faults it raised an anomaly episode in, and how many of the
labelled false alarms it raised again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from consumers.base import Record
from detector.control import BadCommand, deleted, parse_command
from detector.decode import parse_ts

__all__ = ["compare_alerts", "format_comparison", "labels_held", "episodes", "score_labels", "format_labels"]

QUANTILES = (0.5, 0.9, 0.99, 1.0)


def _side(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    raised = [a for a in alerts if a.get("state") == "raised"]
    scores = np.array([a["score"] for a in raised if isinstance(a.get("score"), int | float)], np.float64)
    return {
        "models": sorted({str(a.get("model_version", "")) for a in alerts}),
        "raised": dict(sorted(Counter(str(a.get("kind")) for a in raised).items())),
        "streams": sorted({str(a.get("stream")) for a in raised if a.get("kind") == "anomaly"}),
        "score_quantiles": {f"{q:g}": float(np.quantile(scores, q)) for q in QUANTILES} if len(scores) else {},
    }


def compare_alerts(live: list[dict[str, Any]], shadow: list[dict[str, Any]]) -> dict[str, Any]:
    """The two sides' raised episodes by kind, their anomaly streams, and where they differ.

    >>> a = lambda s, m, score: {"kind": "anomaly", "state": "raised", "stream": s, "score": score, "model_version": m}
    >>> c = compare_alerts([a("p1", "v1", 40.0)], [a("p1", "v2", 80.0), a("p2", "v2", 20.0)])
    >>> c["live"]["raised"], c["shadow"]["raised"], c["only_shadow"], c["only_live"]
    ({'anomaly': 1}, {'anomaly': 2}, ['p2'], [])
    """
    sides = {"live": _side(live), "shadow": _side(shadow)}
    a, b = set(sides["live"]["streams"]), set(sides["shadow"]["streams"])
    return {**sides, "only_live": sorted(a - b), "only_shadow": sorted(b - a), "both": sorted(a & b)}


def format_comparison(c: dict[str, Any], limit: int = 20) -> str:
    """The comparison as a few plain lines."""
    lines = []
    for side in ("live", "shadow"):
        s = c[side]
        kinds = ", ".join(f"{k} {v}" for k, v in s["raised"].items()) or "none"
        q = "  ".join(f"p{float(k) * 100:g} {v:.3g}" for k, v in s["score_quantiles"].items()) or "-"
        lines.append(f"{side:6} ({', '.join(s['models']) or 'no alerts'}): raised {kinds}; "
                     f"{len(s['streams'])} streams; raised scores {q}")
    for name, label in (("only_live", "raised by the live model only"), ("only_shadow", "raised by the shadow only")):
        streams = c[name]
        more = f" (and {len(streams) - limit} more)" if len(streams) > limit else ""
        lines.append(f"{label}: {len(streams)}" + (f": {', '.join(streams[:limit])}{more}" if streams else ""))
    lines.append(f"raised by both: {len(c['both'])}")
    return "\n".join(lines)


def labels_held(records: Iterable[Record]) -> dict[str, str]:
    """The labels the control records hold, by alert id (newest per alert; a deleted key withdraws it).

    >>> lab = lambda aid, as_: Record("ctl", 0, 0, f"label:{aid}".encode(),
    ...     f'{{"action": "label", "streams": "p1", "alert_id": "{aid}", "as": "{as_}"}}'.encode(), 0)
    >>> labels_held([lab("a", "false_alarm"), lab("b", "confirmed"), lab("a", "confirmed"),
    ...              Record("ctl", 0, 0, b"label:b", None, 0)])
    {'a': 'confirmed'}
    """
    held: dict[str, str] = {}
    for rec in records:
        try:
            cmd = parse_command(rec.value, 0.0)
        except BadCommand:
            continue
        if cmd is None:
            gone = deleted(rec.key)
            if gone is not None and gone[0] == "label":
                held.pop(gone[1], None)
        elif cmd.action == "label":
            held[cmd.alert_id] = cmd.label
    return held


def episodes(alerts: list[dict[str, Any]], until: float) -> dict[str, tuple[str, float, float]]:
    """Each anomaly episode by alert id: its stream and [first seen, end] in event time (open: to `until`).

    >>> e = episodes([{"kind": "anomaly", "alert_id": "a", "stream": "p", "state": "raised", "first_seen": 10,
    ...                "window_end": 10}, {"kind": "anomaly", "alert_id": "a", "stream": "p", "state": "cleared",
    ...                "first_seen": 10, "window_end": 70}], until=100.0)
    >>> e
    {'a': ('p', 10.0, 70.0)}
    """
    out: dict[str, tuple[str, float, float]] = {}
    for a in alerts:
        try:
            if a.get("kind") != "anomaly":
                continue
            aid, stream, start = a["alert_id"], a["stream"], parse_ts(a["first_seen"])
            cleared = a.get("state") == "cleared"
            end = parse_ts(a.get("window_end", a["first_seen"])) if cleared else until
        except (KeyError, TypeError, ValueError):
            continue
        if cleared or aid not in out:  # a clear ends the episode; the records before it leave it open
            out[aid] = (stream, start, end)
    return out


def score_labels(labels: dict[str, str], sides: dict[str, list[dict[str, Any]]], until: float) -> dict[str, Any]:
    """Each side's anomaly episodes against the labelled ones: of the confirmed faults, how many it raised an
    episode overlapping (on the same stream), and of the false alarms, how many it raised again.

    A labelled episode is looked up by its alert id on any side; labels whose alert is on no side (older than
    the span read) are counted apart.

    >>> ep = lambda aid, s, t0, t1, m: [
    ...     {"kind": "anomaly", "alert_id": aid, "stream": s, "state": "raised", "first_seen": t0, "model_version": m},
    ...     {"kind": "anomaly", "alert_id": aid, "stream": s, "state": "cleared", "first_seen": t0, "window_end": t1}]
    >>> live = ep("a", "p1", 100, 200, "v1") + ep("b", "p2", 100, 200, "v1")
    >>> shadow = ep("c", "p1", 150, 260, "v2")
    >>> r = score_labels({"a": "confirmed", "b": "false_alarm", "z": "confirmed"}, {"live": live, "shadow": shadow},
    ...                  until=1000.0)
    >>> r["live"]["confirmed_caught"], r["live"]["false_alarms_raised"], r["shadow"]["confirmed_caught"]
    (1, 1, 1)
    >>> r["shadow"]["false_alarms_raised"], r["confirmed"], r["false_alarms"], r["not_found"]
    (0, 1, 1, 1)
    """
    eps = {name: episodes(alerts, until) for name, alerts in sides.items()}
    every = {aid: ep for side in eps.values() for aid, ep in side.items()}
    found = {aid: (label, every[aid]) for aid, label in labels.items() if aid in every}
    out: dict[str, Any] = {
        "confirmed": sum(label == "confirmed" for label, _ in found.values()),
        "false_alarms": sum(label == "false_alarm" for label, _ in found.values()),
        "not_found": len(labels) - len(found),
    }
    for name, side in eps.items():
        by_stream: dict[str, list[tuple[float, float]]] = {}
        for stream, start, end in side.values():
            by_stream.setdefault(stream, []).append((start, end))

        def raised(ep: tuple[str, float, float], spans: dict[str, list[tuple[float, float]]] = by_stream) -> bool:
            stream, start, end = ep
            return any(a <= end and start <= b for a, b in spans.get(stream, []))

        hits = {label: sum(raised(ep) for lab, ep in found.values() if lab == label) for label in ("confirmed",
                                                                                                 "false_alarm")}
        out[name] = {"models": sorted({str(a.get("model_version", "")) for a in sides[name]
                                       if a.get("state") == "raised"}),
                     "confirmed_caught": hits["confirmed"], "false_alarms_raised": hits["false_alarm"]}
    return out


def format_labels(r: dict[str, Any]) -> str:
    """The label report as a few plain lines."""
    lines = [f"labelled alerts found: {r['confirmed']} confirmed, {r['false_alarms']} false alarms"
             + (f" ({r['not_found']} labels name alerts not in the span read)" if r["not_found"] else "")]
    for side in (k for k in r if isinstance(r[k], dict)):
        s = r[side]
        lines.append(f"{side:6} ({', '.join(s['models']) or 'no alerts'}): confirmed faults raised "
                     f"{s['confirmed_caught']} of {r['confirmed']}; false alarms raised again "
                     f"{s['false_alarms_raised']} of {r['false_alarms']}")
    return "\n".join(lines)
