"""What the CPU advertises and what the compiler will use for a set of flags.

The compiler's predefined macros are the precise statement of the instructions a
build may emit (`-march=native` on this CPU, minus what we switch off), so they, not
/proc/cpuinfo, make the wheel cache key. /proc/cpuinfo is still what the user can
compare with other machines, so reports quote it.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import lru_cache

from chorus.realtime import cpuinfo

CPUINFO = cpuinfo.CPUINFO

# The x86 flags that decide which llama.cpp and MKL kernels run; reports list these.
RELEVANT_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16",
    "avx512vbmi", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)


def same_feature(name: str) -> str:
    """One spelling for a feature named by /proc/cpuinfo (avx512_vnni) or by a compiler
    macro (AVX512VNNI), so that the two can be compared."""
    return name.lower().replace("_", "").replace(".", "")


def cpu_model() -> str:
    return cpuinfo.field("model name") or "unknown CPU"


def cpu_vendor() -> str:
    return cpuinfo.field("vendor_id") or "unknown"


def cpu_flags() -> frozenset[str]:
    return frozenset(cpuinfo.field("flags").split())


def relevant_flags(flags: frozenset[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    return [f for f in RELEVANT_FLAGS if f in flags]


def compiler() -> str:
    return os.environ.get("CC", "cc")


@lru_cache(maxsize=None)
def compiler_version() -> str:
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown compiler"
    return out.splitlines()[0].strip() if out else "unknown compiler"


@lru_cache(maxsize=None)
def predefined_macros(flags: tuple[str, ...]) -> tuple[str, ...]:
    """`cc FLAGS -dM -E` of an empty file: every macro the compiler defines for them."""
    try:
        out = subprocess.run(
            [compiler(), *flags, "-dM", "-E", "-x", "c", os.devnull],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"setup: cannot ask the C compiler ({compiler()}) which instructions "
            f"{' '.join(flags) or 'its defaults'} allow ({err}); building llama.cpp needs a C/C++ compiler and CMake (Debian: apt-get install build-essential "
            "cmake), or set CC"
        ) from err
    return tuple(sorted(line.strip() for line in out.splitlines() if line.strip()))


def instruction_sets(flags: tuple[str, ...]) -> list[str]:
    """The instruction-set macros FLAGS add over plain x86-64, as names: AVX2, AVX512F..."""
    baseline = set(predefined_macros(("-march=x86-64",)))
    names = []
    for line in predefined_macros(flags):
        if line in baseline:
            continue
        match = re.fullmatch(r"#define __([A-Z0-9_]+)__ 1", line)
        if match:
            names.append(match.group(1))
    return sorted(names)


@lru_cache(maxsize=None)
def accepted_flags(candidates: tuple[str, ...]) -> tuple[str, ...]:
    """The flags of CANDIDATES the compiler accepts (older compilers lack newer -mno-amx-*)."""
    predefined_macros(())  # a clear error when there is no compiler at all
    ok = []
    for flag in candidates:
        probe = subprocess.run([compiler(), flag, "-E", "-x", "c", os.devnull],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            ok.append(flag)
    return tuple(ok)
