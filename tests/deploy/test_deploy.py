"""deploy/: the Helm chart lints and renders offline, its renders and the plain
manifests in deploy/k8s/ pass yamllint and strict Kubernetes 1.37 schemas, the two
agree, and the objects fit together the way the services need (probes on the gRPC
port, exec'd over TLS when TLS is on, drain timing, headless discovery, an autoscaler per tier on the metric that
limits it, network policy, TLS mounts).

Custom resources (ServiceMonitor, PrometheusRule, cert-manager Certificate,
GRPCRoute, HTTPRoute, BackendTLSPolicy) have no schema in kubernetes-validate: they are checked here field by
field against what their controllers read, and the PrometheusRule's expressions
are loaded into a real Prometheus by tests/system/test_prometheus.py.

Tools (pins for the dev extras): yamllint 1.38.0, kubernetes-validate 1.37.0,
helm-python-sdk 0.2.2 (Helm's Go engine as a shared library; no helm binary).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "chorus"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
# The newest Kubernetes that kubernetes-validate 1.37.0 has schemas for.
KUBE_VERSION = "1.37.0"
PORTS = {"gateway": 50051, "token-server": 50052, "codec-worker": 50053}
COMMANDS = {"gateway": "chorus-gateway", "token-server": "chorus-token-server", "codec-worker": "chorus-codec-worker"}
PARSERS = {"gateway": "gateway.__main__", "token-server": "services.token_server.__main__",
           "codec-worker": "services.codec_worker.__main__"}
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "Certificate": "cert-manager.io/v1",
    "GRPCRoute": "gateway.networking.k8s.io/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "BackendTLSPolicy": "gateway.networking.k8s.io/v1",
}

EVERYTHING_ON = {
    "otlpEndpoint": "",
    "jaeger": {"enabled": True},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                   "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "tls": {"enabled": True, "issuerRef": {"name": "chorus-ca", "kind": "ClusterIssuer"}},
    "gateway": {"apiKeysSecret": "chorus-api-keys", "backendTLSCAConfigMap": "chorus-ca-bundle",
                "grpcRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateways"}],
                              "hostnames": ["tts.example.com"]},
                "http": {"enabled": True, "port": 8443,
                         "httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateways"}],
                                       "hostnames": ["tts.example.com"]},
                         "ingress": {"enabled": True, "className": "nginx", "hosts": ["tts.example.com"],
                                     "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"},
                                     "tls": [{"secretName": "tts-example-com", "hosts": ["tts.example.com"]}]}},
                "service": {"type": "LoadBalancer", "annotations": {"lb.example.com/internal": "true"}},
                "extraEnv": [{"name": "CHORUS_LOOKAHEAD", "value": "2"}],
                "podAnnotations": {"team": "speech"}},
    "tokenServer": {"extraEnv": [{"name": "CHORUS_BUDGET_HEADROOM", "value": "2.0"}]},
}

# Value sets the chart must render, lint and validate with, besides its defaults.
VARIANTS = {
    "defaults": None,
    "demo-models": {"models": {"source": "demo"}},
    "gpu": {"tokenServer": {"gpu": {"enabled": True, "count": 1, "layers": -1}},
            "codec": {"gpu": {"enabled": True, "count": 2}}},
    "fixed-replicas": {"gateway": {"autoscaling": {"enabled": False}},
                       "tokenServer": {"replicas": 3, "autoscaling": {"enabled": False}},
                       "codec": {"replicas": 3, "autoscaling": {"enabled": False}}},
    "existing-claim": {"models": {"existingClaim": "weights"}, "otlpEndpoint": "jaeger-collector:4317"},
    "fetch-models": {"models": {"accessModes": ["ReadWriteMany"], "fetch": {
        "enabled": True,
        "backbone": {"url": "https://models.example.com/orpheus-3b-q4_k_m.gguf", "sha256": "a" * 64},
        "snacConfig": {"url": "https://models.example.com/snac_24khz/config.json", "sha256": ""},
        "snacWeights": {"url": "https://models.example.com/snac_24khz/pytorch_model.bin", "sha256": ""},
        "extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    }}},
    "everything-on": EVERYTHING_ON,
    # Both model families: the NeuTTS-Air pool beside Orpheus's, with TLS and monitoring on.
    "neutts": {**EVERYTHING_ON, "neutts": {"enabled": True, "tokenServer": {"slots": 8, "autoscaling": {
        "maxReplicas": 4}}, "codec": {"replicas": 1, "autoscaling": {"enabled": False}}}},
    "neutts-demo": {"models": {"source": "demo"}, "neutts": {"enabled": True,
                                                            "voiceStore": {"existingClaim": "voices"}}},
    # TLS with no HTTP port, images from a registry (podman names local builds localhost/...).
    "tls-no-http": {"tls": {"enabled": True, "gatewaySecretName": "gw", "tokenServerSecretName": "ts",
                            "codecWorkerSecretName": "cw"},
                    "gateway": {"http": {"enabled": False}}, "images": {"registry": "localhost"}},
}


def _require(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # not installed, or (helm) its native library does not load here
        pytest.skip(f"{module} unavailable ({exc}); pip install -e '.[dev]'")


def _render_k8s():
    spec = importlib.util.spec_from_file_location("render_k8s", DEPLOY / "render_k8s.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs(texts) -> list[dict]:
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]


def _render(values) -> dict[str, str]:
    _require("helm_python")
    return _render_k8s().render_chart(values)


@pytest.fixture(scope="module")
def kubernetes_validate():
    return _require("kubernetes_validate")


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(shlex.join(args), result.stdout, result.stderr, sep="\n")
    return result


# ---------------------------------------------------------------- linters and schemas


def test_yamllint_passes_on_deploy():
    _require("yamllint")
    listed = _run("-m", "yamllint", "--list-files", "-c", "deploy/.yamllint", "deploy/").stdout.split()
    # The ignore list skips Go templates only, not the manifests or the chart's values.
    assert {f"deploy/k8s/{path.name}" for path in K8S_FILES} <= set(listed)
    assert {"deploy/helm/chorus/values.yaml", "deploy/prometheus-adapter/values.yaml"} <= set(listed)
    assert not [path for path in listed if "/templates/" in path]

    result = _run("-m", "yamllint", "--strict", "-c", "deploy/.yamllint", "deploy/")
    assert result.returncode == 0


def test_plain_manifests_pass_strict_kubernetes_validate(kubernetes_validate):
    assert K8S_FILES, "deploy/k8s/ is empty: run python deploy/render_k8s.py"
    assert KUBE_VERSION == kubernetes_validate.utils.latest_version()
    result = _run("-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, *map(str, K8S_FILES))
    assert result.returncode == 0
    # It only warns (exit 0) on a kind it has no schema for: every object must have been checked.
    assert "WARN" not in result.stdout and "ERROR" not in result.stdout
    passed = [line for line in result.stdout.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(_docs(path.read_text() for path in K8S_FILES))


def test_strict_validation_has_teeth(kubernetes_validate, tmp_path):
    """A misspelt probe field must fail: otherwise the passes above prove nothing."""
    deployment = next(doc for doc in _docs(path.read_text() for path in K8S_FILES) if doc["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert _run("-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, str(path)).returncode != 0


def test_plain_manifests_are_the_chart_rendered():
    _require("helm_python")
    assert _render_k8s().main(["--check"]) == 0, "run python deploy/render_k8s.py"


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_lints_strictly(variant):
    helm = _require("helm_python")
    report = helm.lint(CHART, VARIANTS[variant], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_renders_valid_manifests(variant, kubernetes_validate):
    linter = _require("yamllint.linter")
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    rendered = _render(VARIANTS[variant])
    for name, text in rendered.items():
        problems = list(linter.run(text, config))
        assert problems == [], f"{name}: {problems}"
    for doc in _docs(rendered.values()):
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]]
            continue  # no schema: test_custom_resources checks them
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values, message", [
    # Misspelt or unknown keys: each used to render and be ignored.
    ({"tokenServer": {"replicsa": 3}}, "replicsa"),
    ({"tokenServer": {"env": [{"name": "X", "value": "1"}]}}, "env"),
    ({"gateway": {"service": {"annotationz": {}}}}, "annotationz"),
    ({"codec": {"autoscaling": {"targetStreamsPerPod": 8}}}, "targetStreamsPerPod"),
    ({"replicaCount": 3}, "replicaCount"),
    ({"gateway": {"resources": {"limits": {"cpus": "1"}}}}, "cpus"),
    ({"tokenServer": {"extraEnv": [{"name": "X", "vaule": "1"}]}}, "vaule"),
    # Out of range.
    ({"tokenServer": {"slots": 0}}, "slots"),
    ({"models": {"source": "nfs"}}, "source"),
    ({"tokenServer": {"gpu": {"enabled": True, "layers": -2}}}, "layers"),
    ({"gateway": {"http": {"prot": 8080}}}, "prot"),
    ({"gateway": {"http": {"ingress": {"host": "tts.example.com"}}}}, "host"),
    ({"images": {"registry": "https://registry.example.com/"}}, "registry"),
])
def test_schema_rejects_misspelt_and_bad_values(values, message):
    helm = _require("helm_python")
    with pytest.raises(helm.HelmValuesError, match=message):
        _render(values)


@pytest.mark.parametrize("values, message", [
    ({"codec": {"autoscaling": {"minReplicas": 9, "maxReplicas": 4}}}, "minReplicas must not exceed"),
    ({"models": {"fetch": {"enabled": True, "backbone": {"url": "https://x/b.gguf"},
                           "snacConfig": {"url": "https://x/c.json"}, "snacWeights": {"url": "https://x/w.bin"}}}},
     "ReadWriteMany"),
    ({"models": {"accessModes": ["ReadWriteMany"], "fetch": {"enabled": True, "backbone": {"url": ""},
                                                             "snacConfig": {"url": ""}, "snacWeights": {"url": ""}}}},
     "URLs"),
    ({"gateway": {"grpcRoute": {"enabled": True}}}, "parentRefs"),
    ({"gateway": {"http": {"httpRoute": {"enabled": True}}}}, "parentRefs"),
    ({"gateway": {"http": {"enabled": False, "httpRoute": {"enabled": True, "parentRefs": [{"name": "public"}]}}}},
     "http.enabled"),
    ({"gateway": {"http": {"enabled": False, "ingress": {"enabled": True}}}}, "http.enabled"),
    ({"gateway": {"backendTLSCAConfigMap": "ca"}}, "tls.enabled"),
])
def test_chart_refuses_inconsistent_values(values, message):
    helm = _require("helm_python")
    with pytest.raises(helm.HelmRenderError, match=message):
        _render(values)


# ---------------------------------------------------------------- how the objects fit


def _sources():
    yield "deploy/k8s", lambda: _docs(path.read_text() for path in K8S_FILES)
    for variant, values in VARIANTS.items():
        yield f"helm:{variant}", lambda values=values: _docs(_render(values).values())


SOURCES = dict(_sources())


def _by_kind(docs) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return out


def _component(doc) -> str:
    """The component label; "" for objects the components share."""
    return doc["metadata"]["labels"].get("app.kubernetes.io/component", "")


def _config(objects) -> dict:
    """The ConfigMap of the environment the three services share."""
    (config,) = [c for c in objects["ConfigMap"].values() if c["metadata"]["name"].endswith("-config")]
    return config


def _container(deployment) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def _tiers(objects) -> dict[str, dict]:
    return {_component(d): d for d in objects["Deployment"].values() if _component(d) in PORTS}


@pytest.mark.parametrize("source", SOURCES)
def test_objects_fit_together(source):
    objects = _by_kind(SOURCES[source]())
    deployments = _tiers(objects)
    services = {_component(s): s for s in objects["Service"].values() if _component(s) in PORTS}
    assert set(deployments) == set(services) == set(PORTS)
    assert not [doc for kind in objects.values() for doc in kind.values() if "namespace" in doc["metadata"]]

    config = _config(objects)
    env = config["data"]
    assert env["CHORUS_MODEL"] == "/models/backbone.gguf"
    assert env["CHORUS_SNAC_DIR"] == "/models/snac"
    assert env["CHORUS_HOST"] == "0.0.0.0"
    assert env["CHORUS_LOG_FORMAT"] == "json"
    assert "CHORUS_OTLP_ENDPOINT" in env
    # Peers are found through headless Services, by name and gRPC port.
    for variable, component in (("CHORUS_CODEC_WORKERS", "codec-worker"), ("CHORUS_TOKEN_SERVERS", "token-server")):
        service = services[component]
        assert service["spec"].get("clusterIP") == "None"
        grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
        # The first address; a second family's pool adds its own (test_the_neutts_pool_...).
        assert env[variable].split(",")[0] == f"{service['metadata']['name']}:{grpc_port}"
    assert services["gateway"]["spec"].get("clusterIP") != "None"

    (account,) = objects["ServiceAccount"].values()
    assert account["automountServiceAccountToken"] is False
    hpas = {_component(h): h for h in objects.get("HorizontalPodAutoscaler", {}).values()}

    for component, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        container = _container(deployment)
        port = PORTS[component]
        assert container["command"] == [COMMANDS[component]]
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
        assert _env(container)["CHORUS_PORT"] == str(port)
        named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named_ports["grpc"] == port
        assert str(named_ports["metrics"]) == env["CHORUS_METRICS_PORT"] == pod["metadata"]["annotations"]["prometheus.io/port"]
        tls = "CHORUS_TLS_CERT" in _env(container)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if tls:  # the kubelet's grpc probe cannot do TLS (tests/deploy/test_chart_doors.py runs these)
                assert "grpc" not in container[probe], (component, probe)
                command = container[probe]["exec"]["command"]
                assert command[:3] == ["python", "-m", "chorus.rpc.probe"]
                assert command[command.index("--port") + 1] == str(port)
            else:
                assert container[probe]["grpc"] == {"port": port}, (component, probe)
        # A CPU limit on every container: the services size their threads by it.
        assert container["resources"]["limits"]["cpu"]
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
        assert pod["spec"]["automountServiceAccountToken"] is False

        # Draining: the endpoint removal, then the service's own drain, fit in the
        # grace period, and liveness cannot restart a pod that is NOT_SERVING while
        # it drains.
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        assert int(sleep[1]) + int(_env(container)["CHORUS_DRAIN_SECONDS"]) < grace
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace

        labels = pod["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        assert services[component]["spec"]["selector"] == selector
        for service_port in services[component]["spec"]["ports"]:
            assert service_port["targetPort"] in named_ports
        (pdb,) = [p for p in objects["PodDisruptionBudget"].values() if _component(p) == component]
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        # Other components' pods must not match this selector.
        for other, other_deployment in deployments.items():
            other_labels = other_deployment["spec"]["template"]["metadata"]["labels"]
            assert (selector.items() <= other_labels.items()) == (other == component)

        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        if component == "gateway":
            assert "models" not in volumes
            assert container["image"].split(":")[0].rpartition("/")[2] == "chorus-gateway"
        else:
            mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
            assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
            claim = volumes["models"].get("persistentVolumeClaim")
            if claim and claim["claimName"] != "weights":
                assert claim["claimName"] in objects["PersistentVolumeClaim"]

        # An autoscaler per tier (when on), which owns the replica count.
        if component in hpas:
            hpa = hpas[component]
            assert hpa["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"],
            }
            assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
            assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"] * len(hpa["spec"]["metrics"])
            # kubectl apply would reset the HPA's count to a replicas field.
            assert "replicas" not in deployment["spec"]
        else:
            assert deployment["spec"]["replicas"] >= 1

    token_env = _env(_container(deployments["token-server"]))
    assert int(token_env["CHORUS_SLOTS"]) >= 1


# The signal each tier scales on (issue: what limits it), by HPA metric name.
HPA_METRICS = {
    "gateway": {"chorus_gateway_in_flight_streams"},
    "token-server": {"chorus_token_server_capacity_used_ratio", "chorus_token_server_queue_depth"},
    "codec-worker": {"chorus_codec_worker_busy_ratio", "chorus_codec_worker_lag_seconds"},
}


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_inputs(rule: dict) -> set[str]:
    """The exported series a prometheus-adapter rule reads (its seriesQuery and metricsQuery)."""
    import re

    names = set(re.findall(r"\b(chorus_[a-z_]+)\s*\{", rule["seriesQuery"] + " " + rule["metricsQuery"]))
    return names - {rule["name"]["as"]} | ({rule["name"]["as"]} if "<<.Series>>" in rule["metricsQuery"] else set())


def hpa_metric_names() -> dict[str, set[str]]:
    objects = _by_kind(SOURCES["deploy/k8s"]())
    return {_component(h): {m["pods"]["metric"]["name"] for m in h["spec"]["metrics"]}
            for h in objects["HorizontalPodAutoscaler"].values()}


def test_each_tier_scales_on_what_limits_it_through_shipped_adapter_rules():
    assert hpa_metric_names() == HPA_METRICS
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    for names in HPA_METRICS.values():
        for name in names:
            assert name in served, f"no prometheus-adapter rule serves {name}"
            rule = served[name]
            assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                      "pod": {"resource": "pod"}}
    # The token servers' ratio is computed from the capacity gauges; the others are the gauges.
    assert adapter_inputs(served["chorus_token_server_capacity_used_ratio"]) == {
        "chorus_token_server_capacity_streams", "chorus_token_server_capacity_headroom_streams"}
    for name in HPA_METRICS["codec-worker"] | HPA_METRICS["gateway"] | {"chorus_token_server_queue_depth"}:
        assert adapter_inputs(served[name]) == {name}
    # Not the stream count, which counts requests still queued at the token servers.
    assert "chorus_codec_worker_streams" not in {n for rule in adapter_rules() for n in adapter_inputs(rule)}


def test_every_metric_the_autoscalers_read_is_declared_by_its_service():
    """The static half; tests/system/test_prometheus.py finds each in a live scrape."""
    from prometheus_client import generate_latest

    from gateway import metrics as gateway_metrics
    from services.codec_worker import metrics as codec_metrics
    from services.token_server import metrics as token_metrics

    declared = "\n".join(generate_latest(m.REGISTRY).decode() for m in (gateway_metrics, token_metrics, codec_metrics))
    for rule in adapter_rules():
        for name in adapter_inputs(rule):
            assert f"\n{name} " in declared or f"\n{name}{{" in declared, name


def test_gpu_values_put_token_servers_and_codec_workers_on_gpus():
    objects = _by_kind(SOURCES["helm:gpu"]())
    for component, deployment in _tiers(objects).items():
        container = _container(deployment)
        limits = container["resources"].get("limits", {})
        tolerations = deployment["spec"]["template"]["spec"].get("tolerations", [])
        if component == "gateway":
            assert "nvidia.com/gpu" not in limits
            assert container["image"].startswith("chorus-gateway:")
            continue
        assert limits["nvidia.com/gpu"] == (1 if component == "token-server" else 2)
        assert limits["memory"]  # merged into, not replacing, the limits
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert container["image"].startswith("chorus-tts-cuda:")
    token_env = _env(_container(_tiers(objects)["token-server"]))
    codec_env = _env(_container(_tiers(objects)["codec-worker"]))
    assert token_env["CHORUS_GPU_LAYERS"] == "-1"
    assert codec_env["CHORUS_CODEC_DEVICE"] == "cuda"

    # On CPU nothing changes: no GPU, no offload, the CPU image.
    defaults = _tiers(_by_kind(SOURCES["helm:defaults"]()))
    for component, deployment in defaults.items():
        assert "nvidia.com/gpu" not in _container(deployment)["resources"].get("limits", {})
        if component != "gateway":
            assert _container(deployment)["image"].startswith("chorus-tts:")
    assert _env(_container(defaults["token-server"]))["CHORUS_GPU_LAYERS"] == "0"


def test_demo_models_are_built_in_each_pod():
    objects = _by_kind(SOURCES["helm:demo-models"]())
    assert "PersistentVolumeClaim" not in objects
    for deployment in objects["Deployment"].values():
        spec = deployment["spec"]["template"]["spec"]
        if _component(deployment) == "gateway":
            assert "initContainers" not in spec
            continue
        (init,) = spec["initContainers"]
        assert init["command"] == ["chorus", "models", "demo", "--dir", "/models", "--no-neutts"]
        assert {v["name"]: v for v in spec["volumes"]}["models"] == {"name": "models", "emptyDir": {}}

    # The chart calls the real CLI, and that CLI writes where CHORUS_MODEL points.
    help_text = _run("-m", "tools.cli", "models", "demo", "--help")
    assert help_text.returncode == 0 and "--dir" in help_text.stdout
    from tools.demo_models.build import DemoModels

    models = DemoModels(Path("/models"))
    env = _config(objects)["data"]
    assert (str(models.gguf), str(models.snac_dir)) == (env["CHORUS_MODEL"], env["CHORUS_SNAC_DIR"])


def test_models_fetch_job_fills_the_claim_the_pods_wait_for():
    objects = _by_kind(SOURCES["helm:fetch-models"]())
    (job,) = objects["Job"].values()
    spec = job["spec"]["template"]["spec"]
    (fetch,) = spec["containers"]
    (claim,) = objects["PersistentVolumeClaim"].values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert next(m for m in fetch["volumeMounts"] if m["name"] == "models").get("readOnly") is not True
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in fetch["env"]

    # The Job's command is the real tool's, and what it writes is what the pods wait for.
    from tools import fetch_models

    command = fetch["command"]
    assert command[:3] == ["python", "-m", "tools.fetch_models"]
    argv = command[3:]
    assert argv[argv.index("--backbone-sha256") + 1] == "a" * 64
    for deployment in _tiers(objects).values():
        if _component(deployment) == "gateway":
            continue
        (wait,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert wait["command"][:4] == ["python", "-m", "tools.fetch_models", "--wait"]
        assert wait["command"][4:] == ["--dir", "/models", "--backbone-name", "backbone.gguf", "--snac-name", "snac"]
    env = _config(objects)["data"]
    files = fetch_models.expected_files(Path("/models"), "backbone.gguf", "snac")
    assert str(files[0]) == env["CHORUS_MODEL"] and all(str(f.parent) == env["CHORUS_SNAC_DIR"] for f in files[1:])


def test_network_policy_lets_only_the_gateway_reach_token_servers_and_only_them_codec_workers():
    objects = _by_kind(SOURCES["deploy/k8s"]())
    tiers = _tiers(objects)
    labels = {c: d["spec"]["template"]["metadata"]["labels"] for c, d in tiers.items()}
    policies = {_component(p): p["spec"] for p in objects["NetworkPolicy"].values()}
    assert set(policies) == set(PORTS)

    def allowed(component: str, port: str) -> list:
        spec = policies[component]
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["podSelector"]["matchLabels"].items() <= labels[component].items()
        return [rule.get("from") for rule in spec["ingress"] if {"port": port} in rule["ports"]]

    def senders(component: str) -> set[str]:
        (peers,) = allowed(component, "grpc")
        return {c for c, pod in labels.items()
                if any(peer["podSelector"]["matchLabels"].items() <= pod.items() for peer in peers)}

    assert senders("token-server") == {"gateway"}
    assert senders("codec-worker") == {"token-server"}
    assert allowed("gateway", "grpc") == [None]  # clients: anyone, unless networkPolicy.gatewayFrom
    assert allowed("gateway", "http") == [None]  # the same clients on the OpenAI endpoint and the page
    for component in PORTS:
        assert allowed(component, "metrics") == [None]  # the scraper


def test_everything_on_mounts_tls_keys_and_exposes_monitoring():
    objects = _by_kind(SOURCES["helm:everything-on"]())
    tiers = _tiers(objects)
    certificates = {_component(c): c for c in objects["Certificate"].values()}
    assert set(certificates) == set(PORTS)
    for component, deployment in tiers.items():
        container = _container(deployment)
        env = _env(container)
        assert (env["CHORUS_TLS_CERT"], env["CHORUS_TLS_KEY"], env["CHORUS_TLS_CA"]) == (
            "/etc/chorus/tls/tls.crt", "/etc/chorus/tls/tls.key", "/etc/chorus/tls/ca.crt")
        assert {"name": "tls", "mountPath": "/etc/chorus/tls", "readOnly": True} in container["volumeMounts"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        certificate = certificates[component]["spec"]
        assert volumes["tls"]["secret"]["secretName"] == certificate["secretName"]
        # Identities follow the team's names: the tier name as a DNS SAN, then the Service's names.
        assert certificate["dnsNames"][0] == f"chorus-{component}"
        assert f"{deployment['metadata']['name']}.default.svc" in certificate["dnsNames"]
        assert {"server auth", "client auth"} <= set(certificate["usages"])
        assert certificate["issuerRef"] == {"name": "chorus-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}

    gateway = _container(tiers["gateway"])
    assert _env(gateway)["CHORUS_API_KEYS_FILE"] == "/etc/chorus/api-keys/keys"
    assert {"name": "api-keys", "mountPath": "/etc/chorus/api-keys", "readOnly": True} in gateway["volumeMounts"]
    assert _env(gateway)["CHORUS_LOOKAHEAD"] == "2"
    assert tiers["gateway"]["spec"]["template"]["metadata"]["annotations"]["team"] == "speech"
    assert _env(_container(tiers["token-server"]))["CHORUS_BUDGET_HEADROOM"] == "2.0"
    (gateway_service,) = [s for s in objects["Service"].values() if _component(s) == "gateway"]
    assert gateway_service["metadata"]["annotations"] == {"lb.example.com/internal": "true"}

    # Traces go to the bundled Jaeger's OTLP port.
    config = _config(objects)
    (jaeger_service,) = [s for s in objects["Service"].values() if _component(s) == "jaeger"]
    otlp_port = next(p["port"] for p in jaeger_service["spec"]["ports"] if p["name"] == "otlp-grpc")
    assert config["data"]["CHORUS_OTLP_ENDPOINT"] == f"{jaeger_service['metadata']['name']}:{otlp_port}"


def test_custom_resources_have_the_fields_their_controllers_read():
    objects = _by_kind(SOURCES["helm:everything-on"]())
    services = {_component(s): s for s in objects["Service"].values()}

    (monitor,) = objects["ServiceMonitor"].values()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    scraped = {c for c, s in services.items() if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
               and s["metadata"]["labels"]["app.kubernetes.io/component"] in expression["values"]}
    assert scraped == set(PORTS)
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert all(any(p["name"] == "metrics" for p in services[c]["spec"]["ports"]) for c in PORTS)

    (rule,) = objects["PrometheusRule"].values()
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"ChorusTimeToFirstAudioHigh", "ChorusAudioUnderruns", "ChorusErrorRateHigh",
                           "ChorusCapacityExhausted", "ChorusTokenEngineStalled", "ChorusCodecEngineStalled"}
    assert all({"expr", "for", "labels", "annotations"} <= set(a) and a["labels"]["severity"] for a in alerts.values())

    (route,) = objects["GRPCRoute"].values()
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["tts.example.com"]
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert backend == {"name": services["gateway"]["metadata"]["name"], "port": PORTS["gateway"]}
    matched = {m["method"]["service"] for m in route["spec"]["rules"][0]["matches"]}
    assert matched == {"tts.v1.SynthesisService", "nvidia.riva.tts.RivaSpeechSynthesis",
                       "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}

    (http_route,) = objects["HTTPRoute"].values()
    assert http_route["spec"]["parentRefs"] == route["spec"]["parentRefs"]
    assert http_route["spec"]["hostnames"] == ["tts.example.com"]
    (rule,) = http_route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"name": services["gateway"]["metadata"]["name"], "port": 8443}]

    # TLS to both routed ports, checked against the CA bundle and the gateway's tier name.
    (backend_tls,) = objects["BackendTLSPolicy"].values()
    gateway_service = services["gateway"]["metadata"]["name"]
    assert backend_tls["spec"]["targetRefs"] == [
        {"group": "", "kind": "Service", "name": gateway_service, "sectionName": section}
        for section in ("grpc", "http")]
    assert backend_tls["spec"]["validation"] == {
        "caCertificateRefs": [{"group": "", "kind": "ConfigMap", "name": "chorus-ca-bundle"}],
        "hostname": "chorus-gateway"}

    (dashboard,) = [c for c in objects["ConfigMap"].values() if _component(c) == "dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["chorus.json"])["uid"] == "chorus-tts"


@pytest.mark.parametrize("component", PORTS)
def test_each_service_reads_its_settings_from_the_manifest_environment(component, monkeypatch):
    """The env contract between the manifests and each service's own flag parsing."""
    parse_args = importlib.import_module(PARSERS[component]).parse_args
    objects = _by_kind(SOURCES["helm:everything-on"]())
    config = _config(objects)
    deployment = _tiers(objects)[component]
    for name in [n for n in os.environ if n.startswith("CHORUS_")]:
        monkeypatch.delenv(name)
    for name, value in {**config["data"], **_env(_container(deployment))}.items():
        if value is not None and name.startswith("CHORUS_"):
            monkeypatch.setenv(name, value)

    args = parse_args([])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (args.host, args.port) == ("0.0.0.0", PORTS[component])
    assert args.metrics_port == values["metricsPort"]
    assert args.log_format == "json"
    assert args.otlp_endpoint.endswith(":4317")
    if component == "token-server":
        assert args.model == "/models/backbone.gguf"
        assert args.codec_workers == "chorus-codec-worker:50053"
        assert args.slots == values["tokenServer"]["slots"]
        assert args.queue_size == values["tokenServer"]["queueSize"]
        assert args.drain_seconds == values["tokenServer"]["drainGraceSeconds"]
        assert args.gpu_layers == 0
        assert args.budget_headroom == 2.0  # from extraEnv
    elif component == "codec-worker":
        assert args.model_dir == "/models/snac"
        assert args.device == "cpu"
    else:
        assert args.token_servers == "chorus-token-server:50052"
        assert args.lookahead == 2  # from extraEnv
        assert args.http_port == "8443"  # gateway.http.port


