"""`chorus doctor`: everything a bug report needs, in one command that survives what it finds.

Why it exists: many failures of a serving machine are not in Chorus's code but under
it. A llama.cpp build compiled for another CPU dies of SIGILL on its first decode (or a
hypervisor advertises AMX or AVX-512 and faults on it); a pod sees 64 cores but may use
2; torch runs with another thread count or MKL numeric mode than the one measured; the
models are not the ones meant. "It crashed" is not enough to tell these apart, and
asking for each fact in turn costs a round trip per fact. This prints them all: the CPU
and the ISA flags it advertises, cores and cgroup quota (as chorus/realtime/cpu_budget.py sees
them), llama.cpp's version, build record and system info, torch's version, threads and
numeric mode, GPUs, the models found, and whether a one-step backbone decode and a
one-frame SNAC decode run, with their times.

Why it is built this way: the facts most worth reporting are the ones that crash the
process that looks for them. So this process never imports torch or llama.cpp; each
check runs in a child process (`python -m tools.doctor llama|snac PATH`) under a
timeout, and writes what it learns as it learns it, one JSON line at a time, flushed.
A child that dies of a signal is reported ("died of SIGILL (illegal instruction)
during: single-token decode") together with everything it said before dying, its
stderr's last lines and Python's faulthandler trace. Doctor only reads: it never builds
demo models (unlike `chorus serve`), writes no file, and its children drop no core
files. The CPU facts, the build record and the account of a llama.cpp crash are
tools/llama_wheel's, which builds that library and smoke-checks it, so that setup and
doctor describe a machine in the same words.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from chorus.realtime.cpu_budget import cpu_budget, split_for_stack
from tools.demo_models.build import MANIFEST, DemoModels
from tools.llama_wheel import cpu
from tools.llama_wheel.cache import RECORD_NAME, installed_record
from tools.llama_wheel.smoke import describe_death, signal_text
from tools.supervisor import DEFAULT_MODELS_DIR, ModelFiles, StackError, locate_models

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 120.0

FLAGS_NOTE = "advertised by the CPU, or by a hypervisor, which may advertise AMX or AVX-512 and fault on it"

NO_BUILD_RECORD = "no build record (not built by scripts/setup.sh)"

# A child's facts: one line each, this prefix then a JSON object; anything else on
# its stdout (library chatter) is ignored.
FACT_PREFIX = "@doctor "
REPORT_WIDTH = 110

STDERR_TAIL_LINES = 15


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(
        name, help=help_text,
        description="Print what a bug report needs: CPU, cores and quota, llama.cpp and torch builds, GPUs, "
                    "models, and whether a one-step backbone decode and a one-frame SNAC decode run. "
                    "Builds and writes nothing; exits 1 unless both checks pass.",
    )
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR,
                   help=f"weights folder, as `chorus serve --models` reads it (default {DEFAULT_MODELS_DIR}); "
                        "doctor never builds models into it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds each check may run before it counts as hung (default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(func=run_doctor)


def _positive_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return seconds


def run_doctor(args: argparse.Namespace) -> int:
    report = gather(args.models, args.timeout)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def gather(models_dir: Path, timeout_s: float) -> dict:
    models = models_info(Path(models_dir))
    llama = run_child(["-m", "tools.doctor", "llama", models.get("gguf", "")], timeout_s)
    snac = run_child(["-m", "tools.doctor", "snac", models.get("snac_dir", "")], timeout_s)
    llama_found, snac_found = llama.pop("info", {}), snac.pop("info", {})
    install = llama_cpp_install()
    if "signal" in llama:
        # Which library, built for what, on which CPU, and the flags to suspect.
        llama["diagnosis"] = describe_death("the llama check", signal.Signals[llama["signal"]], install["build_record"])
    return {
        "system": system_info(),
        "cpu": cpu_info(),
        "cores": cores_info(),
        "llama_cpp": {**install, **llama_found, "cpu_variant": cpu_variant(install.get("build_record"), llama_found)},
        "torch": {"version": _dist_version("torch"), **snac_found.get("torch", {})},
        "gpu": {**snac_found.get("gpu", {}), "nvidia_smi": nvidia_smi()},
        "models": models,
        "checks": {"llama": llama, "snac": snac},
        "ok": bool(llama["ok"] and snac["ok"]),
    }


# --- facts this process reads itself ------------------------------------------------


def _dist_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def system_info() -> dict:
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "chorus": _dist_version("chorus-tts"),
    }


def cpu_info() -> dict:
    """Model, vendor and the ISA flags that matter (tools/llama_wheel/cpu.py's list), as
    /proc/cpuinfo advertises them."""
    advertised = {cpu.same_feature(flag) for flag in cpu.cpu_flags()}
    return {
        "model": cpu.cpu_model(),
        "vendor": cpu.cpu_vendor(),
        "machine": platform.machine(),
        "source": str(cpu.CPUINFO) if cpu.CPUINFO.is_file() else f"{cpu.CPUINFO} unreadable",
        "flags": [f for f in cpu.RELEVANT_FLAGS if cpu.same_feature(f) in advertised],
        "flags_absent": [f for f in cpu.RELEVANT_FLAGS if cpu.same_feature(f) not in advertised],
        "flags_note": FLAGS_NOTE,
    }


def cores_info() -> dict:
    budget = cpu_budget()
    share = split_for_stack(budget)
    return {
        "cpu_count": os.cpu_count(),
        "affinity": budget.affinity,
        "cgroup_quota": budget.quota,
        "budget_cpus": budget.cpus,
        "compute_threads": budget.threads,
        "serve_split": {"llama": share.llama, "torch": share.torch},
    }


def llama_cpp_install() -> dict:
    """Version, package folder and build record, found without importing llama_cpp."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        spec = None
    package = next(iter(spec.submodule_search_locations or []), None) if spec else None
    record = installed_record()
    return {
        "version": _dist_version("llama-cpp-python"),
        "package": package,
        "build_record": record,
        "build_record_note": None if record else
        NO_BUILD_RECORD if package else "llama_cpp is not installed",
        "build_record_file": str(Path(package) / "lib" / RECORD_NAME) if package else None,
    }


def cpu_variant(record: dict | None, found: dict) -> str | None:
    """The CPU backend this build links (one): the build record's flavour and the
    instruction sets it was compiled for, else the CPU features llama.cpp's system
    info lists."""
    if record:
        features = record.get("features") or record.get("instruction_sets") or "no instruction sets recorded"
        return f"{record.get('flavour', 'unknown flavour')} build for {_text(features)}"
    features = cpu_features_of(found.get("system_info") or "")
    return f"from system info: {' '.join(features)}" if features else None


def cpu_features_of(system_info: str) -> list[str]:
    """'CPU : SSE3 = 1 | AVX = 1 | ... | CUDA : ARCHS = 890 |' -> ['SSE3', 'AVX', ...]."""
    features, in_cpu = [], False
    for item in system_info.split("|"):
        name, _, value = item.partition("=")
        if ":" in name:
            backend, _, name = name.partition(":")
            in_cpu = backend.strip() == "CPU"
        if in_cpu and value.strip() == "1":
            features.append(name.strip())
    return features


def nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi -L failed: {err}"
    return (done.stdout.strip() or done.stderr.strip() or f"nvidia-smi -L exited with code {done.returncode}")


def models_info(root: Path) -> dict:
    """The model set `chorus serve --models root` would serve, without building one."""
    info: dict = {"dir": str(root)}
    builds = f"`chorus models demo --dir {root}` builds the demo models there; doctor builds nothing"
    try:
        empty = root.is_dir() and not any(root.iterdir())
    except OSError as err:
        info["error"] = f"cannot read {root}: {err}"
        return info
    if not root.exists():
        info["error"] = f"no models: {root} does not exist ({builds})"
        return info
    if empty:
        info["error"] = f"no models: {root} is empty ({builds})"
        return info
    if (root / MANIFEST).is_file():
        # locate_models would (re)build here; read what the builder left instead.
        demo = DemoModels(root)
        files = ModelFiles(demo.gguf, demo.snac_dir, demo=True)
        try:
            seed = int(json.loads((root / MANIFEST).read_text()).get("seed", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            seed = 0
        if not demo.is_built(seed):
            info["note"] = "demo models from another builder version, or incomplete: `chorus serve` would rebuild them"
    else:
        try:
            files = locate_models(root)
        except StackError as err:
            info["error"] = f"no models: {err}"
            return info
    info["demo"] = files.demo
    missing = [p for p in (files.gguf, files.snac_dir / "config.json", files.snac_dir / "pytorch_model.bin")
               if not p.is_file()]
    if missing:
        info["error"] = f"no models: {', '.join(map(str, missing))} missing ({builds})"
        return info
    info.update(
        gguf=str(files.gguf), gguf_bytes=files.gguf.stat().st_size,
        snac_dir=str(files.snac_dir), snac_weights_bytes=(files.snac_dir / "pytorch_model.bin").stat().st_size,
    )
    return info


# --- the checks' children -----------------------------------------------------------


def _no_core_files() -> None:
    """In a check's child before exec: a crash reports, it does not write a core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_child(args: list[str], timeout_s: float) -> dict:
    """Runs `python ARGS` (a check) and returns its result; a crash or a hang is a result."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONFAULTHANDLER="1")
    try:
        done = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, env=env,
            stdin=subprocess.DEVNULL, preexec_fn=_no_core_files,
        )
    except subprocess.TimeoutExpired as err:
        return interpret_child(None, _decoded(err.stdout), _decoded(err.stderr), timeout_s)
    return interpret_child(done.returncode, done.stdout, done.stderr, timeout_s)


def _decoded(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def interpret_child(returncode: int | None, stdout: str, stderr: str, timeout_s: float) -> dict:
    """A check's result from its child's exit (None: killed at the timeout) and output:
    ok, what it measured, and where and how it failed."""
    facts: dict = {}
    for line in stdout.splitlines():
        if line.startswith(FACT_PREFIX):
            try:
                facts.update(json.loads(line[len(FACT_PREFIX):]))
            except ValueError:
                continue
    stage = facts.pop("stage", None)
    result = {"ok": False, **facts}
    stderr_lines = [line for line in stderr.splitlines() if line.strip()]
    if returncode is None:
        error = f"did not finish in {timeout_s:g} s (killed)"
    elif returncode < 0:
        try:
            died_of = signal.Signals(-returncode)
        except ValueError:
            error = f"died of signal {-returncode}"
        else:
            error = f"died of {signal_text(died_of)}"
            result["signal"] = died_of.name
    elif returncode != 0:
        error = f"exited with code {returncode}"
    else:
        return result
    if stage and stage != "done":
        error += f" during: {stage}"
    if returncode is not None and returncode > 0 and stderr_lines:
        error += f" ({stderr_lines[-1].strip()})"  # the exception, for a Python error
    result["error"] = error
    result["stderr_tail"] = stderr_lines[-STDERR_TAIL_LINES:]
    return result


def _emit(**facts) -> None:
    print(FACT_PREFIX + json.dumps(facts), flush=True)


def _child_llama(gguf: str) -> None:
    _emit(stage="importing llama_cpp")
    import llama_cpp

    system = llama_cpp.llama_print_system_info()
    _emit(info={
        "module_version": llama_cpp.__version__,
        "system_info": (system.decode(errors="replace") if isinstance(system, bytes) else str(system)).strip(),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    })
    if not gguf:
        _emit(stage="done", skipped="no backbone .gguf to decode with")
        return
    from tools.llama_wheel.smoke import decode_once

    figures = decode_once(Path(gguf), threads=1, stage=lambda name: _emit(stage=name))
    _emit(**figures, ok=figures["finite_logits"], stage="done")


def _decoder_precision() -> str | None:
    """What a codec worker's `--decoder-precision auto` picks here, and the bf16 kernels
    it would run: a pool whose nodes differ here splits into failover groups."""
    try:
        from services.codec_worker import precision
    except ImportError:
        return None
    chosen = precision.resolve("auto")
    return f"{chosen} (bf16 kernels: {precision.bf16_kernels()})" if chosen == "bf16" else chosen


def _child_snac(snac_dir: str) -> None:
    _emit(stage="importing torch")
    try:
        has_numeric_mode = importlib.util.find_spec("services.codec_worker.numeric_mode") is not None
    except ImportError:
        has_numeric_mode = False
    # Imported before torch, as a codec worker would: it may set MKL's mode.
    numeric_mode = importlib.import_module("services.codec_worker.numeric_mode") if has_numeric_mode else None
    import torch

    current = getattr(numeric_mode, "current", None)
    cuda = torch.cuda.is_available()
    _emit(info={
        "torch": {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": torch.backends.mkl.is_available(),
            "numeric_mode": str(current()) if callable(current) else os.environ.get("MKL_CBWR"),
            "numeric_mode_source": "services.codec_worker.numeric_mode" if callable(current) else "MKL_CBWR",
            "decoder_precision": _decoder_precision(),
        },
        "gpu": {
            "cuda_available": cuda,
            "torch_cuda": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        },
    })
    if not snac_dir:
        _emit(stage="done", skipped="no SNAC folder to decode with")
        return
    import numpy as np

    from chorus.speech.orpheus import CODEBOOK_SIZE, CODES_PER_FRAME
    from services.codec_worker.model import load_snac
    from services.codec_worker.streaming_decoder import StreamingSnacDecoder

    torch.set_num_threads(1)
    _emit(stage="loading SNAC")
    start = time.perf_counter()
    decoder = StreamingSnacDecoder(load_snac(snac_dir, device="cpu").model)
    _emit(load_s=time.perf_counter() - start, threads=1, stage="one-frame decode")
    frame = np.random.default_rng(0).integers(0, CODEBOOK_SIZE, (1, CODES_PER_FRAME))
    start = time.perf_counter()
    state = decoder.new_stream()
    chunks = [*decoder.decode([(state, frame)]), decoder.flush(state)]
    seconds = time.perf_counter() - start
    samples = sum(len(chunk.samples) for chunk in chunks if chunk is not None)
    _emit(decode_s=seconds, samples=samples, ok=samples > 0, stage="done")


CHILDREN = {"llama": _child_llama, "snac": _child_snac}


# --- the readable report ------------------------------------------------------------


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


def _numeric_mode(torch: dict) -> str:
    source = torch.get("numeric_mode_source")
    if source is None:
        return "- (not reported by the check)"
    mode = torch.get("numeric_mode")
    return f"{mode} ({source})" if mode is not None else f"{source} unset (MKL picks per CPU)"


def _check_line(name: str, check: dict) -> str:
    if check.get("ok"):
        if name == "llama":
            return (f"ok: one-step decode {check['step_s']:.4f} s (prompt of {check['prompt_tokens']} tokens "
                    f"{check['prompt_s']:.4f} s, load {check['load_s']:.2f} s, {check['threads']} thread)")
        return (f"ok: one frame decoded and flushed in {check['decode_s']:.4f} s, {check['samples']} samples "
                f"(load {check['load_s']:.2f} s, {check['threads']} torch thread)")
    if "skipped" in check:
        return f"not run: {check['skipped']}"
    lines = [f"FAILED: {check.get('error', 'no result')}"]
    if check.get("diagnosis"):
        lines.append(check["diagnosis"])
    lines += [f"| {line}" for line in check.get("stderr_tail", [])]
    return "\n".join(lines)


def _sections(report: dict) -> list[tuple[str, list[tuple[str, object]]]]:
    cpu, cores, llama, torch, gpu, models = (
        report[k] for k in ("cpu", "cores", "llama_cpp", "torch", "gpu", "models"))
    quota = cores["cgroup_quota"]
    split = cores["serve_split"]
    record = llama.get("build_record")
    shown_in_variant = {"flavour", "features", "instruction_sets"}
    record_rows = ([(f"build {key}", value) for key, value in record.items() if key not in shown_in_variant]
                   if record else [("build record", llama.get("build_record_note"))])
    system_info = llama.get("system_info")
    model_rows = [("dir", models["dir"])]
    if "error" in models:
        model_rows.append(("error", models["error"]))
    else:
        model_rows += [
            ("kind", "demo (random weights built by Chorus)" if models["demo"] else "as found (not built by Chorus)"),
            ("backbone", f"{models['gguf']} ({_size(models['gguf_bytes'])})"),
            ("snac", f"{models['snac_dir']} (weights {_size(models['snac_weights_bytes'])})"),
        ]
    if "note" in models:
        model_rows.append(("note", models["note"]))
    return [
        ("system", list(report["system"].items())),
        ("cpu", [
            ("model", cpu["model"]), ("vendor", cpu["vendor"]), ("machine", cpu["machine"]),
            ("ISA flags", cpu["flags"]), ("absent", cpu["flags_absent"]), ("note", cpu["flags_note"]),
        ] + ([("source", cpu["source"])] if "unreadable" in cpu["source"] else [])),
        ("cores", [
            ("os.cpu_count", cores["cpu_count"]), ("affinity", cores["affinity"]),
            ("cgroup quota", "none" if quota is None else f"{quota:g} CPUs"),
            ("budget", f"{cores['budget_cpus']:g} CPUs, {cores['compute_threads']} compute threads"),
            ("serve split", f"{split['llama']} llama + {split['torch']} torch threads"),
        ]),
        ("llama.cpp", [
            ("version", llama.get("version")), ("package", llama.get("package")), *record_rows,
            ("CPU variant", llama.get("cpu_variant")), ("GPU offload", llama.get("gpu_offload")),
            ("system info", system_info or "- (not reported by the check)"),
        ]),
        ("torch", [
            ("version", torch.get("version")), ("default threads", torch.get("threads")),
            ("CPU capability", torch.get("cpu_capability")), ("MKL", torch.get("mkl")),
            ("numeric mode", _numeric_mode(torch)),
            ("decoder precision (auto)", _text(torch.get("decoder_precision"))),
        ]),
        ("gpu", [
            ("CUDA available", gpu.get("cuda_available")), ("torch CUDA", gpu.get("torch_cuda")),
            ("devices", gpu.get("devices")),
            ("nvidia-smi -L", gpu["nvidia_smi"] if gpu["nvidia_smi"] is not None else "no nvidia-smi on PATH"),
        ]),
        ("models", model_rows),
        ("checks", [(name, _check_line(name, check)) for name, check in report["checks"].items()]),
    ]


def format_report(report: dict) -> str:
    out = ["chorus doctor (paste all of this into a bug report)", ""]
    for title, rows in _sections(report):
        out.append(title)
        width = max(len(key) for key, _ in rows) + 1
        for key, value in rows:
            # Long values (system info, instruction sets, a diagnosis) wrap under themselves;
            # a child's stderr ("| " lines) stays as it was written.
            lines = [part for line in _text(value).splitlines()
                     for part in ([line] if line.startswith("| ") else textwrap.wrap(
                         line, max(40, REPORT_WIDTH - width - 3), break_on_hyphens=False) or [""])]
            first, *rest = lines or [""]
            out.append(f"  {key + ':':<{width}} {first}")
            out += [f"  {'':<{width}} {line}" for line in rest]
        out.append("")
    failed = [name for name, check in report["checks"].items() if not check.get("ok")]
    out.append("result: both checks passed" if not failed else
               f"result: FAILED ({' and '.join(failed)} check{'s' if len(failed) > 1 else ''})")
    return "\n".join(out)


if __name__ == "__main__":
    # A check's child: python -m tools.doctor llama|snac PATH (PATH may be empty).
    CHILDREN[sys.argv[1]](sys.argv[2] if len(sys.argv) > 2 else "")
