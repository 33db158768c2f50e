"""podman as the image checks drive it: one command runner, an image's config, its
filesystem, and an OCI runtime that works where the default one cannot start a
container.

`podman run` fails in some sandboxes (Firecracker VMs with a locked-down
setrlimit) before the container's process starts: crun and runc both set the
RLIMIT_NOFILE and RLIMIT_NPROC podman puts in the OCI spec, and the kernel refuses
even the values the caller already has. `runtime_args` finds out once, and if so
runs containers through a shim around runc that drops the spec's rlimits, so the
container inherits podman's own. crun is no way out here: it also refuses the
hybrid cgroup layout these VMs mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PODMAN = "podman"

# The shim: podman calls `<runtime> ... create --bundle DIR ...` (the spec is
# DIR/config.json) and, for `podman exec` and health checks, `<runtime> ... exec
# --process FILE ...` (a process spec, which carries rlimits too).
SHIM = """#!{python}
# Written by tools/images/podman.py: runc, less the OCI spec's rlimits (see there why).
import json, os, sys
args = sys.argv[1:]
for i, arg in enumerate(args[:-1]):
    if arg in ("--bundle", "-b", "--process", "-p"):
        path = os.path.join(args[i + 1], "config.json") if arg in ("--bundle", "-b") else args[i + 1]
        with open(path) as f:
            spec = json.load(f)
        (spec.get("process", spec) if arg in ("--bundle", "-b") else spec).pop("rlimits", None)
        with open(path, "w") as f:
            json.dump(spec, f)
os.execv({runc!r}, ["runc", *args])
"""


class PodmanError(RuntimeError):
    pass


def podman(*args: str, timeout: float | None = 600, check: bool = True,
           input: bytes | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([PODMAN, *args], capture_output=True, timeout=timeout, input=input)
    if check and done.returncode != 0:
        raise PodmanError(f"podman {' '.join(args[:4])} ... failed ({done.returncode}): "
                          f"{done.stderr.decode(errors='replace')[-2000:]}")
    return done


def available() -> bool:
    return shutil.which(PODMAN) is not None


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def inspect(ref: str) -> dict:
    return json.loads(podman("image", "inspect", ref).stdout)[0]


def config(ref: str) -> dict:
    """The image's run config: User, WorkingDir, Env, Entrypoint, Cmd, ExposedPorts, Labels."""
    return inspect(ref).get("Config") or {}


def env(ref: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config(ref).get("Env") or [])


@contextlib.contextmanager
def mounted(ref: str):
    """The image's root filesystem, read from the host (root's podman mounts it)."""
    path = Path(podman("image", "mount", ref).stdout.decode().strip())
    try:
        yield path
    finally:
        podman("image", "unmount", ref, check=False)


def resolve_command(root: Path, command: str, path_env: str) -> Path | None:
    """Where COMMAND is in the filesystem at ROOT, searched as the image's PATH would
    (an absolute name as it is); None when it is not there or not executable. Symbolic
    links resolve inside ROOT, not on the host."""
    candidates = [command] if "/" in command else [f"{d.rstrip('/')}/{command}" for d in path_env.split(":") if d]
    for candidate in candidates:
        found = _inside(root, candidate)
        if found is not None and found.is_file() and os.access(found, os.X_OK):
            return found
    return None


def _inside(root: Path, path: str, depth: int = 0) -> Path | None:
    """PATH (absolute, in the image) resolved within ROOT, following links as the image would."""
    if depth > 40:
        return None
    current = root
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        candidate = current / part
        if candidate.is_symlink():
            target = os.readlink(candidate)
            base = "/" if target.startswith("/") else "/" + str(current.relative_to(root))
            rest = "/".join(parts[i + 1:])
            joined = os.path.normpath(os.path.join(base, target, rest))
            return _inside(root, joined, depth + 1)
        if not candidate.exists():
            return None
        current = candidate
    return current


def runtime_args(probe_image: str, work: Path) -> tuple[list[str], str]:
    """The `podman run` flags that start a container here, and how they were found.

    Tries the default runtime first; on the setrlimit refusal, the runc shim."""
    tried = podman("run", "--rm", "--network", "none", probe_image, "true", check=False, timeout=120)
    if tried.returncode == 0:
        return [], "the default OCI runtime"
    reason = tried.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
    runc = shutil.which("runc") or "/usr/sbin/runc"
    if not Path(runc).exists():
        raise PodmanError(f"podman run fails here ({reason[0]}) and runc, which the rlimit shim wraps, is not "
                          "installed (apt-get install runc)")
    shim = work / "runtime" / "runc"  # podman names the runtime after the file: runc
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(SHIM.format(python=sys.executable if Path(sys.executable).exists() else "/usr/bin/python3",
                                runc=runc))
    shim.chmod(0o755)
    args = ["--runtime", str(shim)]
    again = podman("run", "--rm", "--network", "none", *args, probe_image, "true", check=False, timeout=120)
    if again.returncode != 0:
        raise PodmanError(f"podman run fails here with the default runtime ({reason[0]}) and with the rlimit "
                          f"shim ({again.stderr.decode(errors='replace').strip()[-500:]})")
    return args, f"runc through the rlimit shim {shim} (the default runtime said: {reason[0]})"
