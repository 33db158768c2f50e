"""deploy/: the Helm chart lints and renders offline, its renders and the plain
manifests in deploy/k8s/ pass yamllint and strict Kubernetes 1.30 schemas, the two
agree, and the objects fit together the way the services need (probes on the gRPC
port, drain timing, headless discovery, the codec pool's own autoscaler).

Tools (pins for the dev extras): yamllint 1.38.0, kubernetes-validate 1.37.0,
helm-python-sdk 0.2.2 (Helm's Go engine as a shared library; no helm binary).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
KUBE_VERSION = "1.30.0"
PORTS = {"gateway": 50051, "token-server": 50052, "codec-worker": 50053}
MODULES = {"gateway": "gateway", "token-server": "services.token_server", "codec-worker": "services.codec_worker"}

# Value sets the chart must render, lint and validate with, besides its defaults.
VARIANTS = {
    "defaults": None,
    "demo-models": {"models": {"source": "demo"}},
    "gpu-codec": {"codec": {"gpu": {"enabled": True, "count": 2}, "autoscaling": {"targetStreamsPerPod": 8}}},
    "fixed-codec-pool": {"codec": {"replicas": 3, "autoscaling": {"enabled": False}}},
    "existing-claim": {"models": {"existingClaim": "weights"}, "otlpEndpoint": "jaeger-collector:4317"},
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
    assert "deploy/helm/chorus/values.yaml" in listed
    assert not [path for path in listed if "/templates/" in path]

    result = _run("-m", "yamllint", "--strict", "-c", "deploy/.yamllint", "deploy/")
    assert result.returncode == 0


def test_plain_manifests_pass_strict_kubernetes_validate(kubernetes_validate):
    assert K8S_FILES, "deploy/k8s/ is empty: run python deploy/render_k8s.py"
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
    report = helm.lint(DEPLOY / "helm" / "chorus", VARIANTS[variant], strict=True, kube_version=f"v{KUBE_VERSION}")
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
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_chart_rejects_bad_values():
    helm = _require("helm_python")
    bad = [
        ({"tokenServer": {"slots": 0}}, helm.HelmValuesError),
        ({"models": {"source": "nfs"}}, helm.HelmValuesError),
        ({"replicaCount": 3}, helm.HelmValuesError),  # not a key of this chart
        ({"codec": {"gpu": {"enabled": True}}}, helm.HelmRenderError),  # GPU load is not CPU load
        ({"codec": {"autoscaling": {"minReplicas": 9, "maxReplicas": 4}}}, helm.HelmRenderError),
    ]
    for values, error in bad:
        with pytest.raises(error):
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
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def _container(deployment) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.mark.parametrize("source", SOURCES)
def test_objects_fit_together(source):
    objects = _by_kind(SOURCES[source]())
    deployments = {_component(d): d for d in objects["Deployment"].values()}
    services = {_component(s): s for s in objects["Service"].values()}
    assert set(deployments) == set(services) == set(PORTS)
    assert not [doc for kind in objects.values() for doc in kind.values() if "namespace" in doc["metadata"]]

    (config,) = objects["ConfigMap"].values()
    env = config["data"]
    assert env["CHORUS_MODEL"] == "/models/backbone.gguf"
    assert env["CHORUS_SNAC_DIR"] == "/models/snac"
    assert env["CHORUS_HOST"] == "0.0.0.0"
    assert "CHORUS_OTLP_ENDPOINT" in env
    # Peers are found through headless Services, by name and gRPC port.
    for variable, component in (("CHORUS_CODEC_WORKERS", "codec-worker"), ("CHORUS_TOKEN_SERVERS", "token-server")):
        service = services[component]
        assert service["spec"].get("clusterIP") == "None"
        grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert env[variable] == f"{service['metadata']['name']}:{grpc_port}"
    assert services["gateway"]["spec"].get("clusterIP") != "None"

    for component, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        container = _container(deployment)
        port = PORTS[component]
        assert container["command"] == ["python", "-m", MODULES[component]]
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]
        assert _env(container)["CHORUS_PORT"] == str(port)
        named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named_ports["grpc"] == port
        assert str(named_ports["metrics"]) == env["CHORUS_METRICS_PORT"] == pod["metadata"]["annotations"]["prometheus.io/port"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (component, probe)

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
        else:
            mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
            assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
            claim = volumes["models"].get("persistentVolumeClaim")
            if claim and claim["claimName"] != "weights":
                assert claim["claimName"] in objects["PersistentVolumeClaim"]

    token_env = _env(_container(deployments["token-server"]))
    assert int(token_env["CHORUS_SLOTS"]) >= 1

    codec = deployments["codec-worker"]
    hpas = objects.get("HorizontalPodAutoscaler", {})
    if hpas:
        (hpa,) = hpas.values()
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": codec["metadata"]["name"],
        }
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["metrics"]
        # kubectl apply would reset the HPA's count to a replicas field.
        assert "replicas" not in codec["spec"]
    else:
        assert codec["spec"]["replicas"] >= 1


def test_codec_autoscaler_is_in_the_plain_manifests():
    objects = _by_kind(SOURCES["deploy/k8s"]())
    (hpa,) = objects["HorizontalPodAutoscaler"].values()
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "PersistentVolumeClaim" in objects


def test_gpu_value_puts_codec_workers_on_gpus():
    objects = _by_kind(SOURCES["helm:gpu-codec"]())
    deployments = {_component(d): d for d in objects["Deployment"].values()}
    for component, deployment in deployments.items():
        limits = _container(deployment)["resources"].get("limits", {})
        tolerations = deployment["spec"]["template"]["spec"].get("tolerations", [])
        if component == "codec-worker":
            assert limits["nvidia.com/gpu"] == 2
            assert limits["memory"] == "4Gi"  # merged into, not replacing, the limits
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        else:
            assert "nvidia.com/gpu" not in limits
    (hpa,) = objects["HorizontalPodAutoscaler"].values()
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "chorus_codec_worker_streams"

    defaults = _by_kind(SOURCES["helm:defaults"]())
    for deployment in defaults["Deployment"].values():
        assert "nvidia.com/gpu" not in _container(deployment)["resources"].get("limits", {})


def test_demo_models_are_built_in_each_pod():
    objects = _by_kind(SOURCES["helm:demo-models"]())
    assert "PersistentVolumeClaim" not in objects
    for deployment in objects["Deployment"].values():
        spec = deployment["spec"]["template"]["spec"]
        if _component(deployment) == "gateway":
            assert "initContainers" not in spec
            continue
        (init,) = spec["initContainers"]
        assert init["command"] == ["python", "-m", "tools.cli", "models", "demo", "--dir", "/models"]
        assert {v["name"]: v for v in spec["volumes"]}["models"] == {"name": "models", "emptyDir": {}}

    # The chart calls the real CLI, and that CLI writes where CHORUS_MODEL points.
    help_text = _run("-m", "tools.cli", "models", "demo", "--help")
    assert help_text.returncode == 0 and "--dir" in help_text.stdout
    from tools.demo_models.build import DemoModels

    models = DemoModels(Path("/models"))
    env = next(iter(objects["ConfigMap"].values()))["data"]
    assert (str(models.gguf), str(models.snac_dir)) == (env["CHORUS_MODEL"], env["CHORUS_SNAC_DIR"])


def test_token_server_reads_its_settings_from_the_manifest_environment(monkeypatch):
    """The env contract between the manifests and the service's own flag parsing."""
    from services.token_server.__main__ import parse_args

    objects = _by_kind(SOURCES["deploy/k8s"]())
    (config,) = objects["ConfigMap"].values()
    deployment = next(d for d in objects["Deployment"].values() if _component(d) == "token-server")
    for name in [n for n in os.environ if n.startswith("CHORUS_")]:
        monkeypatch.delenv(name)
    for name, value in {**config["data"], **_env(_container(deployment))}.items():
        monkeypatch.setenv(name, value)

    args = parse_args([])
    values = yaml.safe_load((DEPLOY / "helm" / "chorus" / "values.yaml").read_text())
    assert args.model == "/models/backbone.gguf"
    assert (args.host, args.port) == ("0.0.0.0", PORTS["token-server"])
    assert args.codec_workers == "chorus-codec-worker:50053"
    assert args.slots == values["tokenServer"]["slots"]
    assert args.queue_size == values["tokenServer"]["queueSize"]
    assert args.drain_seconds == values["tokenServer"]["drainGraceSeconds"]
    assert args.metrics_port == values["metricsPort"]
    assert args.otlp_endpoint == ""
