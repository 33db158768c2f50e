"""Every command that README.md, deploy/README.md and the chart's NOTES.txt show, run
as written, against a real stack, so a newcomer's first commands work.

The commands are read from the documents (shell code blocks; NOTES.txt rendered by
the chart), so this test follows the docs as they change. Each block runs in order,
and servers a block starts (`chorus serve`, `python -m services...`) are stopped at
its end. Four things differ from a reader's machine, and only these:

- The documented ports (50051, 50052, 50053, 8080) are swapped for free ones in each
  command, and CHORUS_GATEWAY / CHORUS_HTTP_PORT point at them, because other stacks
  may run on this machine.
- The services skip their start-up capacity calibration (CHORUS_NO_CALIBRATE=1): it
  measures this machine's speed while other tests load it, which this test does not
  judge; tests/system/test_capacity_stack.py and tests/chorus/test_capacity.py do.
- Commands that need a Kubernetes cluster are checked with the tools that exist here:
  `helm install/upgrade` renders the chart with the same values and validates the
  objects; `kubectl apply -f` validates the files; `kubectl port-forward` to the
  gateway is stood in for by a local stack on the forwarded port, so the commands
  after it run against a real gateway.
- `./scripts/test.sh` is this suite itself and is not run from inside it, and a
  `python -m pytest ...` command names tests this suite runs anyway: it is collected
  (the files exist, import and hold tests) instead of run a second time.

The test prints what ran, what was checked and how, and what could not run and why.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.supervisor import Stack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", "deploy/README.md")
CHART = ROOT / "deploy" / "helm" / "chorus"
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
DOCUMENTED_PORTS = (50051, 50052, 50053, 8080)
KUBE_VERSION = "1.30.0"
SERVER_COMMANDS = re.compile(r"^(chorus serve(?!.*--say)|python -m (services\.\w+|gateway)\b)")


@dataclass
class Command:
    where: str  # file:line
    text: str


def shell_blocks(document: str) -> list[list[Command]]:
    """The commands of each shell code block of a Markdown file: comments dropped,
    continuation lines joined."""
    blocks, current, language, pending, start = [], None, "", "", 0
    for number, line in enumerate((ROOT / document).read_text().splitlines(), start=1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            if current is None:
                current, language = [], fence.group(1)
            else:
                if language in SHELL_BLOCKS and current:
                    blocks.append(current)
                current = None
            continue
        if current is None or language not in SHELL_BLOCKS:
            continue
        text = re.sub(r"\s{2,}#.*$", "", line).strip()
        if not text or text.startswith("#"):
            continue
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        current.append(Command(f"{document}:{start}", pending + text))
        pending = ""
    return blocks


def notes_commands() -> list[list[Command]]:
    """The commands NOTES.txt shows after `helm install`, rendered with the default values."""
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render({}, name="chorus", namespace="chorus", is_install=True)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    return [[Command("NOTES.txt", line.strip()) for line in notes.splitlines()
             if re.match(r"^\s+(kubectl|chorus|helm|curl|python)\b", line)]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Report:
    ran: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


class BlockRunner:
    def __init__(self, ports: dict[int, int], env: dict[str, str], demo_models, work: Path, report: Report):
        self.ports, self.env, self.demo_models, self.work, self.report = ports, env, demo_models, work, report
        self.servers: list[tuple[subprocess.Popen, Path]] = []
        self.stand_ins: list[Stack] = []

    def remap(self, text: str) -> str:
        for documented, actual in self.ports.items():
            text = re.sub(rf"(?<![\d.]){documented}(?!\d)", str(actual), text)
        return text

    def run(self, command: Command) -> None:
        text = command.text
        label = f"{command.where}: {text}"
        words = shlex.split(text)
        started = time.monotonic()
        if text.startswith("./scripts/test.sh"):
            self.report.not_run.append(f"{label} -- the test suite itself, which runs this test")
        elif words[:3] == ["python", "-m", "pytest"]:
            self.collect(self.remap(text), label)
        elif words[0] == "kubectl":
            self.kubectl(words, label)
        elif words[0] == "helm":
            self.helm(words, label)
        elif words[0] == "docker":
            self.report.not_run.append(f"{label} -- no container engine on this machine")
        elif SERVER_COMMANDS.match(text):
            self.start_server(self.remap(text), label)
        else:
            self.shell(self.remap(text), label)
        self.report.seconds[label] = time.monotonic() - started

    def collect(self, text: str, label: str) -> None:
        done = subprocess.run(["bash", "-c", f"{text} --collect-only -p no:cacheprovider"], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{label}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
        collected = re.search(r"(\d+) tests? collected", done.stdout)
        assert collected and int(collected.group(1)) > 0, f"{label}: collected no test\n{done.stdout[-2000:]}"
        self.report.checked.append(f"{label} -- tests this suite runs itself; collected {collected.group(1)} "
                                   "here instead of running them twice")

    def shell(self, text: str, label: str) -> None:
        done = subprocess.run(["bash", "-c", text], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{label}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        self.report.ran.append(label)

    def start_server(self, text: str, label: str) -> None:
        port_flag = re.search(r"--port (\d+)", text)
        port = int(port_flag.group(1)) if port_flag else self.ports[50051]
        log = self.work / f"server-{len(self.servers)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=ROOT, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append((process, log))
        wait_serving(f"127.0.0.1:{port}", process, log)
        self.report.ran.append(f"{label} (a server: ran until its block ended)")

    def kubectl(self, words: list[str], label: str) -> None:
        if "port-forward" in words:
            service = next(w for w in words if w.startswith("svc/"))
            assert service == "svc/chorus-gateway", f"{label}: only the gateway is stood in for"
            forwarded = int(self.remap(words[-1]))
            stack = Stack(calibrate=False, models_dir=self.demo_models.root, slots=2, gateway_port=forwarded,
                          gateway_http_port=None,
                          work_dir=self.work / f"stand-in-{len(self.stand_ins)}")
            stack.start()
            self.stand_ins.append(stack)
            rendered = render_chart({})
            assert "name: chorus-gateway" in rendered and "port: 50051" in rendered
            self.report.checked.append(f"{label} -- needs a cluster; the rendered chart has that Service, and a "
                                       f"local stack stood in on the forwarded port for the commands after it")
        elif "apply" in words:
            target = ROOT / words[words.index("-f") + 1]
            files = sorted(target.glob("*.yaml")) if target.is_dir() else [target]
            validate([f.read_text() for f in files])
            self.report.checked.append(f"{label} -- needs a cluster; kubernetes-validate --strict passed on "
                                       f"{len(files)} files")
        elif words[1:3] == ["create", "namespace"]:
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", words[3])
            self.report.checked.append(f"{label} -- needs a cluster; {words[3]!r} is a valid namespace name")
        else:
            pytest.fail(f"{label}: a kubectl command this test does not know how to check; teach it")

    def helm(self, words: list[str], label: str) -> None:
        verb = words[1]
        assert verb in ("install", "upgrade", "template", "lint"), f"{label}: unknown helm command"
        values = {}
        for i, word in enumerate(words):
            if word == "--set":
                key, _, value = words[i + 1].partition("=")
                set_value(values, key, value)
        chart = ROOT / next(w for w in words[2:] if w.startswith("deploy/"))
        assert chart == CHART
        validate([render_chart(values)])
        self.report.checked.append(f"{label} -- needs a cluster; the chart rendered with these values and "
                                   "passed kubernetes-validate --strict")

    def close(self) -> None:
        for process, _ in reversed(self.servers):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        for stack in self.stand_ins:
            stack.stop()
        self.servers.clear()
        self.stand_ins.clear()


def set_value(values: dict, dotted: str, raw: str) -> None:
    """`--set a.b=c` as Helm reads it: nested keys, true/false and integers typed."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        values = values.setdefault(key, {})
    values[leaf] = {"true": True, "false": False}.get(raw, int(raw) if raw.isdigit() else raw)


