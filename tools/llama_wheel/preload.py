"""Small C libraries to preload in front of a native library, for tests and benchmarks.

Two CPUs, or a CPU that refuses an instruction, cannot be had on one machine, but the
native code decides both through symbols the dynamic linker resolves, so a preloaded
stub stands in: one that raises SIGILL where llama.cpp computes its graph, and one
that answers MKL's vendor check for the other vendor than this CPU's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools.llama_wheel import cpu

SIGILL_IN_LLAMA_DECODE = r"""
#include <signal.h>
int ggml_backend_sched_graph_compute_async(void *sched, void *graph) {
    (void) sched; (void) graph;
    raise(SIGILL);
    return 0;
}
"""


def other_mkl_vendor() -> str:
    """MKL's vendor check, answering for the other vendor than this CPU's."""
    intel = 0 if cpu.cpu_vendor() == "GenuineIntel" else 1
    return (f"int mkl_serv_intel_cpu_true(void) {{ return {intel}; }}\n"
            f"int mkl_serv_intel_cpu(void) {{ return {intel}; }}\n")


def build(name: str, source: str, folder: Path) -> dict[str, str]:
    """Compiles SOURCE into FOLDER/libNAME.so; returns the environment that preloads it."""
    c_file, library = folder / f"{name}.c", folder / f"lib{name}.so"
    c_file.write_text(source)
    subprocess.run([cpu.compiler(), "-shared", "-fPIC", "-O1", "-o", str(library), str(c_file)], check=True)
    return {"LD_PRELOAD": str(library)}
