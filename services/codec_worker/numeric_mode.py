"""The CPU decoder's numeric mode: which MKL kernels run, and so which bits come out.

Sample-exact failover moves a stream between codec workers, which may sit on Intel
and AMD nodes. MKL picks its GEMM kernels by vendor and instruction set, and its
Conditional Numerical Reproducibility (MKL_CBWR) pins a branch on Intel CPUs only.
Measured with torch 2.13 (MKL 2024.2) on an AMD EPYC with AVX-512, the same decode
with MKL made to take its Intel kernels (a preloaded stub of MKL's vendor check, as
tests/codec_worker/test_codec_numeric_mode.py does) against its own:

- default: other bits on the Intel path, where the chunking rules of channel_mix.py
  no longer held either (the Intel report: 8 of 21 determinism tests failed);
- AVX2+STRICT: on the Intel path, chunk-, batch- and thread-invariant bits, but not
  the AMD path's (MKL ignores every branch but COMPATIBLE on other vendors);
- COMPATIBLE: one set of bits on both paths, with by-row GEMMs padded to 8 rows
  and GEMMs on one MKL thread (its thread split changes bits at 3 threads), at
  1.65-1.83x the CPU time of MKL's AMD kernels and 2.6-3x that of its Intel kernels
  (docs/benchmarks.md).

Any CNR setting on AMD, even AUTO, also changed bits with the thread count (the
channel-mix test at 2 threads), where MKL's own default held. Hence two modes.
`vendor` (the default) is AVX2+STRICT on Intel CPUs and MKL's default elsewhere:
the fast kernels of each vendor, every bit-exactness promise within a vendor, and
workers of different vendors report different modes so that a stream fails over
only within its mode (codec_pool.py). `compatible` gives every x86 CPU the same bits for a pool that must
move streams across vendors, at the cost above.

MKL reads its mode once, at its first call, so the entry point sets MKL_CBWR before
torch runs anything (select), the package asks for the default for in-process users
(request_before_torch), and loading a model checks the mode MKL actually runs in.
GPUs have no such mode: CUDA workers report their device and give their own bits.

The decoder's bf16 precision (precision.py) has bits of its own on top of these, so
a worker reports its mode with the precision and bf16 kernels added (with_precision).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

from chorus.realtime import cpuinfo

ENV = "MKL_CBWR"
MODES = ("vendor", "compatible")
DEFAULT = "vendor"
_INTEL_VENDOR_VALUE = "AVX2,STRICT"

# mkl_cbwr.h: the branch part of mkl_cbwr_get(MKL_CBWR_BRANCH).
_MKL_CBWR_BRANCH = 1
_STRICT = 0x10000
_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
             9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_CODES = {name: code for code, name in _BRANCHES.items()}


class NumericModeError(RuntimeError):
    """MKL runs in another mode than the one asked for; the message says how to fix it."""


def _env_value(mode: str, intel: bool) -> str | None:
    """MKL_CBWR for MODE (None: unset, MKL's own default)."""
    if mode == "compatible":
        return "COMPATIBLE"
    return _INTEL_VENDOR_VALUE if intel else None


def request_before_torch() -> None:
    """The default mode for MKL's start, unless MKL_CBWR is already set (then `ensure`
    says whether it will do). The package runs it at import, so it must not start
    torch: the vendor comes from /proc/cpuinfo."""
    value = _env_value(DEFAULT, cpuinfo.field("vendor_id") == "GenuineIntel")
    if value is not None:
        os.environ.setdefault(ENV, value)


def select(mode: str) -> None:
    """MODE for MKL's start: the codec worker's entry point calls it before torch runs
    anything. The vendor is MKL's own answer (asking it does not start MKL's modes)."""
    calls = _mkl()
    value = _env_value(mode, bool(calls is not None and calls.intel()))
    if value is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = value


class _Mkl(NamedTuple):
    get_mode: Callable[[int], int]
    set_mode: Callable[[int], int]
    set_threads_here: Callable[[int], int]
    intel: Callable[[], int]


@lru_cache(maxsize=1)
def _mkl() -> _Mkl | None:
    """MKL's calls, from the torch library that links MKL statically; None where torch
    has no MKL (ARM)."""
    import torch

    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        lib = ctypes.CDLL(str(library))
        calls = [lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set, lib.MKL_Set_Num_Threads_Local]
        # MKL's own calls to its vendor check go through the dynamic linker, so ask
        # the linker's first answer, as MKL gets it.
        try:
            intel = ctypes.CDLL(None).mkl_serv_intel_cpu_true
        except AttributeError:
            intel = lib.mkl_serv_intel_cpu_true
    except (OSError, AttributeError):
        return None
    for call in calls:
        call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
    intel.argtypes, intel.restype = [], ctypes.c_int
    return _Mkl(*calls, intel)


def branch() -> str:
    """MKL's branch now ("COMPATIBLE", "AVX2", "AUTO"...), or "no MKL"."""
    calls = _mkl()
    if calls is None:
        return "no MKL"
    code = calls.get_mode(_MKL_CBWR_BRANCH)
    return _BRANCHES.get(code, f"branch {code}")


def current() -> str:
    """The mode's name as workers report it: equal names, equal bits for equal input.

    mkl-compatible (every x86 CPU), mkl-avx2-strict (Intel CPUs in vendor mode),
    mkl-non-intel (MKL's kernels for other vendors), or mkl-<branch> / no-mkl."""
    calls = _mkl()
    if calls is None:
        return "no-mkl"
    name = branch()
    if name == "COMPATIBLE":
        return "mkl-compatible"
    if not calls.intel():
        return "mkl-non-intel" if name == "OFF" else f"mkl-non-intel-{name.lower()}"
    strict = "-strict" if calls.get_mode(-1) & _STRICT else ""
    return f"mkl-{name.lower()}{strict}"


def ensure(mode: str) -> str:
    """MKL in MODE now, set here if MKL has not started yet, or NumericModeError;
    returns the reported name."""
    calls = _mkl()
    if calls is None:
        return current()
    intel = bool(calls.intel())
    if mode == "compatible":
        want, code = "mkl-compatible", _CODES["COMPATIBLE"]
    elif intel:
        want, code = "mkl-avx2-strict", _CODES["AVX2"] | _STRICT
    else:
        want, code = "mkl-non-intel", _CODES["OFF"]
    if current() != want:
        calls.set_mode(code)
    if current() == want:
        return want
    value = _env_value(mode, intel)
    raise NumericModeError(
        f"MKL runs in numeric mode {current()} ({ENV}={os.environ.get(ENV, '<unset>')}), not the codec's "
        f"{mode!r} mode ({want}), and MKL fixes its mode at its first call. Start the worker with "
        f"--numeric-mode {mode} and {ENV} {'unset' if value is None else 'unset or ' + value}."
    )


def gemms_on_one_thread() -> None:
    """MKL calls from this thread run on one thread, until the next torch.set_num_threads
    (which sets MKL's per-thread count too): call it before each decode in compatible
    mode, whose kernels split work across threads in a way that changes bits."""
    calls = _mkl()
    if calls is not None:
        calls.set_threads_here(1)


def with_precision(mode: str, decoder_precision: str, device_type: str = "cpu") -> str:
    """The mode a worker reports for a decoder of DECODER_PRECISION (precision.py)
    whose float32 arithmetic runs in MODE (`current`, or a CUDA device's name).

    fp32 reports MODE alone, as before precisions; bf16 adds what decides its bits,
    e.g. "mkl-non-intel+bf16:AuthenticAMD:avx512_bf16": the float32 parts of the
    decoder (quantizer projections) still follow MODE, and the bf16 GEMMs follow
    the CPU's bf16 kernels (AMX and AVX512-BF16 give other bits; the vendor is named
    because oneDNN's equal bits across vendors were not measured). On CUDA, "+bf16"."""
    if decoder_precision == "fp32":
        return mode
    if device_type != "cpu":
        return f"{mode}+{decoder_precision}"
    from services.codec_worker import precision

    return f"{mode}+{decoder_precision}:{precision.bf16_kernels()}"
