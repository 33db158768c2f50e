"""Every door a Chorus process opens in the chart is reachable, and every probe can pass.

For each values variant (TLS on/off x the gateway's HTTP port on/off, routes and
monitoring on) the ports each process listens on are derived the way the process
itself derives them: its own parse_args over the environment the chart gives it
(the shared ConfigMap plus the container's env). Each such port must then be a
containerPort, a Service port, allowed by the NetworkPolicy and reached by
something (a route for client doors, the peers' addresses for internal ones, the
ServiceMonitor for metrics), with no port exposed that nothing listens on.

Probes must speak the transport of the port they ask: the kubelet's grpc probe only
on plaintext gRPC ports (it cannot do TLS, and a TLS port fails it UNAVAILABLE),
an exec `python -m chorus.rpc.probe` with the pod's own certificate mounted when TLS is
on (run here for real against a TLS health server, with the rendered command), and
an httpGet's scheme HTTPS exactly when the HTTP port serves HTTPS.

Also: the chart's image names and tags are the ones the Dockerfiles' headers build,
at pyproject.toml's version; and, where checkov is installed, the rendered chart has
no checkov finding besides the ones docs/deploy.md explains.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from certs import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "chorus"
PARSERS = {"gateway": "gateway.__main__", "token-server": "services.token_server.__main__",
           "codec-worker": "services.codec_worker.__main__"}
# Which shared variable names each internal tier to its callers.
PEER_ADDRESS = {"token-server": "CHORUS_TOKEN_SERVERS", "codec-worker": "CHORUS_CODEC_WORKERS"}
PARENT = [{"name": "public", "namespace": "gateways"}]


def _values(tls: bool, http: bool) -> dict:
    gateway: dict = {"grpcRoute": {"enabled": True, "parentRefs": PARENT},
                     "http": {"enabled": http}}
    if http:
        gateway["http"].update(httpRoute={"enabled": True, "parentRefs": PARENT},
                               ingress={"enabled": True, "hosts": ["tts.example.com"]})
    values = {"gateway": gateway, "monitoring": {"serviceMonitor": {"enabled": True}}, "jaeger": {"enabled": True}}
    if tls:
        values["tls"] = {"enabled": True, "issuerRef": {"name": "chorus-ca", "kind": "ClusterIssuer"}}
        gateway["backendTLSCAConfigMap"] = "chorus-ca-bundle"
    return values


MATRIX = {f"tls-{'on' if tls else 'off'}-http-{'on' if http else 'off'}": _values(tls, http)
          for tls in (False, True) for http in (False, True)}


def _render_k8s():
    spec = importlib.util.spec_from_file_location("render_k8s", DEPLOY / "render_k8s.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render(values) -> dict[str, str]:
    try:
        import helm_python  # noqa: F401
    except Exception as exc:  # not installed, or its native library does not load here
        pytest.skip(f"helm_python unavailable ({exc}); pip install -e '.[dev]'")
    return _render_k8s().render_chart(values)


def _objects(values) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for text in _render(values).values():
        for doc in yaml.safe_load_all(text):
            if doc:
                out.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return out


def _component(doc) -> str:
    return doc["metadata"]["labels"].get("app.kubernetes.io/component", "")


def _one(objects, kind, component) -> dict:
    (found,) = [d for d in objects.get(kind, {}).values() if _component(d) == component]
    return found


def _env(objects, container) -> dict[str, str]:
    (config,) = [c for c in objects["ConfigMap"].values() if c["metadata"]["name"].endswith("-config")]
    return {**config["data"], **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}


def _tls_paths(args) -> tuple[Path, Path, Path] | None:
    """The --tls-* files as chorus.security.tls.TlsFiles.from_flags takes them (which also opens
    them, and they are only in the pod): None for plaintext, all three or an error."""
    given = (args.tls_cert, args.tls_key, args.tls_ca)
    if not any(given):
        return None
    assert all(given), f"TLS needs all three files: {given}"
    return tuple(Path(p) for p in given)


def _listening(component: str, env: dict[str, str], monkeypatch) -> dict[str, tuple[int, str]]:
    """door -> (port, transport) as the process reads its flags from this environment."""
    for name in [n for n in os.environ if n.startswith("CHORUS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = importlib.import_module(PARSERS[component]).parse_args([])
    tls = _tls_paths(args) is not None
    doors = {"grpc": (args.port, "grpc+tls" if tls else "grpc")}
    if args.metrics_port:
        doors["metrics"] = (args.metrics_port, "http")  # Prometheus' exporter: plaintext always
    if component == "gateway":
        from gateway.__main__ import _http_port

        http_port = _http_port(args.http_port)
        if http_port is not None:
            doors["http"] = (http_port, "https" if tls else "http")
    assert args.host == "0.0.0.0", "probes and peers reach the pod on its pod IP"
    return doors


def _named(ports: list[dict], ref, key: str) -> dict:
    """The port a reference (name or number) means."""
    (port,) = [p for p in ports if ref in (p.get("name"), p[key])]
    return port


@pytest.mark.parametrize("variant", MATRIX)
def test_every_port_a_process_listens_on_is_exposed_allowed_and_routed(variant, monkeypatch):
    objects = _objects(MATRIX[variant])
    tls_on = MATRIX[variant].get("tls", {}).get("enabled", False)
    http_on = MATRIX[variant]["gateway"]["http"]["enabled"]
    for component in PARSERS:
        deployment = _one(objects, "Deployment", component)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = _env(objects, container)
        doors = _listening(component, env, monkeypatch)
        assert ("http" in doors) == (component == "gateway" and http_on), (component, doors)
        assert {transport for _, transport in doors.values()} >= {"grpc+tls" if tls_on else "grpc"}

        container_ports = container["ports"]
        # Nothing exposed that the process does not open.
        assert sorted(p["containerPort"] for p in container_ports) == sorted(port for port, _ in doors.values())
        service = _one(objects, "Service", component)
        policy = _one(objects, "NetworkPolicy", component)
        allowed = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
        for door, (number, transport) in doors.items():
            (exposed,) = [p for p in container_ports if p["containerPort"] == number]
            service_port = _named(service["spec"]["ports"], exposed["name"], "port")
            assert service_port["targetPort"] in (exposed["name"], number), (component, door)
            assert any(ref in (exposed["name"], number) for ref in allowed), (component, door, allowed)
            if transport in ("http", "https") and door == "http":
                assert service_port["appProtocol"] == transport

            # ... and something reaches it.
            name = service["metadata"]["name"]
            if door == "metrics":
                monitor = next(iter(objects["ServiceMonitor"].values()))
                endpoint = {"port": service_port["name"], "path": "/metrics", "interval": "15s"}
                assert endpoint in monitor["spec"]["endpoints"]
            elif component in PEER_ADDRESS:
                assert env[PEER_ADDRESS[component]] == f"{name}:{service_port['port']}"
            elif door == "grpc":
                (route,) = objects["GRPCRoute"].values()
                assert {"name": name, "port": service_port["port"]} in route["spec"]["rules"][0]["backendRefs"]
            else:
                _assert_routed_over_http(objects, name, service, service_port)
            if component == "gateway" and door != "metrics":
                # A routed door that speaks TLS is reached over TLS: the Gateway is
                # told to, and to expect the name the gateway's certificate carries.
                policies = objects.get("BackendTLSPolicy", {}).values()
                target = {"group": "", "kind": "Service", "name": name, "sectionName": service_port["name"]}
                covered = [p for p in policies if target in p["spec"]["targetRefs"]]
                assert len(covered) == (1 if tls_on else 0), (door, covered)
                for policy in covered:
                    certificate = _one(objects, "Certificate", "gateway")
                    assert policy["spec"]["validation"]["hostname"] in certificate["spec"]["dnsNames"]
    if not http_on:
        assert "HTTPRoute" not in objects and "Ingress" not in objects


def _assert_routed_over_http(objects, name, service, service_port):
    """The HTTPRoute and the Ingress both lead to this Service port."""
    (route,) = objects["HTTPRoute"].values()
    assert {"name": name, "port": service_port["port"]} in route["spec"]["rules"][0]["backendRefs"]
    (ingress,) = objects["Ingress"].values()
    for rule in ingress["spec"]["rules"]:
        backend = rule["http"]["paths"][0]["backend"]["service"]
        assert backend["name"] == name
        reference = backend["port"].get("name", backend["port"].get("number"))
        assert _named(service["spec"]["ports"], reference, "port") == service_port


def test_the_grpc_route_carries_every_grpc_api_the_gateway_serves():
    from gateway.frontends.riva.servicer import SERVICE_NAME as RIVA
    from gateway.frontends.tts_v1 import SERVICE_NAME as TTS

    (route,) = _objects(MATRIX["tls-off-http-on"])["GRPCRoute"].values()
    matched = {m["method"]["service"] for m in route["spec"]["rules"][0]["matches"]}
    assert {TTS, RIVA, "grpc.reflection.v1.ServerReflection"} <= matched
    assert RIVA == "nvidia.riva.tts.RivaSpeechSynthesis"


# ---------------------------------------------------------------- probes


class _HealthServer:
    """A gRPC health service answering SERVING, on the transport a tier's process uses."""

    def __init__(self, tls=None, require_client_cert=False):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", tls.server_credentials(require_client_cert))
        self.server.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop(0)