NEUTTS_POOL = {"neutts-token-server": "token-server", "neucodec-worker": "codec-worker"}


def _pool(objects) -> dict[str, dict]:
    return {_component(d): d for d in objects["Deployment"].values() if _component(d) in NEUTTS_POOL}


def test_the_neutts_pool_deploys_beside_orpheus_with_the_voice_store_and_its_peers_only():
    objects = _by_kind(SOURCES["helm:neutts"]())
    pool, tiers = _pool(objects), _tiers(objects)
    assert set(pool) == set(NEUTTS_POOL) and set(tiers) == set(PORTS)
    env = _config(objects)["data"]
    # The gateway routes over both families' token servers; each pool's token servers
    # use their own codec workers.
    assert env["CHORUS_TOKEN_SERVERS"] == "chorus-token-server:50052,chorus-neutts-token-server:50052"
    token, codec = _env(_container(pool["neutts-token-server"])), _env(_container(pool["neucodec-worker"]))
    assert token["CHORUS_CODEC_WORKERS"] == "chorus-neucodec-worker:50053"
    assert token["CHORUS_MODEL"] == "/models/neutts/backbone.gguf" and token["CHORUS_SLOTS"] == "8"
    assert token["CHORUS_VOICE_STORE"] == "/voices"
    assert codec["CHORUS_CODEC"] == "neucodec_24khz" and codec["CHORUS_SNAC_DIR"] == "/models/neutts/neucodec"
    assert "CHORUS_CODEC" not in _env(_container(tiers["codec-worker"]))
    services = {_component(s): s for s in objects["Service"].values()}
    for component in NEUTTS_POOL:
        assert services[component]["spec"]["clusterIP"] == "None"
    # Each tier scales on its own: the NeuTTS token servers' HPA with the pool's
    # settings; the NeuCodec workers fixed, as asked.
    hpas = {_component(h): h for h in objects["HorizontalPodAutoscaler"].values()}
    assert hpas["neutts-token-server"]["spec"]["maxReplicas"] == 4
    assert hpas["token-server"]["spec"]["maxReplicas"] == 8
    assert "neucodec-worker" not in hpas and pool["neucodec-worker"]["spec"]["replicas"] == 1
    assert {m["pods"]["metric"]["name"] for m in hpas["neutts-token-server"]["spec"]["metrics"]} == \
        HPA_METRICS["token-server"]
    # The pool presents its tier's TLS identity: the same Secret, probes checked as that tier.
    for component, tier in NEUTTS_POOL.items():
        pod = pool[component]["spec"]["template"]["spec"]
        secret = next(v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "tls")
        tier_pod = tiers[tier]["spec"]["template"]["spec"]
        assert secret == next(v["secret"]["secretName"] for v in tier_pod["volumes"] if v["name"] == "tls")
        probe = _container(pool[component])["readinessProbe"]["exec"]["command"]
        assert probe[probe.index("--tier") + 1] == f"chorus-{tier}"
    # The voice store: written by gateways, read by NeuTTS token servers, nowhere else.
    (claim,) = [c for c in objects["PersistentVolumeClaim"].values() if _component(c) == "voices"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    mounts = {}
    for component, deployment in {**tiers, **pool}.items():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = [m for m in _container(deployment)["volumeMounts"] if m["name"] == "voices"]
        if mount:
            assert volumes["voices"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            mounts[component] = mount[0]["readOnly"]
    assert mounts == {"gateway": False, "neutts-token-server": True}
    gateway_env = _env(_container(tiers["gateway"]))
    assert gateway_env["CHORUS_VOICE_STORE"] == "/voices" and gateway_env["CHORUS_MAX_VOICES"] == "1000"
    # Network: the gateway reaches each pool's token servers, and each pool's codec
    # workers take only their own pool's token servers.
    labels = {c: d["spec"]["template"]["metadata"]["labels"] for c, d in {**tiers, **pool}.items()}
    policies = {_component(p): p["spec"] for p in objects["NetworkPolicy"].values()}

    def senders(component: str) -> set[str]:
        (peers,) = [rule["from"] for rule in policies[component]["ingress"] if {"port": "grpc"} in rule["ports"]]
        return {c for c, pod in labels.items()
                if any(peer["podSelector"]["matchLabels"].items() <= pod.items() for peer in peers)}

    assert senders("neutts-token-server") == senders("token-server") == {"gateway"}
    assert senders("neucodec-worker") == {"neutts-token-server"}
    assert senders("codec-worker") == {"token-server"}
    (monitor,) = objects["ServiceMonitor"].values()
    scraped = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    assert set(scraped) == set(PORTS) | set(NEUTTS_POOL)


def test_demo_models_build_the_neutts_family_in_its_pool_and_an_existing_voice_claim_is_used():
    objects = _by_kind(SOURCES["helm:neutts-demo"]())
    pool = _pool(objects)
    for component, deployment in pool.items():
        (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert init["command"] == ["chorus", "models", "demo", "--dir", "/models", "--neutts"], component
    (orpheus_init,) = _tiers(objects)["token-server"]["spec"]["template"]["spec"]["initContainers"]
    assert "--neutts" not in orpheus_init["command"]
    assert "voices" not in {_component(c) for c in objects.get("PersistentVolumeClaim", {}).values()}
    volumes = {v["name"]: v for v in pool["neutts-token-server"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["voices"]["persistentVolumeClaim"]["claimName"] == "voices"


@pytest.mark.parametrize("component", NEUTTS_POOL)
def test_the_neutts_pool_reads_its_settings_from_the_manifest_environment(component, monkeypatch):
    tier = NEUTTS_POOL[component]
    parse_args = importlib.import_module(PARSERS[tier]).parse_args
    objects = _by_kind(SOURCES["helm:neutts"]())
    for name in [n for n in os.environ if n.startswith("CHORUS_")]:
        monkeypatch.delenv(name)
    for name, value in {**_config(objects)["data"], **_env(_container(_pool(objects)[component]))}.items():
        if value is not None and name.startswith("CHORUS_"):
            monkeypatch.setenv(name, value)
    args = parse_args([])
    if tier == "token-server":
        assert (args.model, args.codec_workers) == ("/models/neutts/backbone.gguf", "chorus-neucodec-worker:50053")
        assert (args.voice_store, args.phoneme_language, args.slots) == ("/voices", "en-us", 8)
    else:
        assert (args.model_dir, args.codec) == ("/models/neutts/neucodec", "neucodec_24khz")


def test_chart_commands_are_console_scripts_of_the_package():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for component, command in COMMANDS.items():
        module, function = scripts[command].split(":")
        assert module == f"{PARSERS[component]}" and function == "main"
