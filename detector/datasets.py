"""Labelled benchmark data (NAB, SKAB, or any CSV with a label column) loaded into one shape: `LabelledFile`.

The data are read where they lie (e.g. ``../shared/data/NAB``) and never copied into the repository. Each file
keeps its rows in file order, because the benchmarks score rows in that order; a generic CSV is sorted by time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from detector.errors import DataError
from detector.quality import rows_to_windows

__all__ = [
    "LabelledFile",
    "load_nab",
    "load_skab",
    "load_skab_anomaly_free",
    "load_labelled_csv",
    "load_dataset",
    "FORMATS",
]

FORMATS = ("nab", "skab", "csv")
NAB_PROTOCOL = "nab: probationary period min(floor(0.15*T), 750)"
SKAB_PROTOCOL = "skab: first 400 rows"
SKAB_TRAIN_ROWS = 400
_SKAB_TS, _SKAB_LABEL, _SKAB_EXTRA = "datetime", "anomaly", "changepoint"
SKAB_NORMAL = "anomaly-free"  # the folder of normal operation: training data, not a labelled test folder


@dataclass(frozen=True)
class LabelledFile:
    """One labelled series: readings, per-row anomaly labels, labelled windows and the training protocol."""

    name: str  # path relative to the dataset's data folder, e.g. "realKnownCause/nyc_taxi.csv", "valve1/0.csv"
    timestamps: np.ndarray  # (T,) float64 epoch seconds (UTC), in file order (NAB repeats a few at DST changes)
    values: np.ndarray  # (T, F) float32, NaN where missing
    features: list[str]
    labels: np.ndarray  # (T,) bool: the row is anomalous
    windows: list[tuple[int, int]]  # labelled anomaly windows as inclusive row ranges
    train_rows: int  # rows at the start that the protocol lets a detector learn from
    protocol: str  # how train_rows was chosen, e.g. "skab: first 400 rows"


# ---------------------------------------------------------------------------------------------------------------
# reading helpers
# ---------------------------------------------------------------------------------------------------------------


def _sniff_sep(p: Path) -> str:
    """`;` when the header line has more semicolons than commas, else `,`."""
    try:
        with p.open(encoding="utf-8", errors="replace") as fh:
            head = fh.readline()
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    return ";" if head.count(";") > head.count(",") else ","


def _read_csv(p: Path, sep: str | None = None) -> pd.DataFrame:
    """The CSV file as a frame, with a DataError for a missing, unreadable or empty file."""
    if not p.is_file():
        raise DataError(f"{p}: data file not found (pass the path of a labelled .csv file or a folder of them)")
    sep = sep or _sniff_sep(p)
    try:
        df = pd.read_csv(p, sep=sep)
    except Exception as exc:  # pandas raises many parser error types; each means the same to a user
        raise DataError(f"{p}: cannot read as CSV separated by {sep!r} ({exc})") from None
    if df.empty:
        raise DataError(f"{p}: no data rows (a header line and at least one row of readings are needed)")
    return df


def _require(df: pd.DataFrame, p: Path, cols: list[str], hint: str = "") -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{p}: no column {missing[0]!r} (columns are: {', '.join(map(str, df.columns))}"
                        f"{'; ' + hint if hint else ''})")


def _epoch(col: pd.Series, p: Path, name: str) -> np.ndarray:
    """Timestamps as float64 epoch seconds (UTC): numbers are taken as epoch seconds, text is parsed as dates."""
    if pd.api.types.is_bool_dtype(col) or not (
        pd.api.types.is_numeric_dtype(col) or pd.api.types.is_datetime64_any_dtype(col)
    ):
        ts = pd.to_datetime(col, utc=True, errors="coerce")
        if ts.isna().any():  # the format inferred from the first value may not fit them all
            ts = pd.to_datetime(col, utc=True, errors="coerce", format="mixed")
        if ts.isna().any():
            bad = col[ts.isna()].iloc[0]
            raise DataError(f"{p}: column {name!r} has a value that is neither a number nor a date ({bad!r})")
        return ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
    if pd.api.types.is_datetime64_any_dtype(col):
        ts = pd.to_datetime(col, utc=True)
        return ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
    out = col.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(out).any():
        raise DataError(f"{p}: column {name!r} has empty timestamps (row {int(np.flatnonzero(np.isnan(out))[0])})")
    return out


def _values(df: pd.DataFrame, p: Path, features: list[str]) -> np.ndarray:
    """The feature columns as a (T, F) float32 array, NaN where a reading is missing."""
    for f in features:
        if not pd.api.types.is_numeric_dtype(df[f]) or pd.api.types.is_bool_dtype(df[f]):
            found = df[f].dropna()
            raise DataError(f"{p}: feature column {f!r} must hold numbers"
                            f"{f' (found {found.iloc[0]!r})' if len(found) else ''}")
    return df[features].to_numpy(dtype=np.float32, na_value=np.nan)


def _labels01(col: pd.Series, p: Path, name: str) -> np.ndarray:
    """A 0/1 (or boolean) label column as a bool array."""
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=bool)
    v = col.to_numpy(dtype=np.float64, na_value=np.nan) if pd.api.types.is_numeric_dtype(col) else None
    if v is None or not np.isin(v, (0.0, 1.0)).all():
        bad = col[~col.isin([0, 1])].iloc[0] if v is not None else col.iloc[0]
        raise DataError(f"{p}: label column {name!r} must hold 0 or 1 on every row (found {bad!r})")
    return v == 1.0


def _find_root(path: str | Path, folder: str, marker: str) -> Path:
    """The dataset folder: `path` itself when it holds `marker`, or `path`/`folder` when that does."""
    p = Path(path)
    for cand in (p, p / folder):
        if (cand / marker).exists():
            return cand
    raise DataError(f"{p}: not a {folder} folder (expected {marker} inside it, or a {folder}/ folder that has it)")


# ---------------------------------------------------------------------------------------------------------------
# NAB
# ---------------------------------------------------------------------------------------------------------------


def _nab_train_rows(n: int) -> int:
    # NAB's own arithmetic: floor(0.15 * T) in floating point, at most 0.15 * 5000 = 750
    return int(min(math.floor(0.15 * n), 750))


def load_nab(root: str | Path, limit: int | None = None) -> list[LabelledFile]:
    """The NAB files (sorted by name, at most `limit`) with their labelled windows and probationary periods."""
    base = _find_root(root, "NAB", "labels/combined_windows.json")
    label_path = base / "labels" / "combined_windows.json"
    try:
        table = json.loads(label_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{label_path}: cannot read as JSON ({exc})") from None
    if not isinstance(table, dict):
        raise DataError(f"{label_path}: expected an object mapping 'folder/file.csv' to a list of [start, end]")
    data = base / "data"
    paths = sorted(data.glob("*/*.csv"), key=lambda q: q.relative_to(data).as_posix())
    if not paths:
        raise DataError(f"{data}: no NAB data files (expected data/<folder>/<file>.csv)")
    names = [q.relative_to(data).as_posix() for q in paths]
    absent = sorted(set(table) - set(names))
    if absent:
        raise DataError(f"{data}: data file {absent[0]} is missing ({len(absent)} labelled file(s) in total; "
                        "restore the complete NAB data folder)")
    out = []
    for q, name in list(zip(paths, names, strict=True))[:limit]:
        if name not in table:
            raise DataError(f"{label_path}: no entry for {name!r} (every data file needs one, [] when unlabelled)")
        out.append(_nab_file(q, name, table[name], label_path))
    return out


def _nab_file(p: Path, name: str, spans: list, label_path: Path) -> LabelledFile:
    df = _read_csv(p, ",")
    _require(df, p, ["timestamp", "value"], "NAB files have timestamp,value")
    ts = _epoch(df["timestamp"], p, "timestamp")
    n = len(ts)
    try:
        edges = _epoch(pd.Series([s for span in spans for s in span], dtype=object), label_path, name)
        edges = edges.reshape(-1, 2)
    except ValueError:
        raise DataError(f"{label_path}: windows of {name!r} must be [start, end] timestamp pairs") from None
    inside = (ts[None, :] >= edges[:, :1]) & (ts[None, :] <= edges[:, 1:])  # (windows, T)
    counts = inside.sum(axis=1)
    if (counts == 0).any():
        a, b = spans[int(np.flatnonzero(counts == 0)[0])]
        raise DataError(f"{label_path}: window [{a}, {b}] of {name!r} contains no row of the data file")
    rows = np.arange(n)
    first = np.where(inside, rows, n).min(axis=1)
    last = np.where(inside, rows, -1).max(axis=1)
    windows = [(int(a), int(b)) for a, b in zip(first, last, strict=True)]
    return LabelledFile(name, ts, _values(df, p, ["value"]), ["value"], inside.any(axis=0), windows,
                        _nab_train_rows(n), NAB_PROTOCOL)


# ---------------------------------------------------------------------------------------------------------------
# SKAB
# ---------------------------------------------------------------------------------------------------------------


def _skab_order(q: Path) -> tuple[int, int, str]:
    return (0, int(q.stem), "") if q.stem.isdigit() else (1, 0, q.stem)


def _skab_file(p: Path, name: str, labelled: bool) -> LabelledFile:
    df = _read_csv(p, ";")
    _require(df, p, [_SKAB_TS, _SKAB_LABEL] if labelled else [_SKAB_TS], "SKAB files are ';'-separated")
    features = [str(c) for c in df.columns if c not in (_SKAB_TS, _SKAB_LABEL, _SKAB_EXTRA)]
    if not features:
        raise DataError(f"{p}: no sensor columns besides {_SKAB_TS}, {_SKAB_LABEL} and {_SKAB_EXTRA}")
    n = len(df)
    labels = _labels01(df[_SKAB_LABEL], p, _SKAB_LABEL) if labelled else np.zeros(n, dtype=bool)
    train_rows, protocol = (min(SKAB_TRAIN_ROWS, n), SKAB_PROTOCOL) if labelled else (n, "skab: all rows normal")
    return LabelledFile(name, _epoch(df[_SKAB_TS], p, _SKAB_TS), _values(df, p, features), features, labels,
                        rows_to_windows(labels), train_rows, protocol)


def _skab_folders(root: str | Path) -> list[Path]:
    """The labelled SKAB folders `root` names: itself when it holds the .csv files (e.g. valve2/), else every
    subfolder that does (the whole data folder, or the folder above it), in name order, without anomaly-free/."""
    p = Path(root)
    if p.is_dir() and any(p.glob("*.csv")):
        if p.resolve().name == SKAB_NORMAL:
            raise DataError(f"{p}: SKAB's anomaly-free recording has no labelled anomalies to score (point --data "
                            "at valve1/, valve2/, other/ or the SKAB folder that holds them; --train-protocol "
                            "anomaly-free trains on it)")
        return [p]
    base = p / "SKAB" if (p / "SKAB").is_dir() else p
    subs = sorted((d for d in base.iterdir() if d.is_dir() and d.name != SKAB_NORMAL
                   and not d.name.startswith(".") and any(d.glob("*.csv"))),
                  key=lambda d: d.name) if base.is_dir() else []
    if subs:
        return subs
    raise DataError(f"{p}: not a SKAB folder (expected ';'-separated .csv files in it, as in valve1/, or "
                    "subfolders of them such as valve1/, valve2/, other/, or a SKAB/ folder that has them)")


def load_skab(root: str | Path, limit: int | None = None) -> list[LabelledFile]:
    """SKAB experiments named by their folder ("valve2/3.csv"), the first 400 rows of each for training.

    `root` is one folder of experiments (valve1/, valve2/, other/) or the data folder (or the folder above it),
    whose subfolders are read in name order, anomaly-free/ left out; files in numeric order, at most `limit`.
    """
    paths: list[tuple[Path, str]] = []
    for folder in _skab_folders(root):
        sub = folder.resolve().name  # the real name, also for "." or a path ending in "/"
        paths += [(q, f"{sub}/{q.name}") for q in sorted(folder.glob("*.csv"), key=_skab_order)]
    return [_skab_file(q, name, True) for q, name in paths[:limit]]


def load_skab_anomaly_free(root: str | Path) -> LabelledFile:
    """SKAB's anomaly-free recording: every row normal and available for training."""
    marker = f"{SKAB_NORMAL}/{SKAB_NORMAL}.csv"
    p = Path(root)
    for base in (p, p / "SKAB", p.resolve().parent):  # the data folder, the one above, or one of its subfolders
        if (base / marker).is_file():
            return _skab_file(base / marker, marker, False)
    raise DataError(f"{p}: no SKAB {marker} (expected it in this folder, in a SKAB/ folder inside it, or beside "
                    "this folder when it is one of SKAB's subfolders such as valve1/)")


