"""One numeric mode for the CPU decoder on every x86 CPU: MKL's COMPATIBLE branch.

Sample-exact failover moves a stream between codec workers, which may sit on Intel
and AMD nodes, so a decode must give the same bits on both. MKL does not: it picks
its GEMM kernels by vendor and instruction set, and its Conditional Numerical
Reproducibility (MKL_CBWR) pins a branch on Intel CPUs only. Measured with torch
2.13 (MKL 2024.2) on an AMD EPYC with AVX-512, the same decode with MKL made to
take its Intel path (tests/test_codec_numeric_mode.py does this with a preloaded
stub of MKL's vendor check) gave:

- default, AVX2, AVX512, AVX2+STRICT or AVX512+STRICT: other bits than on AMD,
  and on the Intel path the chunking rules of channel_mix.py no longer held;
- COMPATIBLE: the same bits on both paths. Its kernels need by-row GEMMs padded
  to 8 rows (not 4) to keep an element's bits independent of its batch, which
  channel_mix.py now does, and its thread split changes bits at 3 threads (not at
  2 or 4), so the decoder's GEMMs run on one MKL thread (gemms_on_one_thread)
  while torch's other kernels use every torch thread.

MKL reads its mode once, at its first call, so it is set through the environment
before torch runs anything (services/codec_worker/__init__.py) and checked, or set
through MKL's own service call, when a model is loaded: a worker never decodes in
another mode without saying so. What it costs in decoder speed is in
docs/benchmarks.md. GPUs have no such mode: CUDA workers give their own bits.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

ENV = "MKL_CBWR"
REQUIRED = "COMPATIBLE"

# mkl_cbwr.h: the branch part of mkl_cbwr_get(MKL_CBWR_BRANCH).
_MKL_CBWR_BRANCH = 1
_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
             9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_CODES = {name: code for code, name in _BRANCHES.items()}


class NumericModeError(RuntimeError):
    """MKL runs in another mode than the decoder's bits need; the message says how to fix it."""


def request_before_torch() -> None:
    """Asks MKL for COMPATIBLE at its start, unless the operator named a mode (then
    ensure_pinned says whether it will do)."""
    os.environ.setdefault(ENV, REQUIRED)


@lru_cache(maxsize=1)
def _mkl():
    """MKL's mode and thread calls (get, set, set threads for this thread), from the
    torch library that links MKL statically; None where torch has no MKL (ARM)."""
    import torch

    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        lib = ctypes.CDLL(str(library))
        calls = (lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set, lib.MKL_Set_Num_Threads_Local)
    except (OSError, AttributeError):
        return None
    for call in calls:
        call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
    return calls


def gemms_on_one_thread() -> None:
    """MKL calls from this thread run on one thread, until the next torch.set_num_threads
    (which sets MKL's per-thread count too): call it before each decode."""
    calls = _mkl()
    if calls is not None:
        calls[2](1)


def current() -> str:
    """MKL's branch now ("COMPATIBLE", "OFF", "AVX2"...), or "no MKL"."""
    calls = _mkl()
    if calls is None:
        return "no MKL"
    code = calls[0](_MKL_CBWR_BRANCH)
    return _BRANCHES.get(code, f"branch {code}")


def ensure_pinned() -> str:
    """COMPATIBLE now, or NumericModeError; returns the mode."""
    mode = current()
    if mode in (REQUIRED, "no MKL"):
        return mode
    calls = _mkl()
    if calls is not None and calls[1](_CODES[REQUIRED]) == 0:
        return current()
    raise NumericModeError(
        f"MKL runs in numeric mode {mode} ({ENV}={os.environ.get(ENV, '<unset>')}), but the codec decoder gives "
        f"the same bits on Intel and AMD CPUs only in {REQUIRED}, which sample-exact failover between workers "
        f"needs. Leave {ENV} unset (the codec worker sets it) or set {ENV}={REQUIRED}; MKL reads it once, at its "
        "first call, so it cannot change in a running process."
    )
