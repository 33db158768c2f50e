"""The images' entry points, run for real: a codec worker and a token server from the
CPU image on the demo models (mounted read-only at /models, as the chart mounts
weights), a gateway from the gateway image, and one synthesis through all three
from the host with the `chorus say` client, written to a WAV.

Each container runs as its image says (user, working directory, environment,
entry point; the model paths come from the image's CHORUS_MODEL and
CHORUS_SNAC_DIR), with what the chart's pods get: a read-only root filesystem with
a writable /tmp, no capabilities, no privilege escalation. They share the host's
network and bind 127.0.0.1 on free ports, so other work on this machine is never in
the way, and the host reaches them on loopback.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import wave
from pathlib import Path

from tools.images.podman import PodmanError, podman

TEXT = "Hello from the images."
PREFIX = "chorus-images-check-"


class Service:
    def __init__(self, name: str, ready_file: Path) -> None:
        self.name, self.ready_file = PREFIX + name, ready_file
        self.ready: dict = {}

    def running(self) -> bool:
        done = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return done.stdout.decode().strip() == "true"

    def logs(self) -> str:
        done = podman("logs", "--tail", "40", self.name, check=False)
        return (done.stdout + done.stderr).decode(errors="replace")

    def wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if not self.running():
                raise PodmanError(f"{self.name} exited before it was ready:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise PodmanError(f"{self.name} was not ready after {timeout_s:.0f}s:\n{self.logs()}")
            time.sleep(0.5)
        self.ready = json.loads(self.ready_file.read_text())
        return self.ready

    def remove(self) -> None:
        podman("rm", "--force", "--time", "10", self.name, check=False, timeout=120)


def _run(service: Service, runtime: list[str], volumes: list[str], image: str, *command: str) -> None:
    service.remove()  # a container of ours left over from an interrupted check
    service.ready_file.unlink(missing_ok=True)
    podman("run", "--detach", "--name", service.name, *runtime, "--network", "host",
           "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "--env", "CHORUS_HOST=127.0.0.1", *volumes, image, *command, timeout=300)


def serve_and_say(cpu: str, gateway: str, models: Path, work: Path, runtime: list[str], out_wav: Path,
                  log=print, timeout_s: float = 600) -> dict:
    from tools.client import output_format, patch_stream_header, say

    state = work / "run"
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o1777)  # the containers write their ready files as uid 10001
    shared = ["--volume", f"{state}:/run/chorus"]
    weights = ["--volume", f"{models.resolve()}:/models:ro"]
    codec = Service("codec-worker", state / "codec-worker.json")
    token = Service("token-server", state / "token-server.json")
    front = Service("gateway", state / "gateway.json")
    result: dict = {"text": TEXT}
    started = time.monotonic()
    try:
        # Explicit commands as the chart's (command: [chorus-codec-worker]); the CPU image's
        # CMD is the token server. One thread each: this machine is shared.
        _run(codec, runtime, shared + weights, cpu, "chorus-codec-worker", "--port", "0",
             "--ready-file", "/run/chorus/codec-worker.json", "--torch-threads", "1")
        codec_at = codec.wait_ready(timeout_s)["address"]
        log(f"run: codec worker ({cpu}) ready at {codec_at}")
        _run(token, runtime, shared + weights, cpu, "chorus-token-server", "--port", "0",
             "--ready-file", "/run/chorus/token-server.json", "--codec-workers", codec_at, "--llama-threads", "1")
        token_at = token.wait_ready(timeout_s)["address"]
        log(f"run: token server ({cpu}) ready at {token_at}")
        # The gateway image's ENTRYPOINT is chorus-gateway: these are its arguments. Its
        # port comes as the chart gives it, in CHORUS_PORT, where the image's HEALTHCHECK
        # looks for it too.
        _run(front, runtime, shared + ["--env", f"CHORUS_PORT={_free_port()}"], gateway,
             "--token-servers", token_at, "--http-port", "0", "--ready-file", "/run/chorus/gateway.json")
        ready = front.wait_ready(timeout_s)
        log(f"run: gateway ({gateway}) ready at {ready['address']}, HTTP at {ready.get('http')}")
        result["ready_s"] = round(time.monotonic() - started, 1)
        # The image's own HEALTHCHECK, run as docker would run it.
        health = podman("healthcheck", "run", front.name, check=False, timeout=120)
        result["healthcheck"] = (health.stdout + health.stderr).decode(errors="replace").strip() or "healthy"
        if health.returncode != 0:
            raise PodmanError(f"the gateway image's HEALTHCHECK failed on a serving gateway: {result['healthcheck']}")
        log(f"run: the gateway image's HEALTHCHECK says {result['healthcheck']}")

        out_wav.parent.mkdir(parents=True, exist_ok=True)
        with open(out_wav, "wb") as f:
            spoken = say(ready["address"], TEXT, f, encoding="wav", timeout=timeout_s)
        patch_stream_header(out_wav, output_format(str(out_wav), "wav"), spoken.samples)
        with wave.open(str(out_wav)) as w:
            frames, rate = w.getnframes(), w.getframerate()
        if frames <= 0:
            raise PodmanError(f"the synthesis through the images wrote no audio to {out_wav}")
        result.update(wav=str(out_wav), seconds_of_audio=round(frames / rate, 2), sample_rate=rate,
                      first_audio_s=round(spoken.first_audio_s or 0, 2))
        log(f"run: synthesized {frames / rate:.2f} s of audio at {rate} Hz to {out_wav} "
            f"(first audio after {spoken.first_audio_s:.2f} s)")
        if ready.get("http"):
            with urllib.request.urlopen(f"http://{ready['http']}/health", timeout=30) as response:
                result["http_health"] = response.status
            log(f"run: the gateway's HTTP port answers /health with {result['http_health']}")
            with urllib.request.urlopen(f"http://{ready['http']}/", timeout=30) as response:
                page = response.read().decode(errors="replace")
            if "<html" not in page.lower():
                raise PodmanError("the gateway image serves no browser page at / (is index.html installed?)")
            result["browser_page_bytes"] = len(page)
            log(f"run: the gateway image serves the browser page at / ({len(page)} bytes)")
        result["users"] = {s.name: _user(s.name) for s in (codec, token, front)}
        result["ok"] = True
    finally:
        for service in (front, token, codec):
            service.remove()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user(container: str) -> str:
    done = podman("inspect", "--format", "{{.Config.User}}", container, check=False)
    return done.stdout.decode().strip()


def imports_in(image: str, runtime: list[str], modules: tuple[str, ...]) -> dict[str, bool]:
    """Which of MODULES the image's own python can import (run in the image)."""
    probe = ("import importlib, json, sys\n"
             "found = {}\n"
             "for m in sys.argv[1:]:\n"
             "    try:\n"
             "        importlib.import_module(m); found[m] = True\n"
             "    except ImportError:\n"
             "        found[m] = False\n"
             "print(json.dumps(found))")
    done = podman("run", "--rm", *runtime, "--network", "none", "--read-only", "--entrypoint", "python", image,
                  "-c", probe, *modules, timeout=300)
    return json.loads(done.stdout.decode().strip().splitlines()[-1])
