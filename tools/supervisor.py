"""Launches and supervises the Chorus services on one machine, each in its own process.

Separate processes, as in production: a token server never shares a GIL or a crash
with a codec worker, and the end-to-end tests exercise the real wire between them.
`Stack` is the one place that knows how to launch, wait for and stop the three
services; `chorus serve`, `chorus bench` and the end-to-end tests use it.

Each child binds port 0 and writes a ready file once SERVING, so nothing races for
a port and nothing polls a socket. Children run in their own session (a Ctrl-C
reaches only this process, which then stops them in order: gateway, token servers,
codec workers, so that in-flight streams drain downstream first) and get SIGTERM if
this process dies without stopping them.

Metrics and traces: `metrics_port` is a base, spread over the services (the gateway
on it, token servers on the next ports, codec workers after them), because one port
cannot serve three processes; CHORUS_METRICS_PORT is therefore never passed down as
it is. `otlp_endpoint` goes to every service. OTEL_SERVICE_NAME is not passed down
either (three services under one name would read as one in every trace view); the
other OTEL_* variables are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chorus.realtime.cpu_budget import cpu_budget, split_for_stack
from tools.llama_wheel.cache import installed_record
from tools.llama_wheel.smoke import describe_death, signal_text

DEFAULT_MODELS_DIR = Path("models/demo")


class StackError(RuntimeError):
    """A service failed to start or died, or there are no models to serve; the message says what to do."""


@dataclass(frozen=True)
class ModelFiles:
    gguf: Path
    snac_dir: Path
    demo: bool  # random demo weights built by Chorus


def locate_models(models_dir: Path, demo: bool = False) -> ModelFiles:
    """The weights to serve from `models_dir`, never writing over a file Chorus did not create.

    A folder holding a GGUF and a SNAC folder (config.json + pytorch_model.bin) is
    served as it is: real weights. Demo models are built (or rebuilt when stale) only
    into a folder that is missing, empty, or was written by the demo builder (its
    manifest says so), and only there even when `demo` asks for them.
    """
    from tools.demo_models.build import MANIFEST, build_demo_models

    root = Path(models_dir)
    entries = sorted(root.iterdir()) if root.is_dir() else []
    if root.exists() and not root.is_dir():
        raise StackError(f"--models {root} is a file; it must be a folder")
    if not entries or (root / MANIFEST).is_file():
        built = build_demo_models(root)
        return ModelFiles(built.gguf, built.snac_dir, demo=True)
    if demo:
        raise StackError(
            f"refusing to build demo models into {root}: it holds files Chorus did not create "
            f"({', '.join(e.name for e in entries[:5])}{', ...' if len(entries) > 5 else ''}); "
            "name a new or empty folder"
        )
    ggufs = [e for e in entries if e.suffix == ".gguf" and e.is_file()]
    snacs = [e for e in entries if e.is_dir() and (e / "config.json").is_file() and (e / "pytorch_model.bin").is_file()]
    if len(ggufs) == 1 and len(snacs) == 1:
        return ModelFiles(ggufs[0], snacs[0], demo=False)
    raise StackError(
        f"{root} does not hold one model set: it needs exactly one backbone .gguf (found {len(ggufs)}) and "
        f"one SNAC folder with config.json and pytorch_model.bin (found {len(snacs)}). Point --models at such "
        "a folder, or at a new or empty one for the demo models (--demo-models)"
    )


def _names(label: str, count: int) -> list[str]:
    return [f"{label} {i}" if count > 1 else label for i in range(count)]


def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: stop() still stops the children


# Looked up here, not in the child: between fork and exec only async-signal-safe
# work is safe, and an import could wait on a lock another thread held at fork.
_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launching process goes away."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ServiceProcess:
    """One launched service: its process, its log, and once ready its address."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_file: Path
    address: str | None = None
    # Everything the ready file said: the gRPC address, and other listeners ("http").
    ready: dict = field(default_factory=dict)
    # How it was launched, so that Stack.restart can launch it again.
    module: str = ""
    args: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if not self.alive:
                raise StackError(
                    f"{self.exit_reason(' before it was ready')} The end of its log ({self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop(grace_s=2)
                raise StackError(
                    f"{self.name} was not ready after {timeout_s:.0f}s; the end of its log ({self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)
        self.ready = json.loads(self.ready_file.read_text())
        self.address = self.ready["address"]
        return self.address

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (the services drain), then SIGKILL after `grace_s`."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def exit_reason(self, when: str = "") -> str:
        """How the process ended (a sentence), and for a native crash, in which library and why."""
        code = self.popen.returncode
        if code is None or code >= 0:
            return f"{self.name} exited with code {code}{when}."
        sig = signal.Signals(-code)
        tail = self.log_tail(80)
        # The services enable faulthandler, so a crash leaves the Python frame it
        # happened under: llama.cpp's calls all go through llama_backend.py.
        if "llama_backend.py" in tail or "llama_cpp" in tail:
            return describe_death(f"{self.name} (in llama.cpp)", sig, installed_record(), when) + (
                " Run ./scripts/setup.sh, which smoke-checks the library and rebuilds it for this CPU, or "
                "`chorus doctor` for a report."
            )
        where = " (in torch)" if "torch" in tail else ""
        return f"{self.name}{where} died of {signal_text(sig)}{when}."

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` of the log, or after a native crash faulthandler's dump from
        its start (at most 80 lines): its first frames say where the process died, and
        a dump of many threads pushed them out of a fixed tail."""
        try:
            logged = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        dumps = [i for i, line in enumerate(logged) if line.startswith("Fatal Python error")]
        if dumps:
            return "\n".join(logged[dumps[-1] : dumps[-1] + 80])
        return "\n".join(logged[-lines:])


def serves_neutts_by_default(models_dir: Path, demo_models: bool = False) -> bool:
    """Whether `chorus serve` serves the NeuTTS-Air family unless told otherwise: when
    MODELS/neutts is there (built before, or weights put there), or when MODELS holds
    or will hold demo models (the NeuTTS demo is then built beside them). A folder of
    real Orpheus weights alone serves Orpheus only: there is nothing to serve NeuTTS
    from, and demo models are never written beside weights Chorus did not create."""
    from tools.demo_models.build import MANIFEST as ORPHEUS_DEMO_MANIFEST

    models_dir = Path(models_dir)
    if (models_dir / "neutts").exists() or demo_models:
        return True
    if not models_dir.is_dir() or not any(models_dir.iterdir()):
        return True
    return (models_dir / ORPHEUS_DEMO_MANIFEST).is_file()


@dataclass
class Stack:
    """Codec workers, token servers and a gateway on loopback; use as a context manager."""

    models_dir: Path = DEFAULT_MODELS_DIR
    # Ask for demo models: refused where the folder holds files Chorus did not create.
    demo_models: bool = False
    # None: the token server's default (enough that real-time capacity decides).
    slots: int | None = None
    token_servers: int = 1
    codec_workers: int = 1
    # Compute threads per token server / codec worker; None: this machine's CPU budget
    # divided between them (chorus.realtime.cpu_budget.split_for_stack), never each taking all.
    llama_threads: int | None = None
    torch_threads: int | None = None
    # The codec workers' --decoder-precision (auto, fp32, bf16); None: their default (auto).
    decoder_precision: str | None = None
    # Measure step times at start (token servers and codec workers); False passes
    # --no-calibrate: capacity starts at the limits and is learned from live steps, for
    # stacks that do not measure capacity (most tests) and so start seconds sooner.
    calibrate: bool = True
    gateway_port: int = 0
    # The gateway's HTTP port (OpenAI endpoint, browser page); 0 picks one, None: off.
    gateway_http_port: int | None = 0
    start_timeout_s: float = 180.0
    stop_grace_s: float = 10.0
    log_level: str = "INFO"
    # Extra flags per service, e.g. {"token_server": ["--pace-lead", "1"]}.
    extra_args: Mapping[str, list[str]] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    # Prometheus /metrics: the gateway on this port, token server i on +1+i, codec worker
    # j on +1+token_servers+j (see metrics_addresses); None: none (CHORUS_METRICS_PORT
    # is not passed down: it would give every service the same port).
    metrics_port: int | None = None
    # OTLP/gRPC trace receiver (host:port) for every service; None: what the environment says.
    otlp_endpoint: str | None = None
    # Logs and ready files go here; a temporary folder (removed on stop) when None.
    work_dir: Path | None = None
    # Also serve the NeuTTS-Air family from `<models_dir>/neutts` (demo models built
    # there when it is missing or the builder's): a NeuCodec worker, a NeuTTS token
    # server and the voice store, which the gateway routes registered voices to.
    neutts: bool = False
    # Where the NeuTTS-Air family's voices live (registered through the gateway, read by
    # its token server); None: the demo models' own voices folder. A folder that does
    # not exist yet starts as a copy of the demo's, so the demo voice is there too.
    voice_store: Path | None = None
    on_progress: Callable[[str], None] = lambda message: None
    # Children get SIGTERM when this process dies. That takes a fork with Python code
    # before exec, which can crash in a child forked while gRPC threads of this
    # process are busy (the soak restarts services under load): such callers turn it off.
    die_with_parent: bool = True

    CODEC_WORKER = "services.codec_worker"
    TOKEN_SERVER = "services.token_server"
    GATEWAY = "gateway"

    def __post_init__(self) -> None:
        self.models_dir = Path(self.models_dir)
        # The NeuTTS-Air pair computes too: a token server and a codec worker more.
        share = split_for_stack(cpu_budget(), self.token_servers + self.neutts, self.codec_workers + self.neutts)
        self.llama_threads = self.llama_threads or share.llama
        self.torch_threads = self.torch_threads or share.torch
        self.codec_worker_processes: list[ServiceProcess] = []
        self.token_server_processes: list[ServiceProcess] = []
        self.neutts_processes: list[ServiceProcess] = []  # its codec worker, then its token server
        self.neutts_voice_store: Path | None = None  # where the NeuTTS-Air family's voices are, once started
        self.gateway_process: ServiceProcess | None = None
        self._launched: list[ServiceProcess] = []  # in launch order, stopped in reverse
        self._own_work_dir = self.work_dir is None
        self._keep_logs = False

    @property
    def gateway_address(self) -> str:
        if self.gateway_process is None or self.gateway_process.address is None:
            raise StackError("the stack is not started")
        return self.gateway_process.address

    @property
    def gateway_http_address(self) -> str | None:
        """host:port of the gateway's HTTP port, None when it has none."""
        self.gateway_address  # raises when not started
        return self.gateway_process.ready.get("http")

    @property
    def metrics_addresses(self) -> dict[str, str]:
        """Where each service serves /metrics, by service name ("gateway", "token
        server", "codec worker 1"...); empty without `metrics_port`."""
        if not self.metrics_port:
            return {}
        names = ["gateway", *_names("token server", self.token_servers), *_names("codec worker", self.codec_workers),
                 *(["NeuCodec worker", "NeuTTS token server"] if self.neutts else [])]
        return {name: f"127.0.0.1:{self.metrics_port + i}" for i, name in enumerate(names)}

    def _first_metrics_port(self, key: str) -> int | None:
        after = 1 + self.token_servers + self.codec_workers  # the NeuTTS-Air pair comes last
        offsets = {"gateway": 0, "token_server": 1, "codec_worker": 1 + self.token_servers,
                   "neutts_codec_worker": after, "neutts_token_server": after + 1}
        return self.metrics_port + offsets[key] if self.metrics_port else None

    def _calibration_args(self) -> list[str]:
        return [] if self.calibrate else ["--no-calibrate"]

    def _common_args(self) -> list[str]:
        return ["--otlp-endpoint", self.otlp_endpoint] if self.otlp_endpoint else []

    def start(self) -> Stack:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="chorus-stack-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            models = self._models()
            self.codec_worker_processes = self._launch_all(
                "codec worker", self.CODEC_WORKER, self.codec_workers,
                ["--model-dir", str(models.snac_dir), "--torch-threads", str(self.torch_threads),
                 *(["--decoder-precision", self.decoder_precision] if self.decoder_precision else []),
                 *self._calibration_args()], "codec_worker",
            )
            codec_addresses = ",".join(p.address for p in self.codec_worker_processes)
            self.token_server_processes = self._launch_all(
                "token server", self.TOKEN_SERVER, self.token_servers,
                ["--model", str(models.gguf), "--codec-workers", codec_addresses,
                 "--llama-threads", str(self.llama_threads), *(["--slots", str(self.slots)] if self.slots else []),
                 *self._calibration_args()],
                "token_server",
            )
            gateway_args = []
            if self.neutts:
                voices = self._launch_neutts()
                gateway_args = ["--voice-store", str(voices)]
            token_addresses = ",".join(p.address for p in [*self.token_server_processes, *self.neutts_processes[1:]])
            http = "off" if self.gateway_http_port is None else str(self.gateway_http_port)
            [self.gateway_process] = self._launch_all(
                "gateway", self.GATEWAY, 1, ["--token-servers", token_addresses, "--http-port", http, *gateway_args],
                "gateway", port=self.gateway_port,
            )
        except BaseException as err:
            self._keep_logs = isinstance(err, StackError)
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops every service, front to back (gateway first), so streams drain downstream first.

        The logs go with the temporary folder, unless a service failed."""
        for process in reversed(self._launched):
            process.stop(self.stop_grace_s)
        if self._own_work_dir and self.work_dir is not None and not self._keep_logs:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def check_alive(self) -> None:
        """Raises StackError for the first service that died (its log is then kept)."""
        for process in self._launched:
            if not process.alive:
                self._keep_logs = True
                raise StackError(
                    f"{process.exit_reason()} The end of its log ({process.log_path}):\n{process.log_tail()}"
                )

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _models(self) -> ModelFiles:
        models = locate_models(self.models_dir, self.demo_models)
        kind = "demo models (random weights)" if models.demo else "weights"
        self.on_progress(f"{kind}: {models.gguf} and {models.snac_dir}")
        return models

    def _launch_neutts(self) -> Path:
        """The NeuTTS-Air pair (a NeuCodec worker, a token server reading the voice
        store); returns the voice store."""
        from tools.demo_models.build import MANIFEST as ORPHEUS_DEMO_MANIFEST
        from tools.demo_models.neutts_demo import MANIFEST, NeuTtsDemo, build_neutts_demo

        root = self.models_dir / "neutts"
        demo = NeuTtsDemo(root)
        # Demo models go only beside demo models, or over a folder this builder wrote.
        if (root / MANIFEST).is_file() or (not root.exists() and (self.models_dir / ORPHEUS_DEMO_MANIFEST).is_file()):
            self.on_progress(f"NeuTTS-Air demo models (random weights): {root}")
            demo = build_neutts_demo(root)
        elif not (demo.gguf.is_file() and demo.neucodec_dir.is_dir()):
            raise StackError(f"{root} must hold backbone.gguf, neucodec/ and voices/ for the NeuTTS-Air family")
        voices = demo.voices
        if self.voice_store is not None:
            voices = Path(self.voice_store)
            if not voices.exists() and demo.voices.is_dir():
                shutil.copytree(demo.voices, voices)
        [worker] = self._launch_all(
            "NeuCodec worker", self.CODEC_WORKER, 1,
            ["--model-dir", str(demo.neucodec_dir), "--codec", "neucodec_24khz",
             "--torch-threads", str(self.torch_threads), *self._calibration_args()], "neutts_codec_worker",
        )
        [server] = self._launch_all(
            "NeuTTS token server", self.TOKEN_SERVER, 1,
            ["--model", str(demo.gguf), "--codec-workers", worker.address, "--voice-store", str(voices),
             "--llama-threads", str(self.llama_threads), *(["--slots", str(self.slots)] if self.slots else []),
             *self._calibration_args()], "neutts_token_server",
        )
        self.neutts_processes = [worker, server]
        self.neutts_voice_store = voices
        return voices

    def _launch_all(self, label: str, module: str, count: int, args: list[str], key: str, port: int = 0):
        """Starts `count` instances at once (they load models in parallel), then waits for each.
        Each gets its own metrics port; flags in `extra_args` come last, so they win."""
        first_metrics = self._first_metrics_port(key)
        processes = []
        for i, name in enumerate(_names(label, count)):
            metrics = ["--metrics-port", str(first_metrics + i)] if first_metrics else []
            processes.append(self._launch(name, module, [*args, *self._common_args(), *metrics,
                                                         *self.extra_args.get(key.removeprefix("neutts_"), [])], port))
        self._launched += processes  # stopped even if one of them fails to start
        for process in processes:
            process.wait_ready(self.start_timeout_s)
            self.on_progress(f"{process.name} ready at {process.address}")
        return processes

    def _launch(self, name: str, module: str, args: list[str], port: int) -> ServiceProcess:
        slug = name.replace(" ", "-")
        ready_file = self.work_dir / f"{slug}.ready.json"
        log_path = self.work_dir / f"{slug}.log"
        ready_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", module, *args, "--port", str(port),
                   "--ready-file", str(ready_file), "--log-level", self.log_level]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        # One port or one service name for every service: never (module docstring).
        env.pop("CHORUS_METRICS_PORT", None)
        env.pop("OTEL_SERVICE_NAME", None)
        with open(log_path, "ab") as log:  # a restart appends to the log of the killed process
            popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        return ServiceProcess(name, popen, log_path, ready_file, module=module, args=list(args))

    def kill(self, process: ServiceProcess) -> None:
        """SIGKILL, as a crash or an OOM kill would end it: no drain, nothing flushed."""
        process.popen.kill()
        process.popen.wait()

    def restart(self, process: ServiceProcess) -> ServiceProcess:
        """Launches a stopped or killed service again on the port it had, so that its
        peers find it where they were told to look; the others keep running."""
        if process.alive:
            raise StackError(f"{process.name} is still running")
        port = int(process.address.rpartition(":")[2])
        fresh = self._launch(process.name, process.module, process.args, port)
        for group in (self._launched, self.codec_worker_processes, self.token_server_processes, self.neutts_processes):
            if process in group:
                group[group.index(process)] = fresh
        if self.gateway_process is process:
            self.gateway_process = fresh
        fresh.wait_ready(self.start_timeout_s)
        self.on_progress(f"{fresh.name} ready again at {fresh.address}")
        return fresh
