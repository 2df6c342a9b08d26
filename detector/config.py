"""The one frozen, validated configuration object, loaded once from config.yaml.

Every key has its default here and beside it in the root config.yaml; ``${VAR}`` in a string value is
replaced by the environment variable VAR when the file is loaded, so secrets never sit in the YAML.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from detector.errors import ConfigError

__all__ = [
    "Config",
    "KafkaConfig",
    "InputConfig",
    "OutputConfig",
    "DeliveryConfig",
    "ControlConfig",
    "ModelConfig",
    "ScoringConfig",
    "ThresholdConfig",
    "PolicyConfig",
    "ThresholdOverride",
    "RollingLevels",
    "EvtLevels",
    "BudgetLevels",
    "AlertConfig",
    "RegimeConfig",
    "MaintenanceWindow",
    "StreamLabels",
    "StreamsConfig",
    "SensorConfig",
    "RuntimeConfig",
    "MetricsConfig",
    "load_config",
    "config_hash",
    "config_schema",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Section):
    """Where Kafka is and how to reach it; TLS and SASL settings pass through to kafka-python."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "detector"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    request_timeout_ms: int = Field(30000, ge=1000)
    connect_timeout_ms: int = Field(10000, ge=1000)
    connect_retry_max_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                "security_protocol SASL_* needs sasl_mechanism, sasl_username and sasl_password "
                "(reference the password as ${KAFKA_PASSWORD})"
            )
        return self


class FieldMap(_Section):
    """Names of the JSON fields that carry the stream id, the event time, the values and a batch of readings."""

    stream: str = "stream"
    timestamp: str = "ts"
    values: str = "values"
    readings: str = "readings"


class InputConfig(_Section):
    """The input topics, the consumer group and how readings are decoded."""

    topics: list[str] = Field(default_factory=lambda: ["sensor-readings"], min_length=1)
    group_id: str = "detector"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_poll_records: int = Field(20000, ge=1)
    poll_timeout_ms: int = Field(200, ge=1, le=10000)
    session_timeout_ms: int = Field(10000, ge=6000, le=300000)
    fields: FieldMap = FieldMap()
    max_message_bytes: int = Field(1_048_576, ge=64)
    max_future_s: float = Field(86400.0, ge=0)
    require_stream_key: bool = True
    max_stream_id_bytes: int = Field(256, ge=1, le=1_048_576)  # longer stream ids are rejected


class OutputConfig(_Section):
    """Where alerts and rejected records go."""

    alerts_topic: str = "sensor-alerts"
    dead_letter_topic: str = "sensor-readings-dlq"
    scores_topic: str | None = None  # every window's score, for dashboards and replay checks
    batch_bytes: int = Field(262144, ge=16384, le=1048576)  # the producer's batch per partition


class DeliveryConfig(_Section):
    """Processing guarantee, commit interval and the checkpoint topic that carries per-stream state."""

    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    commit_interval_ms: int = Field(1000, ge=0, le=600000)
    state_topic: str | None = None  # None: "<input.group_id>-state"
    state_replication: int = Field(-1, ge=-1, le=32)
    state_segment_ms: int = Field(60_000, ge=0)
    transactional_id: str | None = None  # None: "<input.group_id>-<host name>"
    transaction_timeout_ms: int = Field(60000, ge=1000, le=900000)
    restore_timeout_s: float = Field(120.0, gt=0)

    @field_validator("state_replication")
    @classmethod
    def _replication(cls, v: int) -> int:
        if v == 0:
            raise ValueError("state_replication is -1 (the broker's default) or at least 1")
        return v

    @model_validator(mode="after")
    def _transaction_outlives_interval(self) -> DeliveryConfig:
        if self.guarantee == "exactly_once" and self.commit_interval_ms >= self.transaction_timeout_ms:
            raise ValueError(f"commit_interval_ms ({self.commit_interval_ms}) must be below transaction_timeout_ms "
                             f"({self.transaction_timeout_ms}): a transaction stays open for a commit interval, and "
                             "the broker aborts one older than its timeout")
        return self


class ControlConfig(_Section):
    """The run-time control topic, where operators mute, unmute and acknowledge streams (`detector control`)."""

    enabled: bool = True
    topic: str | None = None  # None: "<input.group_id>-control"
    replication: int = Field(-1, ge=-1, le=32)

    @field_validator("replication")
    @classmethod
    def _replication(cls, v: int) -> int:
        if v == 0:
            raise ValueError("replication is -1 (the broker's default) or at least 1")
        return v


