"""A simulated fleet of pumps with injected faults: pure numpy, deterministic for a seed.

Each machine is a variable-speed pump. A load schedule (a daily demand cycle with a machine-specific phase,
plus piecewise-constant load levels that switch a few times a day and ramp smoothly) sets the speed, and
the sensors follow physically: flow ~ speed, pressure ~ static head + speed^2 (affinity laws), current
~ 0.25 + 0.75 * speed^3 (shaft power) scaled by supply voltage, motor temperature = ambient (daily cycle and
slow weather) + a heating term ~ current^2 with a thermal lag, vibration ~ speed^2 on two axes. Every
sensor adds Gaussian noise of a fixed per-feature scale (`NOISE_SIGMA`). Some streams have gaps: single
missing values, short sensor dropouts and, rarely, whole readings missing for one to three steps.

Faults start only after the normal (training) period, in about `fault_fraction` of the streams, one per
faulty stream, kinds spread evenly over `FAULT_KINDS`. A fault changes exactly the readings in its
[start, end) span and only its named features. The clean signal does not depend on `fault_fraction`:
the same seed with `fault_fraction=0` gives the fault-free counterfactual of every stream.

Regime changes are not faults: with `n_regimes` > 0, that many streams (never faulty ones) move to a new
operating point for good after the normal period: their discharge valve is throttled to another duty, so
pressure rises and flow falls within a few minutes and stay there to the end of the run. The physics holds
(other sensors are unchanged), but the model never saw that operating point, so its scores rise and stay up:
what the detector should report once, as a regime change, rather than as a machine fault. They are part of
the clean signal, independent of `fault_fraction`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FAULT_KINDS", "FEATURES", "NOISE_SIGMA", "Fault", "RegimeShift", "Fleet", "simulate_fleet",
           "fleet_records", "fleet_to_frame"]

FAULT_KINDS = ("drift", "spike", "level_shift", "stuck", "noise_burst")

FEATURES = ("temp", "vibration_x", "vibration_y", "pressure", "flow", "current", "rpm", "voltage")

# Sensor noise, one standard deviation in the feature's unit: degC, mm/s RMS, mm/s RMS, bar, m3/h, A, rpm, V.
NOISE_SIGMA: dict[str, float] = {
    "temp": 0.25,
    "vibration_x": 0.06,
    "vibration_y": 0.06,
    "pressure": 0.03,
    "flow": 0.8,
    "current": 0.25,
    "rpm": 2.0,
    "voltage": 0.8,
}

_DAY = 86400.0
_IDX = {f: i for i, f in enumerate(FEATURES)}
_SIGMA = np.array([NOISE_SIGMA[f] for f in FEATURES])

# Fault durations in readings (low, high inclusive) and magnitudes in noise sigmas.
_DURATION = {"drift": (300, 700), "spike": (2, 5), "level_shift": (150, 400), "stuck": (300, 600),
             "noise_burst": (100, 300)}
_DRIFT_END_SIGMAS = {"temp": (7.0, 10.0), "vibration_x": (8.0, 12.0), "vibration_y": (8.0, 12.0)}
_SPIKE_SIGMAS = (7.0, 10.0)
_SHIFT_SIGMAS = (6.0, 9.0)
_NOISE_FACTOR = (4.0, 6.0)
_STUCK_CANDIDATES = ("temp", "pressure", "flow", "current", "rpm")
_NOISE_GROUPS = (("vibration_x", "vibration_y"), ("current",), ("current", "voltage"), ("pressure",),
                 ("flow",))
_MIN_FAULT_ROOM = 20  # readings after the normal period needed for any fault
# Regime change (a throttled valve): pressure up by this many bar, flow down by this fraction.
_REGIME_PRESSURE_BAR = (2.5, 3.5)
_REGIME_FLOW_DROP = (0.3, 0.4)
_REGIME_RAMP = 10  # readings over which the valve moves


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault: readings [start, end) of `stream` are abnormal in `features`."""

    stream: str  # stream id, e.g. "pump-007"
    kind: str  # one of FAULT_KINDS
    start: int  # index of the first faulty reading (in the stream's reading index)
    end: int  # index one past the last faulty reading
    features: tuple[str, ...]  # the sensors the fault moves


@dataclass(frozen=True, slots=True)
class RegimeShift:
    """A lasting change of `stream`'s operating point from reading `start` on (not a fault)."""

    stream: str
    start: int  # index of the first reading at the new operating point (it ramps in over a few readings)
    features: tuple[str, ...]  # the sensors that move


