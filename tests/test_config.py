"""Config: the root config.yaml is complete and equals the defaults; every error names its key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from detector.cli import main
from detector.config import Config, config_hash, config_schema, load_config, parse_config
from detector.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _keys(model: type, prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out |= _keys(ann, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def _yaml_keys(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in node.items():
        if isinstance(v, dict) and v:  # an empty mapping ({}) is a value, e.g. sensors.limits
            out |= _yaml_keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_root_config_yaml_lists_every_key_with_its_default() -> None:
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert _yaml_keys(data) == _keys(Config)
    assert load_config(ROOT / "config.yaml") == Config()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"input": {"topcs": ["x"]}}, "input.topcs: unknown key; valid keys here are: topics"),
        ({"thresholds": {"calibrated": {"warning": 1.5}}},
         "thresholds.calibrated.warning: Input should be less than 1"),
        ({"thresholds": {"policy": "magic"}},
         "thresholds.policy: Input should be 'static', 'calibrated', 'rolling', 'evt' or 'budget'"),
        ({"thresholds": {"static": {"warning": 5, "critical": 2}}}, "static.critical must be >= static.warning"),
        ({"alerts": {"k": 5, "n": 3}}, "alerts: k (5) must be <= n (3)"),
        ({"alerts": {"immediate": -1}}, "alerts.immediate: Input should be greater than or equal to 0"),
        ({"alerts": {"spikes": "often"}}, "alerts.spikes: Input should be a valid boolean"),
        ({"kafka": {"security_protocol": "SASL_SSL"}}, "needs sasl_mechanism, sasl_username and sasl_password"),
        ({"input": {"topics": []}}, "input.topics: List should have at least 1 item"),
        ({"input": {"max_poll_records": 0}}, "input.max_poll_records: Input should be greater than or equal to 1"),
        ({"output": {"alerts_topic": "a", "dead_letter_topic": "a"}}, "alerts_topic and dead_letter_topic must differ"),
        ({"output": {"scores_topic": "sensor-alerts"}}, "scores_topic must differ from alerts_topic"),
        ({"input": {"require_stream_key": "maybe"}}, "input.require_stream_key: Input should be a valid boolean"),
        ({"input": {"max_stream_id_bytes": 0}}, "input.max_stream_id_bytes: Input should be greater than or equal"),
        ({"metrics": {"port": 70000}}, "metrics.port: Input should be less than or equal to 65535"),
        ({"model": {"device": "tpu"}}, "model.device: Input should be 'auto', 'cpu' or 'cuda'"),
        ({"model": {"threads": -1}}, "model.threads: Input should be greater than or equal to 0"),
        ({"model": {"shadow": 5}}, "model.shadow: Input should be a valid string"),
        ({"model": {"precision": "fp16"}},
         "model.precision: Input should be 'float32', 'bfloat16', 'float16' or 'auto'"),
        ({"output": {"batch_bytes": 1000}}, "output.batch_bytes: Input should be greater than or equal to 16384"),
        ({"output": {"batch_bytes": 2 << 20}}, "output.batch_bytes: Input should be less than or equal to 1048576"),
        ({"runtime": {"log_format": "xml"}}, "runtime.log_format"),
        ({"scoring": {"max_gap_s": -1}}, "scoring.max_gap_s: Input should be greater than 0"),
        ({"scoring": {"adapt_gate": "sometimes"}}, "scoring.adapt_gate: Input should be a valid boolean"),
        ({"scoring": {"adapt_features": "some"}}, "scoring.adapt_features: Input should be 'all' or 'drifting'"),
        ({"delivery": {"state_segment_ms": -1}},
         "delivery.state_segment_ms: Input should be greater than or equal to 0"),
        ({"scoring": {"finetune_rate": 0.5}}, "scoring.finetune_rate: Input should be less than or equal to 0.1"),
        ({"scoring": {"learn_scale_readings": -5}},
         "scoring.learn_scale_readings: Input should be greater than or equal to 0"),
        ({"scoring": {"forget_after_s": -1}}, "scoring.forget_after_s: Input should be greater than or equal to 0"),
        ({"scoring": {"forget_after_s": 600}}, "scoring: forget_after_s (600) must be 0 (never) or at least max_gap_s"),
        ({"kafka": {"request_timeout_ms": 5}}, "kafka.request_timeout_ms"),
        ({"delivery": {"guarantee": "at_most_once"}},
         "delivery.guarantee: Input should be 'at_least_once' or 'exactly_once'"),
        ({"delivery": {"commit_interval_ms": -1}}, "delivery.commit_interval_ms: Input should be greater than"),
        ({"delivery": {"state_topic": "sensor-alerts"}}, "delivery.state_topic 'sensor-alerts' must differ"),
        ({"delivery": {"state_replication": 0}}, "delivery.state_replication"),
        ({"delivery": {"transactional_id": 5}}, "delivery.transactional_id: Input should be a valid string"),
        ({"delivery": {"transaction_timeout_ms": 10}}, "delivery.transaction_timeout_ms"),
        ({"delivery": {"guarantee": "exactly_once", "commit_interval_ms": 60000, "transaction_timeout_ms": 60000}},
         "delivery: commit_interval_ms (60000) must be below transaction_timeout_ms (60000)"),
        ({"delivery": {"restore_timeout_s": 0}}, "delivery.restore_timeout_s: Input should be greater than 0"),
        ({"control": {"enabled": "sometimes"}}, "control.enabled: Input should be a valid boolean"),
        ({"control": {"topic": "sensor-alerts"}}, "control.topic 'sensor-alerts' must differ from the input"),
        ({"input": {"group_id": "g"}, "delivery": {"state_topic": "g-control"}}, "control.topic 'g-control' must"),
        ({"control": {"replication": 0}}, "control.replication: replication is -1"),
        ({"sensors": {"timestamp_faults": "often"}}, "sensors.timestamp_faults: Input should be a valid boolean"),
        ({"thresholds": {"rolling": {"method": "mean"}}},
         "thresholds.rolling.method: Input should be 'mad', 'quantile' or 'telemanom'"),
        ({"thresholds": {"rolling": {"warning_quantile": 1.0}}}, "thresholds.rolling.warning_quantile: Input should"),
        ({"thresholds": {"rolling": {"warning_quantile": 0.999, "critical_quantile": 0.99}}},
         "critical_quantile must be >= warning_quantile"),
        ({"thresholds": {"rolling": {"critical_quantile": 0}}}, "thresholds.rolling.critical_quantile: Input should"),
        ({"thresholds": {"rolling": {"learn_from_flagged": "sometimes"}}},
         "thresholds.rolling.learn_from_flagged: Input should be a valid boolean"),
    ],
)
def test_invalid_values_name_the_key_and_what_is_right(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "my.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("my.yaml: ")


def test_model_precision_takes_auto_and_defaults_to_float32() -> None:
    assert Config().model.precision == "float32"
    assert parse_config({"model": {"precision": "auto"}}).model.precision == "auto"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"input": {"topcs": 1, "max_poll_records": -1}, "alerts": {"k": 0}})
    assert len(err.value.problems) == 3


def test_secrets_come_from_the_environment_and_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PASSWORD", "hunter2")
    cfg = parse_config({"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                  "sasl_username": "det", "sasl_password": "${KAFKA_PASSWORD}"}})
    assert cfg.kafka.sasl_password is not None
    assert cfg.kafka.sasl_password.get_secret_value() == "hunter2"
    assert "hunter2" not in str(cfg.masked()) and "hunter2" not in repr(cfg)


def test_unset_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"kafka.sasl_password: environment variable NOT_SET_ANYWHERE"):
        parse_config({"kafka": {"sasl_password": "${NOT_SET_ANYWHERE}"}})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  topics: [a\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def test_config_is_frozen_and_hash_tracks_changes() -> None:
    cfg = Config()
    with pytest.raises(ValidationError):
        cfg.alerts.k = 3  # type: ignore[misc]
    other = parse_config({"alerts": {"k": 1}})
    assert config_hash(cfg) != config_hash(other)
    assert config_hash(cfg) == config_hash(Config())


def test_rolling_levels_are_checked() -> None:
    with pytest.raises(ConfigError, match="min_history must be <= history"):
        parse_config({"thresholds": {"rolling": {"history": 20, "min_history": 30}}})
    with pytest.raises(ConfigError, match="critical_k must be >= warning_k"):
        parse_config({"thresholds": {"rolling": {"warning_k": 9, "critical_k": 3}}})


def test_published_json_schema_is_current(capsys: pytest.CaptureFixture) -> None:
    published = json.loads((ROOT / "docs" / "config.schema.json").read_text())
    assert published == config_schema(), "regenerate: detector check-config --schema > docs/config.schema.json"
    assert set(published["properties"]) == set(yaml.safe_load((ROOT / "config.yaml").read_text()))
    assert main(["check-config", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == published


def test_evt_levels_are_checked() -> None:
    with pytest.raises(ConfigError, match="critical_risk must be <= warning_risk"):
        parse_config({"thresholds": {"evt": {"warning_risk": 0.001, "critical_risk": 0.01}}})
    with pytest.raises(ConfigError, match="warning_risk must be below 1 - level"):
        parse_config({"thresholds": {"evt": {"level": 0.995, "warning_risk": 0.01, "critical_risk": 0.001}}})


def test_budget_levels_are_checked() -> None:
    with pytest.raises(ConfigError, match="critical_per_day must be <= alerts_per_day"):
        parse_config({"thresholds": {"budget": {"alerts_per_day": 1, "critical_per_day": 2}}})


def test_the_operators_guide_examples_are_valid_configs() -> None:
    text = (ROOT / "docs" / "operators.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert len(blocks) >= 3
    for block in blocks:
        lines = block.splitlines()
        indent = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
        parse_config(yaml.safe_load("\n".join(x[indent:] for x in lines)))


def test_maintenance_windows_are_checked() -> None:
    for bad, expected in [({"daily": "25:00-26:00"}, "should match pattern"),
                          ({"start": "2026-12-01T06:00:00Z"}, "start and end are both needed"),
                          ({"start": "2026-12-01T06:00:00Z", "end": "2026-12-01T05:00:00Z"}, "end must be after start"),
                          ({}, "give either start and end, or daily")]:
        with pytest.raises(ConfigError, match=expected):
            parse_config({"alerts": {"maintenance": [bad]}})