class ModelConfig(_Section):
    """Which trained model folder serves the streams, and on which device."""

    path: str = "models/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    features: list[str] | None = None  # when set, the model must have exactly these features, in this order
    threads: int = Field(1, ge=0, le=1024)  # torch's CPU threads; 0: its default (one per core)
    # the model's arithmetic (autocast); auto: bfloat16 where a test pass of the model runs in it, else float32
    precision: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # a candidate model folder scored beside the live one (same features): its would-be alerts go to the shadow
    # alerts topic, never to operators; None: no shadow
    shadow: str | None = None


class ScoringConfig(_Section):
    """How readings become window scores."""

    max_gap_s: float = Field(3600.0, gt=0)
    adapt_halflife_windows: float = Field(0.0, ge=0)
    adapt_gate: bool = True
    adapt_features: Literal["all", "drifting"] = "all"
    learn_scale_readings: int = Field(0, ge=0)
    finetune_rate: float = Field(0.0, ge=0, le=0.1)
    forget_after_s: float = Field(86400.0, ge=0)

    @model_validator(mode="after")
    def _forget_after_a_gap(self) -> ScoringConfig:
        if 0 < self.forget_after_s < self.max_gap_s:
            raise ValueError(f"forget_after_s ({self.forget_after_s:g}) must be 0 (never) or at least max_gap_s "
                             f"({self.max_gap_s:g}): a stream back after a gap starts its window over anyway")
        return self


class StaticLevels(_Section):
    """Fixed score values."""

    warning: float = Field(10.0, gt=0)
    critical: float = Field(30.0, gt=0)


class CalibratedLevels(_Section):
    """Quantiles of the score distribution measured on held-back normal data at training time."""

    warning: float = Field(0.999, gt=0, lt=1)
    critical: float = Field(0.9999, gt=0, lt=1)
    scale: float = Field(1.0, gt=0)


class RollingLevels(_Section):
    """Levels from each stream's own recent window scores (median + k x MAD, or a quantile), never below the
    calibrated ones."""

    method: Literal["mad", "quantile", "telemanom"] = "mad"
    history: int = Field(1000, ge=10, le=100000)
    min_history: int = Field(50, ge=5)
    warning_k: float = Field(8.0, gt=0)
    critical_k: float = Field(16.0, gt=0)
    warning_quantile: float = Field(0.99, gt=0, lt=1)
    critical_quantile: float = Field(0.999, gt=0, lt=1)
    learn_from_flagged: bool = True  # False: windows at or above warning stay out of the history

    @model_validator(mode="after")
    def _fits(self) -> RollingLevels:
        if self.min_history > self.history:
            raise ValueError("min_history must be <= history")
        if self.critical_k < self.warning_k:
            raise ValueError("critical_k must be >= warning_k")
        if self.critical_quantile < self.warning_quantile:
            raise ValueError("critical_quantile must be >= warning_quantile")
        return self


class EvtLevels(_Section):
    """Peaks over threshold (SPOT; DSPOT with drift_window > 0): levels from a fitted generalised Pareto tail."""

    warning_risk: float = Field(1e-3, gt=0, lt=0.02)
    critical_risk: float = Field(1e-4, gt=0, lt=0.02)
    level: float = Field(0.98, ge=0.5, lt=1)
    drift_window: int = Field(0, ge=0, le=10000)
    max_peaks: int = Field(500, ge=20, le=100000)
    refit_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> EvtLevels:
        if self.critical_risk > self.warning_risk:
            raise ValueError("critical_risk must be <= warning_risk (a smaller risk is a higher level)")
        if self.warning_risk >= 1 - self.level:
            raise ValueError("warning_risk must be below 1 - level (the levels lie in the fitted tail)")
        return self


class BudgetLevels(_Section):
    """A false-alarm budget: at most so many alerts per stream per day at normal operation."""

    alerts_per_day: float = Field(1.0, gt=0)
    critical_per_day: float = Field(0.1, gt=0)
    reading_interval_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> BudgetLevels:
        if self.critical_per_day > self.alerts_per_day:
            raise ValueError("critical_per_day must be <= alerts_per_day")
        return self


class PolicyConfig(_Section):
    """A threshold policy and the settings of each policy kind."""

    policy: Literal["static", "calibrated", "rolling", "evt", "budget"] = "calibrated"
    static: StaticLevels = StaticLevels()
    calibrated: CalibratedLevels = CalibratedLevels()
    rolling: RollingLevels = RollingLevels()
    evt: EvtLevels = EvtLevels()
    budget: BudgetLevels = BudgetLevels()

    @model_validator(mode="after")
    def _ordered(self) -> PolicyConfig:
        if self.static.critical < self.static.warning:
            raise ValueError("static.critical must be >= static.warning")
        if self.calibrated.critical < self.calibrated.warning:
            raise ValueError("calibrated.critical must be >= calibrated.warning")
        return self