def render_chart(values: dict) -> str:
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="chorus", namespace="chorus", is_install=True)
    return "\n---\n".join(text for path, text in rendered.items() if path.endswith(".yaml") and text.strip())


def validate(texts: list[str]) -> None:
    import yaml

    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for text in texts:
        for doc in yaml.safe_load_all(text):
            if doc:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def wait_serving(address: str, process: subprocess.Popen, log: Path, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{address} not SERVING after {limit_s}s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)


def test_every_documented_command_runs_as_written(demo_models, tmp_path, capsys):
    blocks = [block for document in DOCUMENTS for block in shell_blocks(document)] + notes_commands()
    assert sum(map(len, blocks)) > 10, "the command extraction found too little: has the docs' format changed?"
    ports = {documented: free_port() for documented in DOCUMENTED_PORTS}
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(Path(bin_dir).parent), "CHORUS_GATEWAY": f"127.0.0.1:{ports[50051]}",
           "CHORUS_HTTP_PORT": str(ports[8080]), "PYTHONUNBUFFERED": "1", "CHORUS_NO_CALIBRATE": "1"}
    before = {p.name for p in ROOT.iterdir()}
    report = Report()
    try:
        for block in blocks:
            runner = BlockRunner(ports, env, demo_models, tmp_path, report)
            try:
                for command in block:
                    runner.run(command)
            finally:
                runner.close()
    finally:
        for created in {p.name for p in ROOT.iterdir()} - before:  # hello.wav and the like
            if (ROOT / created).is_file():
                (ROOT / created).unlink()
        with capsys.disabled():
            print(f"\n[docs] ports {ports}")
            for title, lines in (("ran", report.ran), ("checked", report.checked), ("not run", report.not_run)):
                print(f"[docs] {title}:", *(f"  {line}" for line in lines), sep="\n")
            print("[docs] seconds:", *(f"  {s:6.1f}  {label}" for label, s in report.seconds.items()), sep="\n")
    assert report.ran and report.checked