# ---------------------------------------------------------------------------------------------------------------
# generic CSV
# ---------------------------------------------------------------------------------------------------------------


def load_labelled_csv(path: str | Path, *, timestamp_col: str = "timestamp", label_col: str = "label",
                      features: list[str] | None = None, train_rows: int | None = None,
                      train_fraction: float = 0.15) -> list[LabelledFile]:
    """A labelled CSV file, or every .csv under a folder, each with a 0/1 label column and numeric features."""
    p = Path(path)
    if train_rows is not None and train_rows < 0:
        raise DataError(f"train rows must be 0 or more, not {train_rows}")
    if not 0.0 <= train_fraction < 1.0:
        raise DataError(f"train fraction must be in [0, 1), not {train_fraction}")
    if p.is_dir():
        files = sorted(p.rglob("*.csv"), key=lambda q: q.relative_to(p).as_posix())
        if not files:
            raise DataError(f"{p}: no .csv files in this folder")
        named = [(q, q.relative_to(p).as_posix()) for q in files]
    else:
        named = [(p, p.name)]
    return [_csv_file(q, name, timestamp_col, label_col, features, train_rows, train_fraction) for q, name in named]


def _csv_file(p: Path, name: str, ts_col: str, label_col: str, features: list[str] | None, train_rows: int | None,
              train_fraction: float) -> LabelledFile:
    df = _read_csv(p)
    _require(df, p, [ts_col], "name the right one with --timestamp-col")
    _require(df, p, [label_col], "name the right one with --label-col")
    if features is None:
        features = [str(c) for c in df.columns if c not in (ts_col, label_col)
                    and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
        if not features:
            raise DataError(f"{p}: no numeric feature columns besides {ts_col!r} and {label_col!r} "
                            "(name them with --features a,b,c)")
    else:
        _require(df, p, list(features), "name the feature columns with --features a,b,c")
        features = list(features)
    ts = _epoch(df[ts_col], p, ts_col)
    order = np.argsort(ts, kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    labels = _labels01(df[label_col], p, label_col)
    n = len(df)
    if train_rows is None:
        rows, protocol = int(math.floor(train_fraction * n)), f"csv: first floor({train_fraction:g}*T) rows"
    elif train_rows > n:
        raise DataError(f"{p}: {train_rows} train rows asked for but the file has only {n} rows")
    else:
        rows, protocol = int(train_rows), f"csv: first {train_rows} rows"
    return LabelledFile(name, ts[order], _values(df, p, features), features, labels, rows_to_windows(labels), rows,
                        protocol)


# ---------------------------------------------------------------------------------------------------------------
# by format
# ---------------------------------------------------------------------------------------------------------------


def load_dataset(path: str | Path, fmt: str, limit: int | None = None) -> list[LabelledFile]:
    """Labelled files of a format ("nab", "skab" or "csv") from a dataset folder (or the folder above it)."""
    kind = fmt.lower()
    if kind == "nab":
        return load_nab(path, limit)
    if kind == "skab":
        return load_skab(path, limit=limit)
    if kind == "csv":
        return load_labelled_csv(path)[:limit]
    raise DataError(f"unknown data format {fmt!r} (choose one of: {', '.join(FORMATS)})")