def _kubelet_grpc_probe(port: int) -> bool:
    """What the kubelet's grpc probe does: a plaintext Health/Check."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from chorus.security.tls import TIERS

    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    return {tier: ca.issue(root / tier, tier) for tier in TIERS}


@pytest.mark.parametrize("variant", MATRIX)
def test_every_probe_can_pass_against_its_own_process_transport(variant, monkeypatch, pki):
    from chorus.rpc import probe as chorus_probe
    from chorus.security.tls import DEFAULT_ALLOWED_CLIENTS, TlsFiles

    objects = _objects(MATRIX[variant])
    certificates = {_component(c): c for c in objects.get("Certificate", {}).values()}
    for component in PARSERS:
        deployment = _one(objects, "Deployment", component)
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = _env(objects, container)
        doors = _listening(component, env, monkeypatch)
        grpc_port, grpc_transport = doors["grpc"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            if "grpc" in probe:
                assert grpc_transport == "grpc", f"{component} {kind}: the kubelet's grpc probe cannot do TLS"
                assert probe["grpc"]["port"] == grpc_port
                with _HealthServer() as server:
                    assert _kubelet_grpc_probe(server.port)
            elif "httpGet" in probe:
                port = _named(container["ports"], probe["httpGet"]["port"], "containerPort")["containerPort"]
                (door,) = [d for d, (number, _) in doors.items() if number == port]
                assert door == "http" and probe["httpGet"]["path"] == "/health"
                assert probe["httpGet"].get("scheme", "HTTP") == doors["http"][1].upper()
            else:
                command = probe["exec"]["command"]
                assert command[:3] == ["python", "-m", "chorus.rpc.probe"], (component, kind)
                args = chorus_probe.parse_args(command[3:])  # the container's CHORUS_TLS_* are set above
                assert args.port == grpc_port and args.host == "127.0.0.1"
                assert args.timeout < probe["timeoutSeconds"], "the kubelet would kill the probe before it reports"
                tls = _tls_paths(args)
                assert (tls is not None) == (grpc_transport == "grpc+tls")
                if tls is None:
                    continue
                # The files are the tier's certificate, mounted from its Secret ...
                mounts = {m["name"]: m for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                for path in tls:
                    (mount,) = [m for m in mounts.values() if str(path).startswith(m["mountPath"] + "/")]
                    secret = volumes[mount["name"]]["secret"]["secretName"]
                    assert secret == certificates[component]["spec"]["secretName"]
                # ... which names the tier the probe checks the server against.
                assert args.tier in certificates[component]["spec"]["dnsNames"]

                # Run the rendered command against a TLS health server of the tier,
                # the files of a certificate issued as cert-manager would.
                mount_path = mounts["tls"]["mountPath"]
                tier = f"chorus-{component}"  # the identity the tier's own certificate names
                folder = pki[tier]
                files = {name: value.replace(mount_path, str(folder.path)) for name, value in env.items()
                         if name.startswith("CHORUS_TLS_")}
                server_tls = TlsFiles(folder.cert, folder.key, folder.ca)
                mtls = bool(DEFAULT_ALLOWED_CLIENTS[tier])
                with _HealthServer(server_tls, require_client_cert=mtls) as server:
                    argv = list(command[3:])
                    argv[argv.index("--port") + 1] = str(server.port)
                    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
                    ran = subprocess.run([sys.executable, "-m", "chorus.rpc.probe", *argv], cwd=ROOT,
                                         env={**clean, **files}, capture_output=True, text=True, timeout=60)
                    assert ran.returncode == 0, ran.stderr
                    assert ran.stdout.strip().endswith("SERVING")
                    # The finding this replaces: the kubelet's plaintext probe never passes here.
                    assert not _kubelet_grpc_probe(server.port)


# ---------------------------------------------------------------- images


def _header_images() -> dict[str, tuple[str, str]]:
    """images key -> (repository, tag) that each Dockerfile's header builds."""
    out = {}
    for dockerfile in sorted((DEPLOY / "docker").glob("*.Dockerfile")):
        header = "".join(line for line in dockerfile.read_text().splitlines(keepends=True) if line.startswith("#"))
        (match,) = re.findall(r"docker build -f deploy/docker/(\w+)\.Dockerfile -t ([^\s:]+):(\S+) \.", header)
        assert match[0] == dockerfile.name.removesuffix(".Dockerfile")
        out[match[0]] = match[1:]
    return out