_SELECT_HELP = "give streams (a glob on the stream id), labels ({name: value, ...}; see streams.labels), or both"


class ThresholdOverride(PolicyConfig):
    """A policy for the streams selected by a glob on the id and/or by labels; keys it leaves out take defaults."""

    streams: str | None = Field(None, min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _selects(self) -> ThresholdOverride:
        if self.streams is None and not self.labels:
            raise ValueError(_SELECT_HELP)
        return self


class ThresholdConfig(PolicyConfig):
    """The threshold policy in force, and per-stream overrides (the first matching override wins)."""

    overrides: list[ThresholdOverride] = Field(default_factory=list)


class RegimeConfig(_Section):
    """Page-Hinkley test on each stream's log window score: a persistent rise is reported once."""

    enabled: bool = False
    delta: float = Field(0.5, ge=0)
    threshold: float = Field(30.0, gt=0)
    min_windows: int = Field(30, ge=1)


class MaintenanceWindow(_Section):
    """A period in which the matching streams raise no alerts: once (start, end) or every day (daily)."""

    streams: str = Field("*", min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)  # and, when given, only streams with these labels
    start: datetime | None = None
    end: datetime | None = None
    daily: str | None = Field(None, pattern=r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")

    @model_validator(mode="after")
    def _one_form(self) -> MaintenanceWindow:
        once = self.start is not None or self.end is not None
        if once == (self.daily is not None):
            raise ValueError("give either start and end, or daily: \"HH:MM-HH:MM\" (UTC)")
        if once:
            if self.start is None or self.end is None or self.start.tzinfo is None or self.end.tzinfo is None:
                raise ValueError("start and end are both needed, as RFC 3339 times with a zone (e.g. ...Z)")
            if self.end <= self.start:
                raise ValueError("end must be after start")
        return self


class AlertConfig(_Section):
    """The per-stream alert state machine: raise after k of n, clear after m below the exit level."""

    k: int = Field(2, ge=1, le=64)
    n: int = Field(3, ge=1, le=64)
    clear_after: int = Field(4, ge=1, le=1000)
    clear_ratio: float = Field(0.8, gt=0, le=1)
    cooldown_windows: int = Field(0, ge=0)
    min_duration_windows: int = Field(0, ge=0)
    warmup_readings: int = Field(0, ge=0)
    top_features: int = Field(3, ge=1)
    # one window at or above this multiple of the critical level raises (escalated) at once, without waiting
    # for k of n (0: off)
    immediate: float = Field(0.0, ge=0)
    # a window that holds one sensor's spike (a model trained with the spike score) raises at once (false: it
    # waits for k of n like any window)
    spikes: bool = True
    regime: RegimeConfig = RegimeConfig()
    maintenance: list[MaintenanceWindow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _k_le_n(self) -> AlertConfig:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must be <= n ({self.n})")
        return self


class SensorConfig(_Section):
    """The data-quality gate before the model: stuck sensors and impossible values become sensor faults."""

    # equal values in a row that make a sensor stuck, at least twice its longest run in training (0: off)
    flatline_readings: int = Field(10, ge=0, le=100000)
    limits: dict[str, tuple[float, float]] = Field(default_factory=dict)
    silent_after_s: float = Field(0.0, ge=0)
    missing: dict[str, Literal["hold", "zero", "anomalous", "interpolate"]] = Field(default_factory=dict)
    interpolate_max_readings: int = Field(10, ge=1, le=1000)  # most readings a stream holds back for a gap
    timestamp_faults: bool = True  # late or repeated readings of a stream raise a sensor_fault episode

    @field_validator("flatline_readings")
    @classmethod
    def _flatline(cls, v: int) -> int:
        if v == 1:
            raise ValueError("must be 0 (off) or at least 2: one reading alone cannot repeat")
        return v

    @field_validator("limits")
    @classmethod
    def _ordered(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        bad = [name for name, (lo, hi) in v.items() if not lo < hi]
        if bad:
            raise ValueError(f"each limit is [low, high] with low < high (not so for {', '.join(bad)})")
        return v


class StreamLabels(_Section):
    """Labels for the streams whose id matches a glob."""

    streams: str = Field(min_length=1)
    labels: dict[str, str] = Field(min_length=1)


class StreamsConfig(_Section):
    """Stream labels, by glob on the stream id: every matching entry adds its labels (a later one wins a name)."""

    labels: list[StreamLabels] = Field(default_factory=list)


class RuntimeConfig(_Section):
    """Logging and shutdown."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout_s: float = Field(8.0, gt=0, le=60)


class MetricsConfig(_Section):
    """The Prometheus metrics and health endpoints."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)


class Config(_Section):
    """The whole detector configuration."""

    kafka: KafkaConfig = KafkaConfig()
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    control: ControlConfig = ControlConfig()
    model: ModelConfig = ModelConfig()
    scoring: ScoringConfig = ScoringConfig()
    streams: StreamsConfig = StreamsConfig()
    thresholds: ThresholdConfig = ThresholdConfig()
    alerts: AlertConfig = AlertConfig()
    sensors: SensorConfig = SensorConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("output")
    @classmethod
    def _topics_distinct(cls, v: OutputConfig) -> OutputConfig:
        if v.alerts_topic == v.dead_letter_topic:
            raise ValueError("alerts_topic and dead_letter_topic must differ")
        if v.scores_topic in (v.alerts_topic, v.dead_letter_topic):
            raise ValueError("scores_topic must differ from alerts_topic and dead_letter_topic")
        return v

    @model_validator(mode="after")
    def _state_topic_is_its_own(self) -> Config:
        state = self.delivery.state_topic
        if state is not None and state in {*self.input.topics, self.output.alerts_topic, self.output.dead_letter_topic}:
            raise ValueError(f"delivery.state_topic {state!r} must differ from the input, alerts and dead-letter "
                             "topics")
        return self

    @model_validator(mode="after")
    def _control_topic_is_its_own(self) -> Config:
        others = {*self.input.topics, self.output.alerts_topic, self.output.dead_letter_topic, self.state_topic(),
                  self.output.scores_topic}
        if self.control.enabled and self.control_topic() in others:
            raise ValueError(f"control.topic {self.control_topic()!r} must differ from the input, alerts, "
                             "dead-letter, scores and state topics")
        return self

    def state_topic(self) -> str:
        """The compacted topic of per-stream checkpoints."""
        return self.delivery.state_topic or f"{self.input.group_id}-state"

    def shadow_alerts_topic(self) -> str:
        """Where the shadow model's would-be alerts go (model.shadow): the alerts topic's name + `-shadow`."""
        return f"{self.output.alerts_topic}-shadow"

    def control_topic(self) -> str:
        """The compacted topic of operators' mute, unmute and ack commands."""
        return self.control.topic or f"{self.input.group_id}-control"

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data with secrets masked, for logging."""
        return self.model_dump(mode="json")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _substitute(node: Any, path: str, problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, str):

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                problems.append(f"{path}: environment variable {name} is not set (referenced as ${{{name}}})")
                return m.group(0)  # kept as written, so that no second, misleading problem follows from it
            return os.environ[name]

        return _ENV.sub(repl, node)
    return node


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = err["loc"][:-1]
        model: type[BaseModel] = Config
        for part in parent:
            sub = model.model_fields.get(str(part))
            ann = getattr(sub, "annotation", None) if sub else None
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                model = ann
        return f"{loc}: unknown key; valid keys here are: {', '.join(model.model_fields)}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{loc}: {msg}{shown}"


def parse_config(data: Any, path: str = "config.yaml") -> Config:
    """Validate already-parsed YAML data; raise ConfigError listing every problem with its key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, ["top level must be a mapping of sections (kafka, input, output, ...)"])
    problems: list[str] = []
    data = _substitute(data, "", problems)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_describe(e) for e in exc.errors())
        raise ConfigError(path, problems) from None
    if problems:
        raise ConfigError(path, problems)
    return cfg


def load_config(path: str | Path) -> Config:
    """Load and validate a config file; raise ConfigError naming the file, key and what would be right."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found (pass --config PATH to a YAML file)"]) from None
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(p), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return parse_config(data, str(p))


def config_hash(cfg: Config) -> str:
    """A short stable hash of the effective configuration, carried in every alert (a shadow model changes no live
    alert, so model.shadow is left out, as are the Kafka client settings)."""
    raw = cfg.model_dump_json(exclude={"kafka": True, "model": {"shadow"}}).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def config_schema() -> dict[str, Any]:
    """The JSON Schema of config.yaml, from the same model that validates it (published as docs/config.schema.json)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "detector config.yaml"
    return schema
