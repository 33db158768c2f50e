"""`python -m tools.llama_wheel setup`: what scripts/setup.sh runs inside the venv.

Also `key` (print this machine's cache key for a flavour) for scripts and CI caches
that want to key on the same thing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.llama_wheel import cache as wheel_cache
from tools.llama_wheel.flavours import FLAVOURS, REQUIREMENT, Flavour, by_name
from tools.llama_wheel.provision import ProvisionError, provision
from tools.llama_wheel.smoke import run_smoke, smoke_command

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODELS = ROOT / "models" / "demo"
STAMP = ROOT / ".venv" / ".chorus-install-stamp"


def _pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def build_wheel(flavour: Flavour) -> Path:
    out = Path(tempfile.mkdtemp(prefix="chorus-llama-wheel-"))
    env = {**os.environ, "CMAKE_ARGS": flavour.cmake_env,
           "CMAKE_BUILD_PARALLEL_LEVEL": str(len(os.sched_getaffinity(0)))}
    _pip("wheel", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python", "--wheel-dir", str(out), REQUIREMENT,
         env=env)
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise ProvisionError(f"setup: pip built no llama-cpp-python wheel in {out}")
    return wheels[0]


def install(entry: wheel_cache.Entry) -> None:
    """The entry's wheel into this venv (unless it is already the one installed), then the project."""
    importlib.invalidate_caches()
    installed = wheel_cache.installed_record()
    if installed is None or installed.get("key") != entry.key:
        _pip("install", "--quiet", "--no-deps", "--force-reinstall", str(entry.wheel))
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "scripts" / "setup.sh").read_bytes())
    if STAMP.is_file() and STAMP.read_text().strip() == want.hexdigest():
        return
    _pip("install", "--quiet", "--upgrade", "pip")
    _pip("install", "--quiet", "--find-links", str(entry.folder), "-e", f"{ROOT}[dev]")
    STAMP.write_text(want.hexdigest() + "\n")


def smoke():
    subprocess.run([sys.executable, "-m", "tools.cli", "models", "demo", "--dir", str(DEMO_MODELS)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run_smoke(smoke_command(DEMO_MODELS / "backbone.gguf"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.llama_wheel")
    parser.add_argument("command", choices=("setup", "key"))
    parser.add_argument("--flavour", choices=FLAVOURS, default=os.environ.get("CHORUS_LLAMA_BUILD", "native"),
                        help="llama.cpp build: native (this CPU, AMX off) or portable (AVX2) [CHORUS_LLAMA_BUILD]")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("CHORUS_WHEEL_CACHE", Path.home() / ".cache/chorus/wheels")),
                        help="wheel cache folder [CHORUS_WHEEL_CACHE]")
    args = parser.parse_args(argv)
    try:
        wanted = by_name(args.flavour)
        if args.command == "key":
            print(wanted.key())
            return 0
        flavours = [wanted] if wanted.name == "portable" else [wanted, by_name("portable")]
        done = provision(flavours, wheel_cache.WheelCache(args.cache), build_wheel, install, smoke)
    except RuntimeError as err:  # ProvisionError, or no C compiler to ask about flags
        print(err, file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:
        print(f"setup: {' '.join(map(str, err.cmd[:6]))} ... failed with exit code {err.returncode}; "
              "its output is above", file=sys.stderr)
        return 1
    figures = done.smoke.figures or {}
    print(f"setup: llama.cpp {done.flavour.name} build {done.entry.key} passed its smoke check "
          f"(prompt of {figures.get('prompt_tokens')} tokens {1000 * figures.get('prompt_s', 0):.1f} ms, "
          f"one token {1000 * figures.get('step_s', 0):.1f} ms)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