@dataclass(frozen=True)
class Fleet:
    """A simulated fleet: S streams x T readings x F features, shared timestamps, and the injected faults."""

    streams: list[str]  # S stream ids
    features: list[str]  # F feature names, a prefix of FEATURES
    timestamps: np.ndarray  # (T,) float64 epoch seconds, shared by all streams (fixed step)
    values: np.ndarray  # (S, T, F) float32, NaN where a reading value is missing (gaps)
    faults: list[Fault]
    normal_until: int  # readings [0, normal_until) of every stream are fault-free (training period)
    regimes: list[RegimeShift] = field(default_factory=list)  # operating-point changes (not faults)


def simulate_fleet(n_streams: int = 50, n_features: int = 8, n_readings: int = 5000, *,
                   normal_readings: int = 2000, step_seconds: float = 60.0, start: float = 1_700_000_000.0,
                   fault_fraction: float = 0.5, seed: int = 0, fault_seed: int | None = None,
                   n_regimes: int = 0) -> Fleet:
    """Simulate `n_streams` pumps for `n_readings` steps, with faults after `normal_readings`.

    `n_regimes` streams that get no fault change their operating point for good after the normal period.

    `fault_seed` (default: derived from `seed`) seeds only where the faults fall and what they are: another
    value keeps every stream's clean signal and draws new faults.

    >>> fleet = simulate_fleet(n_streams=10, n_features=4, n_readings=600, normal_readings=300, seed=1)
    >>> fleet.values.shape, fleet.values.dtype.name, fleet.features
    ((10, 600, 4), 'float32', ['temp', 'vibration_x', 'vibration_y', 'pressure'])
    >>> len(fleet.faults), sorted(f.kind for f in fleet.faults) == sorted(FAULT_KINDS)
    (5, True)
    >>> all(300 <= f.start < f.end <= 600 for f in fleet.faults)
    True
    """
    if n_streams < 1 or n_readings < 1:
        raise ValueError("n_streams and n_readings must be at least 1")
    if not 1 <= n_features <= len(FEATURES):
        raise ValueError(f"n_features must be between 1 and {len(FEATURES)}")
    if normal_readings < 0:
        raise ValueError("normal_readings must not be negative")
    if not 0.0 <= fault_fraction <= 1.0:
        raise ValueError("fault_fraction must be between 0 and 1")
    if not step_seconds > 0:
        raise ValueError("step_seconds must be positive")
    S, T, F = n_streams, n_readings, n_features
    if not 0 <= n_regimes <= S - round(fault_fraction * S):
        raise ValueError(f"n_regimes must be between 0 and the streams without a fault "
                         f"({S - round(fault_fraction * S)})")
    normal_readings = min(normal_readings, T)  # a run shorter than the normal period is all normal, no faults
    # the fourth child is new: the first three are what they were before regime changes existed
    signal_seq, fault_seq, gap_seq, regime_seq = np.random.SeedSequence(seed).spawn(4)
    if fault_seed is not None:
        fault_seq = np.random.SeedSequence(fault_seed)
    timestamps = start + step_seconds * np.arange(T, dtype=np.float64)

    clean, noise, switches = _clean_signals(np.random.default_rng(signal_seq), S, timestamps, step_seconds)
    width = max(3, len(str(S - 1)))
    streams = [f"pump-{s:0{width}d}" for s in range(S)]
    features = list(FEATURES[:F])

    # Every stream gets a candidate fault (so nothing below depends on fault_fraction); the first
    # round(fault_fraction * S) streams of a seeded permutation get theirs applied.
    candidates: list[_Candidate | None] = [None] * S
    rank = np.empty(S, dtype=np.int64)
    rank[np.random.default_rng(fault_seq).permutation(S)] = np.arange(S)
    if T - normal_readings >= _MIN_FAULT_ROOM:
        for s, child in enumerate(fault_seq.spawn(S)):
            kind = FAULT_KINDS[int(rank[s]) % len(FAULT_KINDS)]
            candidates[s] = _candidate(np.random.default_rng(child), kind, int(rank[s]), features,
                                       normal_readings, T, switches[s])

    missing = _gaps(np.random.default_rng(gap_seq), S, T)
    for s, c in enumerate(candidates):
        if c is not None and c.kind == "spike":  # a spike is a few readings: never hide it in a gap
            missing[s, c.start:c.end, [_IDX[f] for f in c.features]] = False

    # regime changes go to the streams ranked last for faults: never faulty ones (checked above)
    regimes = []
    if n_regimes and T - normal_readings >= _MIN_FAULT_ROOM:
        rng = np.random.default_rng(regime_seq)
        for s in np.argsort(rank)[::-1][:n_regimes].tolist():
            shift = _regime(rng, streams[s], features, normal_readings, T)
            _apply_regime(shift, clean[s], rng)
            regimes.append(shift)
        regimes.sort(key=lambda r: (r.start, r.stream))

    n_faulty = round(fault_fraction * S)
    values = clean
    faults = []
    for s, c in enumerate(candidates):
        if c is not None and c.rank < n_faulty:
            _apply(c, values[s], noise[s])
            faults.append(Fault(streams[s], c.kind, c.start, c.end, c.features))
    values = values[:, :, :F]
    values[missing[:, :, :F]] = np.nan
    faults.sort(key=lambda f: (f.start, f.stream))
    return Fleet(streams, features, timestamps, values.astype(np.float32), faults, normal_readings, regimes)