def _chart_images(objects) -> set[str]:
    pods = [d["spec"]["template"]["spec"] for kind in ("Deployment", "Job") for d in objects.get(kind, {}).values()
            if _component(d) != "jaeger"]
    return {c["image"] for pod in pods for c in pod.get("initContainers", []) + pod["containers"]}


@pytest.mark.parametrize("registry", ["", "localhost", "registry.example.com:5000/speech"])
def test_chart_images_are_the_ones_the_dockerfiles_build(registry):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    built = _header_images()
    assert set(built) == {"cpu", "cuda", "gateway"}
    assert {tag for _, tag in built.values()} == {version}
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version

    prefix = f"{registry}/" if registry else ""
    expected = {kind: f"{prefix}{repository}:{tag}" for kind, (repository, tag) in built.items()}
    values = {"images": {"registry": registry},
              "models": {"accessModes": ["ReadWriteMany"], "fetch": {
                  "enabled": True, "backbone": {"url": "https://x/b.gguf"}, "snacConfig": {"url": "https://x/c.json"},
                  "snacWeights": {"url": "https://x/w.bin"}}}}
    on_cpu = _objects(values)
    on_gpu = _objects({**values, "tokenServer": {"gpu": {"enabled": True}}, "codec": {"gpu": {"enabled": True}}})
    assert _chart_images(on_cpu) == {expected["cpu"], expected["gateway"]}
    assert _chart_images(on_gpu) >= {expected["cuda"], expected["gateway"]}
    assert _chart_images(on_gpu) <= set(expected.values())
    gateway = _one(on_cpu, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["image"] == expected["gateway"]


# ---------------------------------------------------------------- checkov

# Findings checkov reports on the rendered chart that stay, each explained in
# docs/deploy.md ("Scanned"); anything else it reports fails this test.
CHECKOV_EXPLAINED = {"CKV_K8S_21", "CKV_K8S_15", "CKV_K8S_43"}


def _checkov() -> str | None:
    return os.environ.get("CHORUS_CHECKOV") or shutil.which("checkov")


def test_docs_explain_each_checkov_finding_the_chart_keeps():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for check in CHECKOV_EXPLAINED:
        assert f"`{check}`" in docs, check


@pytest.mark.skipif(not _checkov(), reason="checkov not installed (CHORUS_CHECKOV=path/to/checkov to run it)")
def test_checkov_finds_nothing_unexplained_in_the_rendered_chart(tmp_path):
    variants = {**MATRIX, "defaults": None, "demo-models": {"models": {"source": "demo"}},
                "gpu": {"tokenServer": {"gpu": {"enabled": True}}, "codec": {"gpu": {"enabled": True}}},
                "everything-on": {
        **MATRIX["tls-on-http-on"], "models": {"accessModes": ["ReadWriteMany"], "fetch": {
            "enabled": True, "backbone": {"url": "https://x/b.gguf"}, "snacConfig": {"url": "https://x/c.json"},
            "snacWeights": {"url": "https://x/w.bin"}}},
        "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                       "grafanaDashboard": {"enabled": True}}}}
    # With digests (images.*.digest, a jaeger.image by digest) the image findings go too.
    digest = "sha256:" + "0" * 64
    variants["pinned"] = {"images": {kind: {"repository": repository, "digest": digest}
                                     for kind, (repository, _) in _header_images().items()},
                          "jaeger": {"enabled": True, "image": f"jaegertracing/all-in-one:1.62.0@{digest}"}}
    for variant, values in variants.items():
        (tmp_path / variant).mkdir()
        for name, text in _render(values).items():
            (tmp_path / variant / name).write_text(text)
    ran = subprocess.run([_checkov(), "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json",
                          "--skip-download"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(ran.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = {(f["check_id"], f["file_path"]) for r in reports for f in r["results"]["failed_checks"]}
    assert {check for check, _ in failed} <= CHECKOV_EXPLAINED, sorted(failed)
    assert {check for check, path in failed if path.startswith("/pinned/")} == {"CKV_K8S_21"}
    # The scan saw the objects: every variant's Deployments were checked.
    passed = {f["file_path"].split("/")[1] for r in reports for f in r["results"]["passed_checks"]}
    assert passed == set(variants)
