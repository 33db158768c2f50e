"""The streaming decoder's precision: `fp32`, or `bf16` channel mixes.

bf16 pays where the CPU multiplies bfloat16 in hardware: on a 2-core AMD EPYC with
AVX512-BF16 its GEMMs ran 3-4x faster than MKL's float32 ones and the decoder
1.5-1.9x (docs/benchmarks.md, "Decoder modes"), at 43-44 dB SNR against fp32. A CPU
without it would emulate bf16 (float32 arithmetic plus conversions, in oneDNN or
torch's own loops; not measured here), so "auto" picks bf16 only where /proc/cpuinfo lists avx512_bf16 or
amx_bf16. On CUDA, bf16 needs tensor cores that take it (Ampere on); there "auto"
asks torch.

Each precision gives its own bits, and bf16's are expected to differ between AMX and
AVX512-BF16 kernels (no AMX was at hand to measure), so the mode a worker reports
names both (numeric_mode.with_precision) and a stream fails over only to a worker that would
continue it bit for bit.
"""

from __future__ import annotations

import os
from functools import lru_cache

from chorus.realtime import cpuinfo

PRECISIONS = ("fp32", "bf16")
CHOICES = ("auto", *PRECISIONS)
DEFAULT = "auto"

# oneDNN's cap on the instruction sets it may use; with it below AMX or AVX512-BF16
# those kernels are not used even where the CPU has them.
_ONEDNN_CAP_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(vendor_id, flags) of the first CPU; empty where unreadable."""
    return cpuinfo.field("vendor_id"), frozenset(cpuinfo.field("flags").split())


def native_bf16_isa(flags: frozenset[str] | set[str] | None = None, onednn_cap: str | None = None) -> str | None:
    """The bf16 instruction set oneDNN runs GEMMs on here ("amx_bf16" or
    "avx512_bf16"), or None where it would emulate bf16. `flags` and `onednn_cap`
    default to this CPU's and this process's."""
    if flags is None:
        flags = _cpuinfo()[1]
    if onednn_cap is None:
        onednn_cap = next((os.environ[k] for k in _ONEDNN_CAP_ENV if os.environ.get(k)), "")
    cap = onednn_cap.strip().upper()
    capped = cap not in ("", "ALL", "DEFAULT")
    if "amx_bf16" in flags and not (capped and "AMX" not in cap):
        return "amx_bf16"
    if "avx512_bf16" in flags and not (capped and not any(s in cap for s in ("AMX", "BF16", "AVX10"))):
        return "avx512_bf16"
    return None


def resolve(name: str, device: str = "cpu") -> str:
    """"fp32" or "bf16" for NAME ("auto", "fp32" or "bf16") on DEVICE ("cpu", "cuda")."""
    if name in PRECISIONS:
        return name
    if name != "auto":
        raise ValueError(f"decoder precision must be one of {', '.join(CHOICES)}, got {name!r}")
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if native_bf16_isa() is not None else "fp32"


def bf16_kernels() -> str:
    """What decides bf16 bits on this CPU: its vendor and the bf16 instruction set,
    e.g. "AuthenticAMD:avx512_bf16"; without one, what oneDNN emulates it with."""
    vendor, flags = _cpuinfo()
    isa = native_bf16_isa()
    if isa is None:
        isa = "emulated-" + ("avx512_core" if "avx512bw" in flags else "avx2" if "avx2" in flags else "other")
    return f"{vendor or 'unknown'}:{isa}"