def fleet_records(fleet: Fleet, start: int = 0, end: int | None = None) -> Iterator[dict[str, Any]]:
    """Readings [start, end) of every stream as `{"stream", "ts", "values"}` dicts, in time order.

    Missing (NaN) values are left out of `values`; a reading with no value at all (a whole-reading gap: the
    machine sent nothing) yields no record.
    """
    T = len(fleet.timestamps)
    end = T if end is None else end
    if not 0 <= start <= end <= T:
        raise ValueError(f"need 0 <= start <= end <= {T}, got start={start} end={end}")
    feats = fleet.features
    for t in range(start, end):
        ts = float(fleet.timestamps[t])
        for stream, row in zip(fleet.streams, fleet.values[:, t, :].tolist(), strict=True):
            vals = {f: v for f, v in zip(feats, row, strict=True) if v == v}
            if vals:
                yield {"stream": stream, "ts": ts, "values": vals}


def fleet_to_frame(fleet: Fleet, start: int = 0, end: int | None = None) -> Any:
    """Readings [start, end) as a long DataFrame: timestamp, stream, one column per feature (NaN kept)."""
    import pandas as pd

    T = len(fleet.timestamps)
    end = T if end is None else end
    if not 0 <= start <= end <= T:
        raise ValueError(f"need 0 <= start <= end <= {T}, got start={start} end={end}")
    S, n = len(fleet.streams), end - start
    vals = fleet.values[:, start:end, :].transpose(1, 0, 2).reshape(n * S, len(fleet.features))
    cols: dict[str, Any] = {
        "timestamp": np.repeat(fleet.timestamps[start:end], S),
        "stream": np.tile(np.array(fleet.streams, dtype=object), n),
    }
    cols.update({f: vals[:, i] for i, f in enumerate(fleet.features)})
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------------------------- internals


@dataclass(frozen=True, slots=True)
class _Candidate:
    kind: str
    rank: int
    start: int
    end: int
    features: tuple[str, ...]
    params: tuple[float, ...]  # per feature: end/offset magnitude in sigmas (signed), or noise factor
    power: float = 1.0  # drift shape exponent


def _lag(x: np.ndarray, tau: float, *, warm: bool = True) -> np.ndarray:
    """First-order lag (exponential smoothing, time constant `tau` readings) along axis 1, via FFT.

    warm: the series is taken as steady at its first value before the start (else as zero before it).
    """
    if tau < 1e-3:
        return x.copy()
    a = math.exp(-1.0 / tau)
    K = int(math.ceil(10.0 * tau)) + 1
    k = (1.0 - a) * a ** np.arange(K)
    k /= k.sum()
    head = np.repeat(x[:, :1], K - 1, axis=1) if warm else np.zeros((x.shape[0], K - 1))
    pad = np.concatenate([head, x], axis=1)
    n = pad.shape[1] + K - 1
    nfft = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(pad, nfft, axis=1) * np.fft.rfft(k, nfft), nfft, axis=1)
    return y[:, K - 1:K - 1 + x.shape[1]]


