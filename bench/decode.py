"""Decode speed: today's orjson + Python checks (detector.decode.Decoder) against msgspec's typed structs.

    python bench/decode.py [--readings 200000] [--repeat 5] [--out docs/benchmarks.md]

For each of the three reading forms (one reading per message; a list of 100 readings per message; the
columnar form, 100 readings per message), side by side in one run on the same records:
1. decoder: `Decoder.decode`, everything the daemon does to a batch of records (JSON parse, every check
   behind a reject reason, the numpy arrays the engine takes);
2. msgspec: `msgspec.json.Decoder` into typed structs (types checked in C), then the same arrays, with the
   checks msgspec does not make itself done as the decoder does them (known features, finite values, the
   record key); it does not find a name given twice in one object (msgspec keeps the last, as orjson does:
   the decoder counts colons for that), so it does less work than the decoder;
3. orjson: `orjson.loads` of every record alone, the floor any Python decoder starts from.
Figures are readings per second, the best of `--repeat` runs (each over all the records); the ratio
msgspec / decoder is the one to read. Both paths are checked to give the same arrays. Results go to
bench/results/decode.json (--results) and, with --out, to the decode section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, replace_section  # noqa: E402
from consumers.base import Record  # noqa: E402
from detector.decode import Decoder, Readings  # noqa: E402

FEATURES = [f"f{i}" for i in range(8)]
T0 = 1.7e9
PER_MESSAGE = 100


class Item(msgspec.Struct):
    ts: float | str
    values: dict[str, float | None]


class Columns(msgspec.Struct):
    ts: list[float | str]
    values: dict[str, list[float | None]]


class Message(msgspec.Struct):
    stream: str
    ts: float | str | None = None
    values: dict[str, float | None] | None = None
    readings: list[Item] | Columns | None = None


def records(form: str, n: int, streams: int = 1000) -> list[Record]:
    """`n` readings of `streams` streams in one of the forms: row, list or columnar."""
    rng = np.random.default_rng(0)
    vals = np.round(rng.normal(50, 10, (n, len(FEATURES))), 3)
    out = []
    if form == "row":
        for i in range(n):
            s = f"pump-{i % streams:05d}"
            values = dict(zip(FEATURES, vals[i].tolist(), strict=True))
            body = {"stream": s, "ts": T0 + 60 * (i // streams), "values": values}
            out.append(Record("in", 0, i, s.encode(), orjson.dumps(body)))
        return out
    for m, a in enumerate(range(0, n, PER_MESSAGE)):
        s = f"pump-{m % streams:05d}"
        ts = [T0 + 60 * k for k in range(a, min(a + PER_MESSAGE, n))]
        block = vals[a:a + len(ts)]
        if form == "list":
            body = {"stream": s, "readings": [{"ts": t, "values": dict(zip(FEATURES, v, strict=True))}
                                              for t, v in zip(ts, block.tolist(), strict=True)]}
        else:
            body = {"stream": s, "readings": {"ts": ts, "values": {f: block[:, j].tolist()
                                                                    for j, f in enumerate(FEATURES)}}}
        out.append(Record("in", 0, m, s.encode(), orjson.dumps(body)))
    return out


class MsgspecDecoder:
    """The msgspec path: typed structs, then the decoder's arrays (valid input; see the module's note)."""

    def __init__(self, features: list[str]) -> None:
        self.features = features
        self.col = {f: i for i, f in enumerate(features)}
        self.dec = msgspec.json.Decoder(Message)

    def decode(self, recs: list[Record]) -> Readings:
        """The readings of the records (raises on anything the decoder would reject)."""
        streams: list[str] = []
        ts: list[float] = []
        rows: list[list[float | None]] = []
        blocks: list[tuple[str, np.ndarray, np.ndarray]] = []
        col, feats = self.col, self.features
        for rec in recs:
            msg = self.dec.decode(rec.value)
            if rec.key != msg.stream.encode():
                raise ValueError("key_mismatch")
            r = msg.readings
            if r is None:
                r = [Item(msg.ts, msg.values)]  # type: ignore[arg-type]
            if isinstance(r, Columns):
                t = np.array(r.ts, dtype=np.float64)
                out = np.full((len(t), len(feats)), np.nan)
                for name, v in r.values.items():
                    out[:, col[name]] = np.array(v, dtype=np.float64)
                blocks.append((msg.stream, t, out))
                continue
            for item in r:
                if not item.values.keys() <= col.keys():
                    raise ValueError("unknown_feature")
                streams.append(msg.stream)
                ts.append(float(item.ts))
                rows.append([item.values.get(f) for f in feats])
        values = np.array(rows, dtype=np.float64).reshape(len(rows), len(feats))
        ids, times = np.array(streams, dtype=object), np.array(ts, dtype=np.float64)
        for s, t, v in blocks:
            ids = np.concatenate([ids, np.full(len(t), s, dtype=object)])
            times, values = np.concatenate([times, t]), np.concatenate([values, v])
        if not np.isfinite(np.nan_to_num(values)).all():
            raise ValueError("non_numeric_value")
        return Readings(ids, times, values.astype(np.float32), np.zeros(len(times), np.int64))


def best_rate(fn, n: int, repeat: int) -> float:
    """Readings per second of the best of `repeat` calls."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def run(n: int, repeat: int) -> dict[str, dict[str, float]]:
    """Each form's rates and the msgspec / decoder ratio."""
    decoder, fast = Decoder(FEATURES), MsgspecDecoder(FEATURES)
    out = {}
    for form in ("row", "list", "columnar"):
        recs = records(form, n)
        a, rejects = decoder.decode(recs, time.time())
        b = fast.decode(recs)
        assert not rejects and np.array_equal(a.values, b.values) and np.array_equal(a.ts, b.ts)
        assert a.streams.tolist() == b.streams.tolist()
        rates = {
            "decoder": best_rate(lambda recs=recs: decoder.decode(recs, time.time()), n, repeat),
            "msgspec": best_rate(lambda recs=recs: fast.decode(recs), n, repeat),
            "orjson_loads_only": best_rate(lambda recs=recs: [orjson.loads(r.value) for r in recs], n, repeat),
        }
        rates["ratio_msgspec_to_decoder"] = rates["msgspec"] / rates["decoder"]
        out[form] = rates
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="write the decode section of this markdown file (docs/benchmarks.md)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "decode.json"), help="the JSON results")
    args = ap.parse_args()
    res = run(args.readings, args.repeat)
    when = time.strftime("%Y-%m-%d", time.gmtime())
    doc = {"readings": args.readings, "repeat": args.repeat, "date": when, "machine": machine(),
           "msgspec": msgspec.__version__, "orjson": orjson.__version__, "forms": res}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"`python bench/decode.py --readings {args.readings} --repeat {args.repeat}` ({when}, "
             f"{machine()}; msgspec {msgspec.__version__}, orjson {orjson.__version__}); readings per second, "
             "best of the repeats:", "",
             "| form | decoder (orjson + checks) | msgspec structs + arrays | ratio | orjson.loads alone |",
             "|---|---|---|---|---|"]
    for form, r in res.items():
        lines.append(f"| {form} | {r['decoder']:,.0f} | {r['msgspec']:,.0f} | {r['ratio_msgspec_to_decoder']:.2f} | "
                     f"{r['orjson_loads_only']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        replace_section(Path(args.out), "decode", "Decoding: orjson and checks against msgspec", "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
