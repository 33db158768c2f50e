"""The images from deploy/docker/, built with podman on a chosen base.

Names and tags are what the chart pulls: the repository is each image's
`org.opencontainers.image.title` label, the tag the package version (the chart's
appVersion); podman stores them as localhost/<repository>:<tag>.

The CPU image takes two wheels from the host instead of fetching and compiling them
(the Dockerfile's TORCH_WHEEL and LLAMA_WHEEL, in its `wheels` build context):
llama.cpp's portable wheel from the wheel cache (tools/llama_wheel), only when its
build record has exactly the Dockerfile's CMAKE_ARGS, and PyTorch's CPU wheel as pip
finds it from here. Without them the Dockerfile compiles llama.cpp (over ten
minutes on two cores) and fetches torch itself, as `docker build` always does.

The CUDA image is not built here: its bases are NVIDIA's CUDA images on Docker Hub
(nvidia/cuda) and it compiles llama.cpp's CUDA backend with nvcc.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
NOT_HERE = {"cuda": "its bases are NVIDIA's CUDA images (nvidia/cuda, Docker Hub) and it compiles llama.cpp's "
                    "CUDA backend with nvcc; neither is available on this machine"}


@dataclass(frozen=True)
class Image:
    name: str  # cpu, cuda, gateway: the Dockerfile's stem
    dockerfile: Path
    repository: str

    @property
    def ref(self) -> str:
        return f"localhost/{self.repository}:{VERSION}"

    @property
    def buildable(self) -> bool:
        return self.name not in NOT_HERE


def images() -> dict[str, Image]:
    found = {}
    for path in sorted(DOCKER.glob("*.Dockerfile")):
        title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', path.read_text())
        found[path.name.removesuffix(".Dockerfile")] = Image(path.name.removesuffix(".Dockerfile"), path,
                                                              title.group(1))
    return found


def dockerfile_cmake_args(path: Path) -> list[str]:
    match = re.search(r'^ENV CMAKE_ARGS="([^"]*)"$', path.read_text(), flags=re.M)
    return shlex.split(match.group(1)) if match else []


def _torch_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return next(r for r in extras["codec-worker"] if r.startswith("torch=="))


def prepare_wheels(work: Path, dockerfile: Path, log=print) -> dict[str, str]:
    """Stages the host's wheels for the CPU image under work/wheels; returns the build
    args naming them (none: the Dockerfile fetches and compiles)."""
    from tools.llama_wheel import cache as wheel_cache
    from tools.llama_wheel import flavours

    staged = work / "wheels"
    staged.mkdir(parents=True, exist_ok=True)
    args: dict[str, str] = {}

    root = Path(os.environ.get("CHORUS_WHEEL_CACHE", Path.home() / ".cache/chorus/wheels"))
    entry = wheel_cache.WheelCache(root).entry(flavours.portable().key())
    record, wheel = entry.record or {}, entry.wheel
    if wheel is None or entry.rejection:
        log(f"wheels: no portable llama.cpp wheel under {entry.folder}; the image compiles llama.cpp")
    elif record.get("flavour") != "portable" or record.get("cmake_args") != dockerfile_cmake_args(dockerfile):
        log(f"wheels: {wheel} was built with {record.get('cmake_args')}, not the Dockerfile's CMAKE_ARGS; "
            "the image compiles llama.cpp")
    else:
        target = staged / entry.key / wheel.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(wheel, target)
        # The key is in the argument, so a different wheel never reuses a cached layer.
        args["LLAMA_WHEEL"] = f"{entry.key}/{wheel.name}"
        log(f"wheels: llama.cpp portable {entry.key} from the wheel cache")

    want = _torch_pin() + "+cpu"
    have = sorted(staged.glob(f"torch-{want.split('==')[1]}-*.whl"))
    if not have:
        # pip as configured here (its find-links, proxies, mirrors); the CPU index is
        # where the Dockerfile would fetch the same file from.
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--retries", "1", "--timeout", "30",
                        "--extra-index-url", "https://download.pytorch.org/whl/cpu", "--dest", str(staged), want],
                       capture_output=True, timeout=1800)
        have = sorted(staged.glob(f"torch-{want.split('==')[1]}-*.whl"))
    if have:
        args["TORCH_WHEEL"] = have[0].name
        log(f"wheels: {have[0].name}")
    else:
        log(f"wheels: pip found no {want} from here; the image fetches torch from its index")
    return args


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def build(image: Image, base: str | None, work: Path, wheel_args: dict[str, str] | None = None,
          log=print) -> dict:
    """podman build of IMAGE from the repository root; returns its ref, time and log."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"build-{image.name}.log"
    # The commit's own date, not now: the labels stay the same between builds of one
    # commit, so podman's layer cache holds for the final stage too.
    build_args = {"VERSION": VERSION, "REVISION": _git("rev-parse", "HEAD"),
                  "CREATED": _git("log", "-1", "--format=%cI")}
    if base:
        build_args["PYTHON_IMAGE"] = base
    contexts = []
    if wheel_args:
        build_args.update(wheel_args)
        contexts = ["--build-context", f"wheels={work / 'wheels'}"]
    # chroot isolation: RUN steps need no OCI runtime (see podman.py for why that matters
    # here). Docker format keeps HEALTHCHECK, which OCI image configs cannot hold.
    command = ["build", "--isolation", "chroot", "--format", "docker", "-f", str(image.dockerfile),
               *(a for k, v in build_args.items() for a in ("--build-arg", f"{k}={v}")), *contexts,
               "-t", image.ref, str(ROOT)]
    log(f"build: podman {shlex.join(command)}")
    started = time.monotonic()
    # Written as it goes, so a long build can be followed (tail -f).
    with open(log_path, "wb") as out:
        done = subprocess.run(["podman", *command], stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    seconds = round(time.monotonic() - started, 1)
    result = {"image": image.name, "ref": image.ref, "seconds": seconds, "log": str(log_path),
              "ok": done.returncode == 0, "build_args": dict(build_args)}
    if done.returncode != 0:
        result["error"] = log_path.read_text(errors="replace")[-3000:]
    return result
