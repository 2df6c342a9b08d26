"""`detector compare`: the live model's alerts beside a shadow's (model.shadow), read from their two topics.

How many episodes each raised by kind, which streams only one of them raised, and the scores of the raised
alerts side by side (quantiles): what an operator reads before promoting a candidate.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

__all__ = ["compare_alerts", "format_comparison"]

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