def _clean_signals(rng: np.random.Generator, S: int, ts: np.ndarray,
                   step: float) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(S, T, 8) clean values (signal + noise), (S, T, 8) noise alone, each stream's load switch indices."""
    T = len(ts)
    u = rng.uniform
    phase = u(0, 2 * np.pi, S)
    load_base, load_daily = u(0.55, 0.72, S), u(0.12, 0.22, S)
    switch_rate = u(2.0, 5.0, S)  # load changes per day
    rpm_nom = rng.choice([1480.0, 1780.0, 2960.0], S)
    flow_nom, p_static, p_dyn = u(60, 200, S), u(0.5, 1.5, S), u(3.0, 6.0, S)
    i_nom, v0, v_daily = u(25, 60, S), u(395, 410, S), u(2.0, 4.0, S)
    amb_base, amb_daily, dt_nom = u(18, 28, S), u(2.5, 5.0, S), u(25, 40, S)
    vib_x0, vib_y_ratio = u(1.6, 3.2, S), u(0.6, 0.9, S)

    col = (lambda a: a[:, None])  # noqa: E731  (S,) -> (S, 1)
    theta = 2 * np.pi * ts[None, :] / _DAY + col(phase)  # daily cycle in event time
    shape = np.sin(theta) + 0.25 * np.sin(2 * theta)

    piece = np.empty((S, T))
    switches = []
    days = T * step / _DAY
    for s in range(S):  # piecewise-constant load levels: a reflected random walk of switch steps
        n = int(rng.poisson(switch_rate[s] * days))
        at = np.unique(rng.integers(1, T, n)) if T > 1 and n else np.zeros(0, dtype=np.int64)
        steps = rng.uniform(0.08, 0.25, len(at)) * rng.choice([-1.0, 1.0], len(at))
        walk = np.concatenate([[rng.uniform(-0.15, 0.15)], rng.uniform(-0.15, 0.15) + np.cumsum(steps)])
        levels = 0.15 - np.abs(np.mod(walk + 0.15, 0.6) - 0.3)  # fold into [-0.15, 0.15]
        piece[s] = levels[np.searchsorted(at, np.arange(T), side="right")]
        switches.append(at)
    target = np.clip(col(load_base) + col(load_daily) * shape + piece, 0.25, 1.0)
    load = _lag(target, 180.0 / step)  # the drive ramps over a few minutes
    speed = 0.55 + 0.45 * load  # fraction of nominal speed

    weather = rng.standard_normal((S, T + int(math.ceil(10 * 21600.0 / step)) + 1))
    tau_w = 21600.0 / step
    a_w = math.exp(-1.0 / tau_w)
    weather = _lag(weather, tau_w, warm=False)[:, -T:] * (0.8 / math.sqrt((1 - a_w) / (1 + a_w)))

    sig = np.empty((S, T, len(FEATURES)))
    voltage = col(v0) - col(v_daily) * np.sin(theta + 0.3) - 3.0 * load
    current = col(i_nom) * (0.25 + 0.75 * speed**3) * (400.0 / voltage)
    ambient = col(amb_base) + col(amb_daily) * np.sin(theta - 0.8) + weather
    heating = _lag((current / col(i_nom)) ** 2, 1800.0 / step)  # thermal time constant 30 min
    sig[:, :, _IDX["temp"]] = ambient + col(dt_nom) * heating
    sig[:, :, _IDX["vibration_x"]] = col(vib_x0) * (0.35 + 0.65 * speed**2)
    sig[:, :, _IDX["vibration_y"]] = col(vib_x0 * vib_y_ratio) * (0.5 + 0.5 * speed**2.5)
    sig[:, :, _IDX["pressure"]] = col(p_static) + col(p_dyn) * speed**2
    sig[:, :, _IDX["flow"]] = col(flow_nom) * speed
    sig[:, :, _IDX["current"]] = current
    sig[:, :, _IDX["rpm"]] = col(rpm_nom) * speed
    sig[:, :, _IDX["voltage"]] = voltage
    noise = rng.standard_normal((S, T, len(FEATURES))) * _SIGMA
    return sig + noise, noise, switches


def _gaps(rng: np.random.Generator, S: int, T: int) -> np.ndarray:
    """(S, T, 8) bool: missing values, in about a third of the streams."""
    nf = len(FEATURES)
    gappy = rng.random(S) < 0.35
    missing = (rng.random((S, T, nf)) < 0.002) & gappy[:, None, None]  # single lost values
    for s in np.flatnonzero(gappy):
        for _ in range(int(rng.poisson(T / 1500.0))):  # one sensor drops out for 3 to 30 readings
            t0, n, f = int(rng.integers(0, T)), int(rng.integers(3, 31)), int(rng.integers(0, nf))
            missing[s, t0:t0 + n, f] = True
        for _ in range(int(rng.poisson(T / 2500.0))):  # the whole machine is silent for 1 to 3 readings
            t0, n = int(rng.integers(0, T)), int(rng.integers(1, 4))
            missing[s, t0:t0 + n, :] = True
    return missing


