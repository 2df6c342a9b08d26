"""Threshold policies: warning and critical score levels per stream, kept separate from scoring."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from detector.artifact import Manifest
from detector.config import PolicyConfig
from detector.labels import Labeler, StreamMatch
from detector.rows import RowState, grown, needed

__all__ = ["ThresholdPolicy", "StaticThreshold", "CalibratedThreshold", "RollingThreshold", "EvtThreshold",
           "StreamOverrides", "BudgetThreshold",
           "fit_gpd", "pot_quantile", "build_threshold"]


class ThresholdPolicy(RowState, ABC):
    """Gives each scored window its warning and critical level."""

    name: str

    @abstractmethod
    def levels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Warning and critical levels (each (K,) float64) for windows of stream rows `rows`."""

    def learn(self, rows: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> None:  # noqa: B027
        """Update from scored windows (`flagged`: those at or above warning, which a policy may leave out, e.g.
        rolling with learn_from_flagged false). Fixed policies ignore it."""

    def policy_of(self, row: int) -> str:
        """The name of the policy in force for a stream row."""
        return self.name

    def forget_rows(self, rows: np.ndarray) -> None:  # noqa: B027
        """These rows' streams are gone (their rows go to new streams): drop what was worked out from their ids."""


class StaticThreshold(ThresholdPolicy):
    """Fixed score values.

    >>> w, c = StaticThreshold(5.0, 9.0).levels(np.array([0, 3]))
    >>> w.tolist(), c.tolist()
    ([5.0, 5.0], [9.0, 9.0])
    """

    name = "static"

    def __init__(self, warning: float, critical: float) -> None:
        self.warning, self.critical = float(warning), float(critical)

    def levels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same two values for every window."""
        return np.full(len(rows), self.warning), np.full(len(rows), self.critical)


class CalibratedThreshold(StaticThreshold):
    """Quantiles of the window scores measured on held-back normal data when the model was trained."""

    name = "calibrated"

    def __init__(self, manifest: Manifest, warning_q: float, critical_q: float, scale: float = 1.0) -> None:
        super().__init__(scale * manifest.quantile(warning_q), scale * manifest.quantile(critical_q))
        self.warning_q, self.critical_q = warning_q, critical_q


class BudgetThreshold(StaticThreshold):
    """The calibrated levels that let at most `alerts_per_day` alerts per stream through at normal operation.

    A day holds D = 86400 / (reading interval x hop) windows. Under the k-of-n rule, with windows
    exceeding a level independently with probability p, about D x C(n, k) x p^k alerts a day would be
    raised; solving for p and taking the calibration quantile 1 - p gives the level. The calibration
    distribution ends at its largest score, so budgets below what it resolves give that score.

    >>> from detector.artifact import Manifest
    >>> m = Manifest(["a"], [0.0], [1.0], 32, 8, 8, 1, [0.0], [1.0], [0.0, 0.99, 1.0], [0.0, 10.0, 20.0])
    >>> b = BudgetThreshold(m, alerts_per_day=1.8, critical_per_day=0.1, reading_interval_s=60.0, k=1, n=1)
    >>> round(b.warning, 2)  # 180 windows a day: p = 0.01, the 0.99 quantile
    10.0
    """

    name = "budget"

    def __init__(self, manifest: Manifest, alerts_per_day: float, critical_per_day: float, reading_interval_s: float,
                 k: int, n: int) -> None:
        per_day = 86400.0 / (reading_interval_s * manifest.hop)
        ways = math.comb(n, k)

        def level(budget: float) -> float:
            p = min((budget / (per_day * ways)) ** (1.0 / k), 0.5)
            return manifest.quantile(1.0 - p)

        super().__init__(level(alerts_per_day), level(critical_per_day))


class RollingThreshold(ThresholdPolicy):
    """Each stream's levels follow its own recent window scores: median + k x MAD, floored by a base policy.

    A stream whose normal operation sits above what the training data showed (another load, a warmer
    season) would otherwise alert forever. The median and the MAD (scaled to a standard deviation) of its
    last `history` window scores adapt to that; being robust, they move only when most of the history moves,
    so a fault that lasts less than half of `history` windows stays visible. Until a stream has
    `min_history` windows, and whenever the rolling level would be lower, the base policy's levels apply.
    With `learn_from_flagged` False, windows at or above warning are left out of the history (River's
    `protect_anomaly_detector`): a fault never becomes the new normal, but neither does a lasting rise of
    the normal level, whose alert then stays open until an operator acts (see docs/operators.md). With
    `telemanom`, the warning level is telemanom's nonparametric threshold of the history (`telemanom_level`)
    and the critical level that times the base policy's critical / warning ratio.

    >>> base = StaticThreshold(5.0, 9.0)
    >>> t = RollingThreshold(base, history=10, min_history=4, warning_k=3.0, critical_k=6.0)
    >>> rows = np.zeros(6, np.int64)
    >>> t.levels(rows[:1])[0].tolist()
    [5.0]
    >>> t.learn(rows, np.array([20.0, 21.0, 22.0, 20.0, 21.0, 22.0]), np.ones(6, bool))
    >>> [round(v, 2) for v in t.levels(rows[:1])[0].tolist()]
    [25.45]
    """

    name = "rolling"

    def __init__(self, base: ThresholdPolicy, history: int, min_history: int, warning_k: float,
                 critical_k: float, learn_from_flagged: bool = True,
                 quantiles: tuple[float, float] | None = None, telemanom: bool = False) -> None:
        self.base = base
        self.telemanom = telemanom
        self.quantiles = quantiles  # (warning, critical): levels are these quantiles of the history instead
        self.learn_from_flagged = learn_from_flagged
        self.history, self.min_history = history, min_history
        self.warning_k, self.critical_k = warning_k, critical_k
        self.buf = np.full((0, history), np.nan, np.float32)
        self.pos = np.zeros(0, np.int64)
        self.n = np.zeros(0, np.int64)

    def row_fields(self) -> dict[str, object]:
        """The score history ring of each stream."""
        return {"buf": np.nan, "pos": 0, "n": 0}

    def _ensure(self, rows: np.ndarray) -> None:
        cap = needed(rows, len(self.n))
        if cap:
            self.buf, self.pos, self.n = grown(self.buf, cap, np.nan), grown(self.pos, cap), grown(self.n, cap)

    def levels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The base levels, raised to each stream's median + k x MAD (or quantiles) once it has enough history."""
        warning, critical = self.base.levels(rows)
        self._ensure(rows)
        ready = self.n[rows] >= self.min_history
        if ready.any():
            r = np.unique(rows[ready])
            hist = self.buf[r]
            if self.telemanom:  # each history in time order: oldest first, from the ring's write position
                ordered = [np.roll(h, -int(p)) for h, p in zip(hist, self.pos[r], strict=True)]
                own_w = np.array([telemanom_level(h) for h in ordered])
                ratio = np.divide(critical, warning, out=np.ones_like(critical), where=warning > 0)
                own_c = own_w * float(np.max(ratio[ready])) if len(ratio[ready]) else own_w
            elif self.quantiles is None:
                med = np.nanmedian(hist, axis=1)
                mad = 1.4826 * np.nanmedian(np.abs(hist - med[:, None]), axis=1)
                own_w, own_c = med + self.warning_k * mad, med + self.critical_k * mad
            else:
                own_w, own_c = np.nanquantile(hist, self.quantiles, axis=1)
            at = np.searchsorted(r, rows[ready])
            warning = warning.copy()
            critical = critical.copy()
            warning[ready] = np.maximum(warning[ready], own_w[at])
            critical[ready] = np.maximum(critical[ready], own_c[at])
        return warning, critical

    def learn(self, rows: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> None:
        """Append the windows' scores to their streams' histories (windows ordered by row, then time).

        Every window is learned from, flagged or not, unless `learn_from_flagged` is False.
        """
        if not self.learn_from_flagged:
            rows, scores = rows[~flagged], scores[~flagged]
        if not len(rows):
            return
        self._ensure(rows)
        first = np.ones(len(rows), bool)
        first[1:] = rows[1:] != rows[:-1]
        starts = np.flatnonzero(first)
        rank = np.arange(len(rows)) - starts[np.cumsum(first) - 1]
        slot = (self.pos[rows] + rank) % self.history
        self.buf[rows, slot] = scores
        u, counts = np.unique(rows, return_counts=True)
        self.pos[u] = (self.pos[u] + counts) % self.history
        self.n[u] += counts


TELEMANOM_Z = np.arange(2.0, 10.5, 0.5)
"""The candidate thresholds mean + z x std that `telemanom_level` chooses from (Hundman et al. 2018)."""
TELEMANOM_PRUNE = 0.13
"""Pruning: an anomalous run whose peak is within this share of the next lower peak is taken back as normal."""


def telemanom_level(history: np.ndarray) -> float:
    """Telemanom's nonparametric threshold of one stream's scores in time order (NaN: none yet).

    Of the candidates mean + z x std, the one that removes the most of the mean and spread per anomalous value
    and run above it: argmax (dmean / mean + dstd / std) / (n_above + runs^2). Then pruning: the peaks of the
    runs above it, in falling order with the highest value below it last; where a peak is within
    TELEMANOM_PRUNE of the next, it and every lower run are taken back as normal, and the level rises to the
    highest peak taken back.

    >>> rng = np.random.default_rng(0)
    >>> e = np.abs(rng.normal(0, 1, 500)); e[300:305] = 9.0
    >>> level = telemanom_level(e)
    >>> bool(float(np.sort(e)[-6]) <= level < 9.0)
    True
    """
    e = history[~np.isnan(history)]
    mean, std = float(e.mean()), float(e.std())
    if std <= 0:
        return mean
    best, best_eps = -np.inf, mean + TELEMANOM_Z[-1] * std
    for z in TELEMANOM_Z:
        eps = mean + z * std
        above = e > eps
        n = int(above.sum())
        if n == 0 or n == len(e):
            continue
        runs = int(np.count_nonzero(above[1:] & ~above[:-1]) + above[0])
        below = e[~above]
        gain = ((mean - below.mean()) / mean if mean > 0 else 0.0) + (std - below.std()) / std
        if gain / (n + runs**2) > best:
            best, best_eps = gain / (n + runs**2), eps
    above = e > best_eps
    if not above.any():
        return best_eps
    starts = np.flatnonzero(above & ~np.r_[False, above[:-1]])
    ends = np.flatnonzero(above & ~np.r_[above[1:], False]) + 1
    peaks = np.sort([e[a:b].max() for a, b in zip(starts, ends, strict=True)])[::-1]
    ladder = np.r_[peaks, e[~above].max()]
    drop = (ladder[:-1] - ladder[1:]) / ladder[:-1]
    keep = np.flatnonzero(drop > TELEMANOM_PRUNE)
    kept = keep[-1] + 1 if len(keep) else 0  # runs 0..kept-1 stay anomalous
    return float(peaks[kept]) if kept < len(peaks) else best_eps


def fit_gpd(peaks: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood shape and scale (gamma, sigma) of a generalised Pareto law fitted to excesses >= 0."""
    from scipy.stats import genpareto

    gamma, _, sigma = genpareto.fit(np.asarray(peaks, np.float64), floc=0.0)
    return float(gamma), float(sigma)


def pot_quantile(t: float, gamma: float, sigma: float, risk: float, n: int, n_peaks: int) -> float:
    """The level exceeded with probability `risk`, from n observations of which n_peaks exceeded t (SPOT eq. 1).

    >>> round(pot_quantile(1.0, 0.0, 2.0, 0.001, 1000, 100), 3)  # exponential tail: t + sigma * ln(n_t / (q n))
    10.21
    """
    r = risk * n / max(n_peaks, 1)
    if abs(gamma) < 1e-6:
        return float(t - sigma * np.log(r))
    return float(t + sigma / gamma * (r ** (-gamma) - 1.0))


class EvtThreshold(ThresholdPolicy):
    """Peaks over threshold per stream (SPOT, Siffer et al., KDD 2017; DSPOT when `drift_window` > 0).

    The scores above the initial threshold t (the `level` quantile of the calibration scores) are modelled
    as t plus a generalised Pareto excess; the warning and critical levels are the scores that a normal
    window exceeds with probability `warning_risk` and `critical_risk`. Every stream starts from the
    calibration tail and then learns its own: each window below warning that exceeds t adds a peak, and the
    tail is refitted after `refit_every` new peaks (windows at or above warning are never learned). DSPOT
    measures scores from the mean of the stream's last `drift_window` normal scores, so the levels follow a
    slow drift of the normal score. As in SPOT, what reaches warning is never learned: a stream whose normal
    tail is heavier than the calibration's keeps alerting on it, while a lighter one earns lower levels.
    """

    name = "evt"

    def __init__(self, calibration: np.ndarray, warning_risk: float, critical_risk: float, level: float = 0.98,
                 drift_window: int = 0, max_peaks: int = 500, refit_every: int = 10) -> None:
        sample = np.sort(np.asarray(calibration, np.float64))
        self._init_mean = float(sample.mean())
        if drift_window:  # DSPOT models scores relative to the recent normal mean: so does the initial tail
            sample = sample - self._init_mean
        self.risks = (warning_risk, critical_risk)
        self.t = float(np.quantile(sample, level))
        self.drift_window, self.max_peaks, self.refit_every = drift_window, max_peaks, refit_every
        self._init_peaks = (sample[sample > self.t] - self.t)[-max_peaks:]
        self._init_n = len(sample)
        g, sg = fit_gpd(self._init_peaks) if len(self._init_peaks) >= 10 else (0.0, max(float(sample.std()), 1e-6))
        self._init_levels = tuple(pot_quantile(self.t, g, sg, q, self._init_n, len(self._init_peaks))
                                  for q in self.risks)
        self.cap = 0
        self.peaks = np.zeros((0, max_peaks), np.float32)
        self.n_peaks = np.zeros(0, np.int64)  # peaks ever seen (the buffer keeps the last max_peaks)
        self.n = np.zeros(0, np.int64)
        self.fresh = np.zeros(0, np.int64)  # peaks since the last fit
        self.warning = np.zeros(0)
        self.critical = np.zeros(0)
        self.recent = np.zeros((0, max(drift_window, 1)))
        self.n_recent = np.zeros(0, np.int64)

    def row_fields(self) -> dict[str, object]:
        """Each stream's peaks, counts, levels and (DSPOT) recent normal scores; a fresh row is the calibration's."""
        first = np.zeros(self.max_peaks, np.float32)
        first[: len(self._init_peaks)] = self._init_peaks
        return {"peaks": first, "n_peaks": len(self._init_peaks), "n": self._init_n, "fresh": 0,
                "warning": self._init_levels[0], "critical": self._init_levels[1], "recent": self._init_mean,
                "n_recent": self.drift_window}

    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set these streams' state (None: fresh, from the calibration tail)."""
        self._ensure(rows)
        return super().import_rows(rows, state)

    def _ensure(self, rows: np.ndarray) -> None:
        cap = needed(rows, self.cap)
        if not cap:
            return
        old, k = self.cap, len(self._init_peaks)
        self.peaks = grown(self.peaks, cap)
        self.peaks[old:, :k] = self._init_peaks  # every new stream starts from the calibration tail
        self.n_peaks = grown(self.n_peaks, cap, k)
        self.n = grown(self.n, cap, self._init_n)
        self.fresh = grown(self.fresh, cap)
        self.warning = grown(self.warning, cap, self._init_levels[0])
        self.critical = grown(self.critical, cap, self._init_levels[1])
        self.recent = grown(self.recent, cap, self._init_mean)  # DSPOT starts from the calibration mean
        self.n_recent = grown(self.n_recent, cap, self.drift_window)
        self.cap = cap

    def _drift(self, rows: np.ndarray) -> np.ndarray:
        if not self.drift_window:
            return np.zeros(len(rows))
        return self.recent[rows].mean(axis=1)

    def levels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each stream's fitted tail quantiles, plus its recent normal mean under DSPOT."""
        self._ensure(rows)
        base = self._drift(rows)
        return self.warning[rows] + base, self.critical[rows] + base

    def learn(self, rows: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> None:
        """Count normal windows, keep their peaks over t, and refit the streams that gathered enough peaks."""
        if not len(rows):
            return
        self._ensure(rows)
        ok = ~flagged
        r, x = rows[ok], scores[ok] - self._drift(rows)[ok]
        np.add.at(self.n, r, 1)
        if self.drift_window:
            for row, v in zip(r.tolist(), scores[ok].tolist(), strict=True):  # windows of a batch, in order
                self.recent[row, self.n_recent[row] % self.drift_window] = v
                self.n_recent[row] += 1
        over = x > self.t
        for row, excess in zip(r[over].tolist(), (x[over] - self.t).tolist(), strict=True):
            self.peaks[row, self.n_peaks[row] % self.max_peaks] = excess
            self.n_peaks[row] += 1
            self.fresh[row] += 1
        for row in np.unique(r[over]).tolist():
            if self.fresh[row] >= self.refit_every:
                self._refit(row)

    def _refit(self, row: int) -> None:
        k = int(min(self.n_peaks[row], self.max_peaks))
        if k < 10:
            return
        gamma, sigma = fit_gpd(self.peaks[row, :k])
        n_peaks = int(self.n_peaks[row])
        self.warning[row], self.critical[row] = (pot_quantile(self.t, gamma, sigma, q, int(self.n[row]), n_peaks)
                                                 for q in self.risks)
        self.fresh[row] = 0


class StreamOverrides(ThresholdPolicy):
    """Per-stream policies: the first override that selects a stream (glob and/or labels) picks its policy.

    Streams no override selects get the default policy. A plain string selects by glob on the stream id.

    >>> names = ["pump-1", "turbine-1", "fan-1"]
    >>> labels = Labeler([{"streams": "fan-*", "labels": {"kind": "fan"}}])
    >>> t = StreamOverrides(StaticThreshold(5.0, 9.0), [("turbine-*", StaticThreshold(20.0, 60.0)),
    ...                     (StreamMatch(labels={"kind": "fan"}), StaticThreshold(7.0, 9.0))], names, labels)
    >>> w, c = t.levels(np.array([0, 1, 0, 2]))
    >>> w.tolist(), t.policy_of(1)
    ([5.0, 20.0, 5.0, 7.0], 'static')
    """

    name = "overrides"

    def __init__(self, default: ThresholdPolicy, overrides: list[tuple[str | StreamMatch, ThresholdPolicy]],
                 names: list[str], labels: Labeler | None = None) -> None:
        self.policies = [default] + [p for _, p in overrides]
        self.selectors = [m if isinstance(m, StreamMatch) else StreamMatch(m) for m, _ in overrides]
        self.names = names  # the engine's stream ids by row (grows as streams appear)
        self.labels = labels or Labeler()
        self.group = np.full(0, -1, np.int64)

    def _groups(self, rows: np.ndarray) -> np.ndarray:
        self.group = grown(self.group, needed(rows, len(self.group)), -1)
        for row in np.unique(rows[self.group[rows] < 0]).tolist():  # once per stream, when it first appears
            name = self.names[row]
            labels = self.labels(name)
            self.group[row] = next((i + 1 for i, m in enumerate(self.selectors) if m.matches(name, labels)), 0)
        return self.group[rows]

    def policy_of(self, row: int) -> str:
        """The name of the policy in force for a stream row."""
        return self.policies[int(self._groups(np.array([row]))[0])].name

    def forget_rows(self, rows: np.ndarray) -> None:
        """These rows' streams are gone: their policy is picked again for the next stream a row holds."""
        self.group[rows[rows < len(self.group)]] = -1

    def export_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every policy's state of these streams, its fields prefixed by the policy's position."""
        return {f"{i}.{k}": v for i, p in enumerate(self.policies) for k, v in p.export_rows(rows).items()}

    def import_rows(self, rows: np.ndarray, state: dict[str, np.ndarray] | None) -> list[str]:
        """Set every policy's state of these streams (None: fresh)."""
        misfit = []
        for i, p in enumerate(self.policies):
            mine = None if state is None else {k.split(".", 1)[1]: v for k, v in state.items()
                                               if k.startswith(f"{i}.")}
            misfit += [f"{i}.{k}" for k in p.import_rows(rows, mine)]
        return misfit

    def levels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each window's levels from its stream's policy."""
        groups = self._groups(rows)
        warning, critical = np.empty(len(rows)), np.empty(len(rows))
        for g in np.unique(groups).tolist():
            sel = groups == g
            warning[sel], critical[sel] = self.policies[g].levels(rows[sel])
        return warning, critical

    def learn(self, rows: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> None:
        """Each policy learns from its own streams' windows."""
        groups = self._groups(rows)
        for g in np.unique(groups).tolist():
            sel = groups == g
            self.policies[g].learn(rows[sel], scores[sel], flagged[sel])


def build_threshold(cfg: PolicyConfig, manifest: Manifest, names: list[str] | None = None,
                    rule: tuple[int, int] = (1, 1), labels: Labeler | None = None) -> ThresholdPolicy:
    """The policy that `thresholds.policy` names (with its per-stream overrides), built from the config.

    `rule` is the alert rule's (k, n), which the budget policy needs to turn alerts into window levels;
    `labels` gives each stream's labels, for overrides that select streams by label.
    """
    overrides = getattr(cfg, "overrides", [])
    if overrides:
        if names is None:
            raise ValueError("per-stream overrides need the stream ids (names)")
        return StreamOverrides(build_threshold(cfg.model_copy(update={"overrides": []}), manifest, rule=rule),
                               [(StreamMatch(o.streams, dict(o.labels)), build_threshold(o, manifest, rule=rule))
                                for o in overrides], names, labels)
    if cfg.policy == "static":
        return StaticThreshold(cfg.static.warning, cfg.static.critical)
    if cfg.policy == "budget":
        b = cfg.budget
        return BudgetThreshold(manifest, b.alerts_per_day, b.critical_per_day, b.reading_interval_s, *rule)
    c = cfg.calibrated
    calibrated = CalibratedThreshold(manifest, c.warning, c.critical, c.scale)
    if cfg.policy == "rolling":
        r = cfg.rolling
        return RollingThreshold(calibrated, r.history, r.min_history, r.warning_k, r.critical_k,
                                r.learn_from_flagged,
                                (r.warning_quantile, r.critical_quantile) if r.method == "quantile" else None,
                                telemanom=r.method == "telemanom")
    if cfg.policy == "evt":
        e = cfg.evt
        return EvtThreshold(calibration_sample(manifest), e.warning_risk, e.critical_risk, e.level, e.drift_window,
                            e.max_peaks, e.refit_every)
    return calibrated


def calibration_sample(manifest: Manifest, n: int | None = None) -> np.ndarray:
    """A sample of calibration window scores rebuilt from the manifest's stored quantiles (inverse CDF)."""
    n = n or int(manifest.training.get("calibration_windows") or 2000)
    n = max(n, 200)
    return np.interp((np.arange(n) + 0.5) / n, manifest.calibration_levels, manifest.calibration_scores)
