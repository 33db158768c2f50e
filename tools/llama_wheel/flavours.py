"""The two ways we build llama.cpp, and what each one's cache key is made of.

- native: GGML_NATIVE (-march=native) with AMX switched off. A CPU that advertises
  AMX gets llama.cpp's AMX kernels from -march=native, and on VMs whose hypervisor
  does not let a thread run tile instructions (llama.cpp requests tile permission on
  the main thread only) the first matmul dies with SIGILL on `tilezero`. AMX only
  serves ggml's quantized matmuls at large batches, so it goes unconditionally
  rather than on a probe that could pass on the main thread and fail on a worker.
  Explicit -mno-* flags beat -march=native whatever their order (GCC's rule).
- portable: GGML_NATIVE=OFF with the AVX2-level set (AVX, AVX2, FMA, F16C, BMI2),
  which runs on any x86-64 CPU since 2013-2015; plain x86-64 where the CPU lacks
  AVX2. It is the fallback when the native build's smoke check dies, and what the
  CPU image ships.

llama.cpp's runtime dispatch (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) is not a
flavour: llama-cpp-python 0.3.36 installs only the `ggml-cpu` target into the
wheel (not the `ggml-cpu-<variant>` libraries) and never calls
ggml_backend_load_all, so such a wheel has no CPU backend at all.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass

from tools.llama_wheel import cpu

LLAMA_CPP_PYTHON = "0.3.36"
REQUIREMENT = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"

# Always off: the multimodal library Chorus never loads (it saves build minutes).
COMMON_CMAKE = ("-DLLAVA_BUILD=OFF",)
NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-mno-amx-fp16", "-mno-amx-complex",
          "-mno-amx-avx512", "-mno-amx-tf32", "-mno-amx-transpose", "-mno-amx-fp8", "-mno-amx-movrs")
AVX2_LEVEL = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2"}
FLAVOURS = ("native", "portable")


@dataclass(frozen=True)
class Flavour:
    name: str
    cmake_args: tuple[str, ...]
    # The flags that decide which instructions the CPU backend may contain.
    compile_flags: tuple[str, ...]

    @property
    def cmake_env(self) -> str:
        """CMAKE_ARGS as scikit-build-core reads it (shell-split)."""
        return shlex.join(self.cmake_args)

    def instruction_sets(self) -> list[str]:
        return cpu.instruction_sets(self.compile_flags)

    def key_material(self) -> dict:
        return {
            "llama_cpp_python": LLAMA_CPP_PYTHON,
            "flavour": self.name,
            "cmake_args": list(self.cmake_args),
            "compiler": cpu.compiler_version(),
            # Every macro the compiler defines for these flags: the instruction sets
            # and the -march tuning alike.
            "macros": list(cpu.predefined_macros(self.compile_flags)),
        }

    def key(self) -> str:
        material = json.dumps(self.key_material(), sort_keys=True).encode()
        return f"{self.name}-{hashlib.sha256(material).hexdigest()[:20]}"


def native() -> Flavour:
    no_amx = cpu.accepted_flags(NO_AMX)
    quoted = " ".join(no_amx)
    return Flavour(
        "native",
        (*COMMON_CMAKE, "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={quoted}", f"-DCMAKE_CXX_FLAGS={quoted}"),
        ("-march=native", *no_amx),
    )


def portable(flags: frozenset[str] | None = None) -> Flavour:
    flags = cpu.cpu_flags() if flags is None else flags
    avx2 = all(f in flags for f in AVX2_LEVEL)
    switches = [f"-DGGML_{name}={'ON' if avx2 else 'OFF'}" for name in AVX2_LEVEL.values()]
    compile_flags = ("-march=x86-64", *(f"-m{f}" for f in AVX2_LEVEL)) if avx2 else ("-march=x86-64",)
    return Flavour("portable", (*COMMON_CMAKE, "-DGGML_NATIVE=OFF", *switches), compile_flags)


def by_name(name: str) -> Flavour:
    if name == "native":
        return native()
    if name == "portable":
        return portable()
    raise ValueError(f"unknown llama.cpp build flavour {name!r}; use one of {', '.join(FLAVOURS)}")