def _candidate(rng: np.random.Generator, kind: str, rank: int, features: list[str], normal: int, T: int,
               switches: np.ndarray) -> _Candidate:
    """The fault this stream would get: span, sensors and magnitudes (drawn whether or not it is applied)."""
    avail = set(features)
    room = T - normal
    lo = normal + min(50, room // 10)
    tail = min(200, room // 5)  # leave time to detect a fault before the series ends
    d_lo, d_hi = _DURATION[kind]
    d = min(int(rng.integers(d_lo, d_hi + 1)), max(1, (T - lo) // 2))
    hi = max(lo, T - max(d, tail))

    def pick(names: tuple[str, ...], k: int = 1) -> tuple[str, ...]:
        pool = [f for f in names if f in avail] or list(features)
        idx = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
        return tuple(pool[i] for i in sorted(idx))

    def sign() -> float:
        return float(rng.choice([-1.0, 1.0]))

    start = int(rng.integers(lo, hi + 1))
    power = 1.0
    if kind == "drift":  # bearing wear: vibration and temperature creep up, then the bearing is replaced
        feats = tuple(f for f in ("temp", "vibration_x", "vibration_y") if f in avail)
        params = tuple(float(rng.uniform(*_DRIFT_END_SIGMAS.get(f, (8.0, 12.0)))) for f in feats)
        power = float(rng.uniform(1.2, 1.8))
    elif kind == "spike":  # a few readings far off (vibration impacts upwards, others either way)
        feats = pick(tuple(features))
        params = tuple(float(rng.uniform(*_SPIKE_SIGMAS)) * (1.0 if f.startswith("vib") else sign())
                       for f in feats)
    elif kind == "level_shift":  # a sensor's calibration jumps: persistent offset, broken correlation
        feats = pick(tuple(features), int(rng.integers(1, 3)))
        params = tuple(float(rng.uniform(*_SHIFT_SIGMAS)) * sign() for _ in feats)
    elif kind == "stuck":  # a sensor freezes at its last value; make the span cover a load change
        feats = pick(_STUCK_CANDIDATES)
        inside = switches[(switches >= lo + d // 4) & (switches < hi + 3 * d // 4)]
        if len(inside):
            at = int(rng.choice(inside))
            start = int(np.clip(at - int(rng.integers(d // 4, 3 * d // 4 + 1)), lo, hi))
        params = (0.0,)
    else:  # noise_burst: loose mounting or electrical interference multiplies the noise
        feats = pick(_NOISE_GROUPS[int(rng.integers(0, len(_NOISE_GROUPS)))], 2)
        params = tuple(float(rng.uniform(*_NOISE_FACTOR)) for _ in feats)
    return _Candidate(kind, rank, start, min(start + d, T), feats, params, power)


def _regime(rng: np.random.Generator, stream: str, features: list[str], normal: int, T: int) -> RegimeShift:
    """Where a stream's operating point changes: early enough after the normal period to watch it settle."""
    room = T - normal
    start = int(rng.integers(normal + room // 10, normal + max(room // 3, room // 10 + 1)))
    feats = tuple(f for f in ("pressure", "flow") if f in features) or (features[0],)
    return RegimeShift(stream, start, feats)


def _apply_regime(r: RegimeShift, values: np.ndarray, rng: np.random.Generator) -> None:
    """Move one stream's (T, 8) clean values to the new operating point from r.start on, in place."""
    n = len(values) - r.start
    ramp = np.minimum(np.arange(1, n + 1) / _REGIME_RAMP, 1.0)
    dp = float(rng.uniform(*_REGIME_PRESSURE_BAR))
    drop = float(rng.uniform(*_REGIME_FLOW_DROP))
    if "pressure" in r.features:
        values[r.start:, _IDX["pressure"]] += dp * ramp
    else:  # too few sensors for a valve: the first one moves by as many of its sigmas
        i = _IDX[r.features[0]]
        values[r.start:, i] += dp / _SIGMA[_IDX["pressure"]] * _SIGMA[i] * ramp
    if "flow" in r.features:
        values[r.start:, _IDX["flow"]] *= 1.0 - drop * ramp


def _apply(c: _Candidate, values: np.ndarray, noise: np.ndarray) -> None:
    """Inject the fault into one stream's (T, 8) clean values, in place, in readings [start, end) only."""
    span = slice(c.start, c.end)
    n = c.end - c.start
    for f, p in zip(c.features, c.params, strict=True):
        i = _IDX[f]
        if c.kind == "drift":
            values[span, i] += p * _SIGMA[i] * (np.arange(1, n + 1) / n) ** c.power
        elif c.kind in ("spike", "level_shift"):
            values[span, i] += p * _SIGMA[i]
        elif c.kind == "stuck":
            values[span, i] = values[c.start - 1, i]
        else:
            values[span, i] += (p - 1.0) * noise[span, i]
