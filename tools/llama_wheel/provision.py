"""Gets a llama.cpp wheel that runs on this CPU into the environment, or says why not.

The order: the wanted flavour's cached wheel (or a build of it), installed, then the
smoke check. A death by a signal sets that wheel aside for good, says so in one
paragraph, and moves on to the portable flavour; only a portable wheel that also
dies ends setup, since there is nothing safer to build.

Building, installing and checking are passed in, so that the tests can drive the
whole decision with a fake build and a child that kills itself.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tools.llama_wheel import cpu
from tools.llama_wheel.cache import Entry, WheelCache
from tools.llama_wheel.flavours import LLAMA_CPP_PYTHON, Flavour
from tools.llama_wheel.smoke import SmokeResult, describe_death, signal_text


class ProvisionError(RuntimeError):
    """No llama.cpp wheel runs here; the message says what happened and what to do."""


@dataclass(frozen=True)
class Provisioned:
    entry: Entry
    flavour: Flavour
    smoke: SmokeResult
    built: bool


def build_record(flavour: Flavour, build_seconds: float) -> dict:
    return {
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "flavour": flavour.name,
        "key": flavour.key(),
        "cmake_args": list(flavour.cmake_args),
        "compile_flags": list(flavour.compile_flags),
        "instruction_sets": flavour.instruction_sets(),
        "compiler": cpu.compiler_version(),
        "cpu_model": cpu.cpu_model(),
        "cpu_flags": cpu.relevant_flags(),
        "machine": platform.machine(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(build_seconds, 1),
    }


def provision(
    flavours: list[Flavour],
    cache: WheelCache,
    build: Callable[[Flavour], Path],
    install: Callable[[Entry], None],
    smoke: Callable[[], SmokeResult],
    say: Callable[[str], None] = print,
) -> Provisioned:
    """Tries FLAVOURS in order (the wanted one, then the safe ones)."""
    for flavour in flavours:
        key = flavour.key()
        entry = cache.entry(key)
        rejection = entry.rejection
        if rejection is not None:
            say(f"setup: skipping the {flavour.name} llama.cpp build for this CPU ({key}): its smoke check died of "
                f"{rejection.get('signal', '?')} on {rejection.get('at', '?')} ({entry.folder / 'rejected.json'})")
            continue
        built = entry.wheel is None
        if built:
            say(f"setup: building llama-cpp-python {LLAMA_CPP_PYTHON}, {flavour.name} flavour, once "
                f"(4-15 minutes on 2 cores; cached as {entry.folder})")
            started = time.monotonic()
            wheel = build(flavour)
            entry = cache.store(key, wheel, build_record(flavour, time.monotonic() - started))
        install(entry)
        result = smoke()
        if result.ok:
            return Provisioned(entry, flavour, result, built)
        sig = result.signal
        if sig is None:
            raise ProvisionError(
                f"setup: the llama.cpp smoke check failed without a crash (exit code {result.returncode}); "
                f"its output:\n{result.output}"
            )
        last = flavour is flavours[-1]
        paragraph = describe_death("setup: the llama.cpp smoke check (load the demo backbone, decode a prompt "
                                   "and one token)", sig, entry.record)
        cache.reject(key, {"signal": sig.name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "cpu_model": cpu.cpu_model(), "output_tail": result.output[-1500:]})
        if last:
            raise ProvisionError(
                f"{paragraph} The wheel is set aside ({entry.folder / 'rejected.json'}) and there is no safer "
                "build to fall back to: run `chorus doctor` and report its output."
            )
        say(f"{paragraph} The wheel is set aside ({entry.folder / 'rejected.json'}) and will not be used again; "
            f"setup now builds the {flavours[flavours.index(flavour) + 1].name} flavour instead "
            "(GGML_NATIVE=OFF: AVX2, FMA, F16C, BMI2; no AVX-512, no AMX).")
    raise ProvisionError(
        "setup: every llama.cpp build for this CPU was rejected by an earlier smoke check "
        f"(see {cache.root}); delete those folders to try again, or run `chorus doctor`"
    )


__all__ = ["ProvisionError", "Provisioned", "build_record", "provision", "signal_text"]
