"""deploy/ checked offline: each artefact passes the validator its users run, and agrees with the daemon.

Validators: buildkit's Dockerfile parser (the `dockerfile` package), Docker Compose's `config`, Kubernetes'
JSON schemas in strict mode (`kubernetes-validate`, schemas bundled), Prometheus's `promtool` (check config,
check rules, test rules), and `systemd-analyze` (verify, security). Compose and promtool are taken from the
machine when it has them, else built once from the pins in deploy/tools/ (deploy/tools/build.sh, about 4
minutes each the first time, cached after). A missing validator fails the test, naming what to install.
"""

from __future__ import annotations

import ast
import base64
import configparser
import copy
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from detector.cli import build_parser
from detector.config import Config, load_config, parse_config
from detector.errors import ConfigError
from detector.metrics import HealthServer, Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENTRYPOINT = ["detector", "run", "--config", "/etc/detector/config.yaml"]
SHUTDOWN_MARGIN_S = 10.0  # above runtime.shutdown_timeout_s plus one poll: leaving the group, closing clients


# ----------------------------------------------------------------------------------------------- validators


def _run(cmd: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@functools.cache
def _built(name: str) -> str:
    if shutil.which("go") is None:
        pytest.fail(f"no {name} on this machine and no `go` to build it: install Go 1.23+ (or {name}) and rerun")
    proc = _run(["bash", str(DEPLOY / "tools" / "build.sh"), name], timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"deploy/tools/build.sh {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def compose() -> list[str]:
    """`docker compose` when the plugin is installed, else the pinned build (docker-compose v2 standalone)."""
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    return [_built("compose")]


@pytest.fixture(scope="session")
def promtool() -> str:
    return shutil.which("promtool") or _built("promtool")


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed: `apt-get install systemd` (it only reads unit files here)")
    return path


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _exported_series() -> set[str]:
    """Every series name the daemon's /metrics can carry (counter and histogram suffixes included)."""
    names: set[str] = set()
    for fam in Metrics().registry.collect():
        if fam.type == "counter":
            names |= {f"{fam.name}_total", f"{fam.name}_created"}
        elif fam.type == "histogram":
            names |= {f"{fam.name}{s}" for s in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(fam.name)
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(detector_[a-z0-9_]+)", expr))


# ------------------------------------------------------------------------------------------------ Dockerfile


@pytest.fixture(scope="module")
def dockerfile_cmds() -> tuple[Any, ...]:
    import dockerfile

    return dockerfile.parse_file(str(DEPLOY / "Dockerfile"))


def _final_stage(cmds: tuple[Any, ...]) -> list[Any]:
    starts = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    return list(cmds[starts[-1]:])


def test_dockerfile_parses_into_known_instructions(dockerfile_cmds: tuple[Any, ...]) -> None:
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "LABEL", "EXPOSE", "STOPSIGNAL",
             "HEALTHCHECK", "ENTRYPOINT", "CMD", "VOLUME", "SHELL", "ONBUILD"}
    assert {c.cmd for c in dockerfile_cmds} <= known
    assert sum(c.cmd == "FROM" for c in dockerfile_cmds) == 2  # build stage, slim runtime stage


def test_dockerfile_base_and_torch_are_build_arguments(dockerfile_cmds: tuple[Any, ...]) -> None:
    args = dict(v.split("=", 1) for c in dockerfile_cmds if c.cmd == "ARG" for v in c.value if "=" in v)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["BASE_IMAGE"])
    assert args["TORCH_VARIANT"] == "cpu"
    assert all(c.value[0] == "${BASE_IMAGE}" for c in dockerfile_cmds if c.cmd == "FROM")
    torch_run = next(c.value[0] for c in dockerfile_cmds if c.cmd == "RUN" and "TORCH_VARIANT" in c.value[0])
    assert "cpu)" in torch_run and "cuda)" in torch_run and "${TORCH_INDEX_URL}" in torch_run
    assert "exit 1" in torch_run  # an unknown variant fails the build instead of silently installing something


def test_dockerfile_runs_the_daemon_as_a_non_root_user(dockerfile_cmds: tuple[Any, ...]) -> None:
    final = _final_stage(dockerfile_cmds)
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"USER {users[-1]}: numeric and not root (runAsNonRoot checks it)"
    entry = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0].json and list(entry[0].value) == ENTRYPOINT  # exec form: PID 1 gets SIGTERM
    assert [c.value[0] for c in final if c.cmd == "STOPSIGNAL"] == ["SIGTERM"]
    assert not [c for c in final if c.cmd == "CMD"]
    # the uid the Kubernetes Deployment runs as is the image's
    deployment = _yaml_docs(K8S / "deployment.yaml")[0]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dockerfile_healthcheck_probes_healthz_with_python_only(dockerfile_cmds: tuple[Any, ...],
                                                                 tmp_path: Path) -> None:
    final = _final_stage(dockerfile_cmds)
    (hc,) = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert hc.json and hc.value[0] == "CMD" and hc.value[1] == "python"
    text = " ".join(hc.value)
    assert "curl" not in text and "wget" not in text
    env = dict(zip(*[iter(v for c in final if c.cmd == "ENV" for v in c.value)] * 2, strict=True))
    assert env["DETECTOR_HEALTH_URL"] == "http://127.0.0.1:9108/healthz"
    # Run the image's exact health command against the daemon's own health server, then against nothing.
    argv = [sys.executable, *hc.value[2:]]
    server = HealthServer(Metrics(), "127.0.0.1", 0).start()
    try:
        ok = _run(argv, timeout=30, env={**os.environ, "DETECTOR_HEALTH_URL": f"http://127.0.0.1:{server.port}/healthz"})
        assert ok.returncode == 0, ok.stderr
    finally:
        server.close()
    down = _run(argv, timeout=30, env={**os.environ, "DETECTOR_HEALTH_URL": f"http://127.0.0.1:{_free_port()}/healthz"})
    assert down.returncode != 0


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""

    def regex(p: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip().strip("/")
        if any(regex(pat).fullmatch(p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_sends_what_the_image_copies_and_nothing_else(dockerfile_cmds: tuple[Any, ...]) -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copied = [v for c in dockerfile_cmds if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
              for v in c.value[:-1]]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _dockerignore_excludes(patterns, src), f"COPY {src}: excluded by .dockerignore"
    for inside in ("detector/cli.py", "consumers/kafka.py", "pyproject.toml", "README.md"):
        assert not _dockerignore_excludes(patterns, inside), inside
    for outside in (".git/HEAD", "tests/test_deploy.py", "deploy/kafka/lib/x.jar", ".kafka/server.log", "models/m",
                    "detector/__pycache__/cli.cpython-311.pyc", "docs/operations.md"):
        assert _dockerignore_excludes(patterns, outside), outside


# ---------------------------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose_config(compose: list[str]) -> dict[str, Any]:
    proc = _run([*compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format", "json"], cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(compose)} config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.mark.timeout(1500)  # the first use may build Compose from deploy/tools/ (about 4 minutes)
def test_compose_file_validates_and_runs_the_whole_trial(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert set(services) == {"kafka", "topics", "trainer", "detector", "simulator", "prometheus", "grafana"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    for name in ("trainer", "detector", "simulator"):
        build = services[name]["build"]
        assert Path(build["context"]) == ROOT and build["dockerfile"] == "deploy/Dockerfile"
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            if vol["type"] == "bind":
                assert Path(vol["source"]).exists(), f"{name}: bind mount {vol['source']} does not exist"
    det = services["detector"]
    assert det["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert det["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert {p["target"] for p in det["ports"]} == {9108}
    assert all(p.get("host_ip") == "127.0.0.1" for s in services.values() for p in s.get("ports", []))


def test_compose_kafka_is_a_kraft_node_reachable_as_kafka_9092(compose_config: dict[str, Any]) -> None:
    env = compose_config["services"]["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16  # Kafka's cluster ids are 16-byte uuids
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_compose_detector_config_simulator_and_topics_agree(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    mounts = {v["target"]: v for v in services["detector"]["volumes"]}
    cfg = load_config(mounts["/etc/detector/config.yaml"]["source"])
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0" and cfg.metrics.port == 9108
    assert cfg.model.path.startswith("/models/") and mounts["/models"]["read_only"]
    specs = re.search(r"for spec in ([^;]+);", services["topics"]["command"][0])
    assert specs is not None
    created = [spec.split(":")[0] for spec in specs.group(1).split()]
    assert set(created) == {*cfg.input.topics, cfg.output.alerts_topic, cfg.output.dead_letter_topic}

    sim = build_parser().parse_args(services["simulator"]["entrypoint"][1:] + services["simulator"]["command"])
    assert sim.command == "simulate" and sim.bootstrap == "kafka:9092" and sim.topic in cfg.input.topics
    trainer = services["trainer"]["command"][0]
    test_part, train_part = trainer.split("||")
    model_dir = cfg.model.path
    assert f"{model_dir}/manifest.json" in test_part
    demo = build_parser().parse_args(train_part.split()[1:])
    assert demo.command == "demo" and f"{demo.out}/model" == model_dir  # `demo --out D` writes D/model
    assert sim.seed == demo.seed and sim.streams == demo.streams and sim.features == demo.features


# ------------------------------------------------------------------------------------ Prometheus and Grafana


@pytest.mark.timeout(1500)  # the first use may build promtool from deploy/tools/ (about 4 minutes)
def test_prometheus_config_and_rules_pass_promtool(promtool: str) -> None:
    cfg = _run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "1 rule files found" in cfg.stdout
    rules = _run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")])
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_rules_fire_when_they_should_and_not_before(promtool: str) -> None:
    proc = _run([promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts.test.yml").read_text()))
    defined = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
               for r in g["rules"]}
    assert tested == defined, f"alerts without a unit test: {defined - tested}"


def test_alert_rules_cover_the_daemons_health_and_name_only_exported_metrics() -> None:
    rules = [r for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
             for r in g["rules"]]
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert {"DetectorNotReady", "DetectorConsumerLagGrowing", "DetectorCheckpointStale",
            "DetectorNoReadings"} <= set(by_name)
    assert next(r for r in rules if r["alert"] == "DetectorNotReady")["for"] == "5m"
    assert "> 300" in by_name["DetectorCheckpointStale"]  # 5 x a 60 s commit interval
    exported = _exported_series()
    for name, expr in by_name.items():
        used = _metric_names(expr)
        assert used or re.search(r"\bup\{", expr), name
        assert used <= exported, f"{name}: not exported by the daemon: {used - exported}"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "detector-dashboard.json").read_text())


def _targets(dash: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_is_well_formed_and_shows_the_health_metrics(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
    used = set().union(*(_metric_names(t["expr"]) for _, t in _targets(dashboard)))
    exported = _exported_series()
    assert used <= exported, f"the dashboard names metrics the daemon does not export: {used - exported}"
    wanted = {"detector_readings_total", "detector_consumer_lag", "detector_record_latency_seconds_bucket",
              "detector_alerts_total", "detector_active_streams", "detector_checkpoint_age_seconds",
              "detector_rejected_total", "detector_ready"}
    assert wanted <= used, f"missing panels for {wanted - used}"
    exprs = [t["expr"] for _, t in _targets(dashboard)]
    assert any("histogram_quantile(0.5," in e and "record_latency" in e for e in exprs)
    assert any("histogram_quantile(0.99," in e and "record_latency" in e for e in exprs)


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    rules = []
    for panel, target in _targets(dashboard):
        expr = target["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*")
        assert "$" not in expr, f"{panel['title']}: unexpanded variable in {expr}"
        rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(rules)} rules found" in proc.stdout


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose_config: dict[str, Any],
                                                                     dashboard: dict[str, Any]) -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    default = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")["current"]["value"]
    assert ds["uid"] == default and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "detector.yml").read_text())["providers"]
    mounts = {v["target"] for v in compose_config["services"]["grafana"]["volumes"]}
    assert f"{provider['options']['path']}/detector-dashboard.json" in mounts
    targets = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert targets["static_configs"][0]["targets"] == ["detector:9108"]


# ------------------------------------------------------------------------------------------------- Kubernetes


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", ["1.28.0", "latest"])
def test_k8s_manifests_pass_the_kubernetes_schemas_in_strict_mode(version: str) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    files = _k8s_files()
    kinds = set()
    for path in files:
        for doc in _yaml_docs(path):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.relative_to(ROOT)} ({doc['kind']}) against Kubernetes {version}: {exc.message} "
                            f"at {'.'.join(str(p) for p in exc.path)}")
            kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


def test_strict_schema_validation_catches_a_misspelt_field() -> None:
    import kubernetes_validate

    bad = copy.deepcopy(_yaml_docs(K8S / "deployment.yaml")[0])
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_kustomizations_name_every_manifest() -> None:
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(base["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    gpu = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert gpu["resources"] == [".."]
    (patch,) = gpu["patches"]
    patched = _yaml_docs(K8S / "gpu" / patch["path"])[0]
    assert (patched["kind"], patched["metadata"]["name"]) == ("Deployment", "detector")


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" for d in _yaml_docs(p)}


def _pod(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return k8s["Deployment"]["spec"]["template"]


def test_configmap_holds_a_config_the_daemon_accepts(k8s: dict[str, dict[str, Any]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    text = k8s["ConfigMap"]["data"]["config.yaml"]
    referenced = set(re.findall(r"\$\{(\w+)\}", text))
    container = _pod(k8s)["spec"]["containers"][0]
    from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert referenced == from_secret == {"KAFKA_USERNAME", "KAFKA_PASSWORD"}
    for name in referenced:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="KAFKA_PASSWORD"):  # without the Secret the daemon refuses to start
        parse_config(yaml.safe_load(text), "configmap")
    monkeypatch.setenv("KAFKA_USERNAME", "detector")
    monkeypatch.setenv("KAFKA_PASSWORD", "s3cret")
    cfg = parse_config(yaml.safe_load(text), "configmap")
    assert cfg.kafka.sasl_password is not None and cfg.kafka.sasl_password.get_secret_value() == "s3cret"
    assert "s3cret" not in json.dumps(cfg.masked())
    assert cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0"
    assert cfg.metrics.port == next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert cfg.model.path.startswith(mounts["models"]["mountPath"] + "/") and mounts["models"]["readOnly"]


def test_deployment_probes_grace_period_and_wiring(k8s: dict[str, dict[str, Any]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_USERNAME", "u")
    monkeypatch.setenv("KAFKA_PASSWORD", "p")
    cfg = parse_config(yaml.safe_load(k8s["ConfigMap"]["data"]["config.yaml"]), "configmap")
    dep, pod = k8s["Deployment"], _pod(k8s)
    spec, (container,) = pod["spec"], pod["spec"]["containers"]
    assert dep["spec"]["replicas"] >= 1
    budget = cfg.runtime.shutdown_timeout_s + cfg.input.poll_timeout_ms / 1000
    assert spec["terminationGracePeriodSeconds"] >= budget + SHUTDOWN_MARGIN_S
    assert cfg.runtime.shutdown_timeout_s == Config().runtime.shutdown_timeout_s  # the budget is the default one
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"metrics": 9108}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert "command" not in container and "args" not in container  # the image's ENTRYPOINT
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_volume = volumes[mounts["/etc/detector"]]["configMap"]
    assert config_volume["name"] == k8s["ConfigMap"]["metadata"]["name"]
    assert "items" not in config_volume  # the whole folder: edits reach the pod (no subPath), hot reload works
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert secrets == {"detector-kafka"}
    labels = pod["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], k8s["Service"]["spec"]["selector"],
                     k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert k8s["Service"]["spec"]["ports"][0]["targetPort"] == "metrics"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9108"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert k8s["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def _diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() | b.keys():
            yield from _diff(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield path


def test_gpu_variant_differs_from_the_cpu_deployment_only_by_the_gpu(k8s: dict[str, dict[str, Any]]) -> None:
    gpu = _yaml_docs(K8S / "gpu" / "deployment.yaml")[0]
    c = ".spec.template.spec.containers[0]"
    allowed = {f"{c}.image", f"{c}.resources.limits.nvidia.com/gpu", f"{c}.resources.limits.memory",
               f"{c}.resources.requests.memory", ".spec.template.spec.tolerations"}
    changed = set(_diff(k8s["Deployment"], gpu))
    assert changed <= allowed, f"the GPU Deployment drifted from the CPU one at {changed - allowed}"
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        gpu["spec"]["template"]["spec"]["tolerations"]
    # Only additions or replaced scalars: a strategic merge of this file over the base yields this file.
    cpu_limits = k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cpu_limits.keys() <= container["resources"]["limits"].keys()


# -------------------------------------------------------------------------------------------------- systemd


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read(DEPLOY / "systemd" / "detector.service")
    return unit


def test_systemd_unit_verifies_without_a_single_complaint(systemd_analyze: str, tmp_path: Path) -> None:
    # systemd-analyze verify reports a missing ExecStart binary, and exits 0 on unknown keys or bad values
    # (it only prints them): so point ExecStart at a stand-in and demand an empty output.
    text = (DEPLOY / "systemd" / "detector.service").read_text()
    stand_in = tmp_path / "detector"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    assert "ExecStart=/opt/detector/bin/detector " in text
    unit = tmp_path / "detector.service"
    unit.write_text(text.replace("ExecStart=/opt/detector/bin/detector ", f"ExecStart={stand_in} "))
    proc = _run([systemd_analyze, "verify", "--man=no", str(unit)])
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).strip() == "", proc.stdout + proc.stderr
    # The unit as shipped: the only complaint is the binary that `pip install` puts there.
    shipped = _run([systemd_analyze, "verify", "--man=no", str(DEPLOY / "systemd" / "detector.service")])
    complaints = [ln for ln in (shipped.stdout + shipped.stderr).splitlines() if ln.strip()]
    assert complaints == ["detector.service: Command /opt/detector/bin/detector is not executable: "
                          "No such file or directory"]
    # and the check is not blind: a misspelt directive is reported
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    assert "Unknown key" in _run([systemd_analyze, "verify", "--man=no", str(bad)]).stderr


def test_systemd_unit_is_hardened_and_outlasts_the_shutdown_budget(systemd_analyze: str) -> None:
    s = _unit()["Service"]
    assert s["Type"] == "simple"  # the daemon does not call sd_notify
    assert s["ExecStart"].split()[1:] == ENTRYPOINT[1:]  # the same command as the image's ENTRYPOINT
    assert s["Restart"] == "on-failure" and s["KillSignal"] == "SIGTERM"
    assert s.get("DynamicUser") == "yes" or s.get("User") not in (None, "root")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes"}.items():
        assert s[key] == value, key
    assert s["EnvironmentFile"].lstrip("-") == "/etc/detector/detector.env"
    assert float(s["TimeoutStopSec"]) >= Config().runtime.shutdown_timeout_s + SHUTDOWN_MARGIN_S
    proc = _run([systemd_analyze, "security", "--offline=true", "--threshold=25",
                 str(DEPLOY / "systemd" / "detector.service")])
    assert proc.returncode == 0, "exposure above 2.5:\n" + proc.stdout[-2000:] + proc.stderr


# ------------------------------------------------------------------------------------------------------ docs


def _log_formats() -> list[str]:
    """The format strings of every log call in the daemon's code: what a user sees in its log."""
    out = []
    for path in [*sorted((ROOT / "detector").glob("*.py")), *sorted((ROOT / "consumers").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"debug", "info", "warning", "error", "exception", "critical"}
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                out.append(node.args[0].value)
    return out


def _format_regex(fmt: str) -> re.Pattern[str]:
    parts = re.split(r"%[-#0 +]*\d*(?:\.\d+)?[sdfrx]", fmt)
    return re.compile("(.*?)".join(re.escape(p.replace("%%", "%")) for p in parts), re.S)


def test_troubleshooting_table_quotes_log_messages_the_daemon_really_writes() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    quoted = re.findall(r"^\| `([^`]+)` \|", section, re.M)
    assert len(quoted) >= 10
    formats = [_format_regex(f) for f in _log_formats()]
    for message in quoted:
        sample = re.sub(r"<[^>]+>", "X", message)
        assert any(f.fullmatch(sample) for f in formats), f"docs/operations.md: no code logs `{message}`"


def test_operations_guide_explains_every_metric_and_is_linked_from_the_readme() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    for fam in Metrics().registry.collect():
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        assert f"`{name}`" in text, f"docs/operations.md does not explain {name}"
    assert "docs/operations.md" in (ROOT / "README.md").read_text()
