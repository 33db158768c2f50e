"""The codec decoder's numeric modes on Intel and AMD kernels (numeric_mode.py).

Two CPUs cannot meet in one test, but MKL decides between its Intel and its other
kernels by one exported vendor check, so a preloaded stub that answers the other
way makes this CPU take the other vendor's kernels. The same decode then runs on
both: in compatible mode the bits are equal; in vendor mode each side is exact
under chunking, batching and threads, and the two report different modes (and give
different bits, which also shows the stand-in took effect).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc
from services.token_server.codec_pool import NoCodecWorkerError
from tools.llama_wheel import cpu, preload

from codec_load_servers import pool_over

pytestmark = pytest.mark.slow  # over 15 s: started first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import hashlib, sys
import numpy as np
from services.codec_worker import numeric_mode
numeric_mode.select(sys.argv[2])                   # as the worker's entry point does
import torch
from services.codec_worker.model import load_snac
from services.codec_worker.streaming_decoder import StreamingSnacDecoder
loaded = load_snac(sys.argv[1], device="cpu", mode=sys.argv[2])
decoder = StreamingSnacDecoder(loaded.model)
rng = np.random.default_rng(1)
frames = [rng.integers(0, 4096, (8, 7)) for _ in range(3)]

def stream(step, n_streams, threads):
    torch.set_num_threads(threads)
    states = [decoder.new_stream(seed=2**64 - 12345 + k) for k in range(n_streams)]
    out = []
    for lo in range(0, 8, step):
        chunk = decoder.decode([(states[k], frames[k][lo:lo + step]) for k in range(n_streams)])[0]
        if chunk is not None:
            out.append(chunk.samples)
    out.append(decoder.flush(states[0]).samples)
    return hashlib.sha256(np.concatenate(out).tobytes()).hexdigest()

# One stream fed 1 frame a step on 1 thread, 3 a step beside 2 partners on 2 threads,
# all 8 in one step beside 1 partner on 3 threads.
print(loaded.numeric_mode, stream(1, 1, 1), stream(3, 3, 2), stream(8, 2, 3))
"""


@pytest.fixture(scope="module")
def other_vendor(tmp_path_factory) -> dict[str, str]:
    return preload.build("other_vendor", preload.other_mkl_vendor(), tmp_path_factory.mktemp("mkl-vendor"))


def decode_here_and_there(snac_dir: Path, mode: str, other_vendor: dict[str, str]) -> list[tuple[str, list[str]]]:
    """For this CPU's kernels and the other vendor's: (the mode the worker reports, the
    audio's digest for each way of feeding it). The two children run at once: each is
    its own process, so neither's bits depend on the other."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(snac_dir), mode], cwd=ROOT,
                                 env={**env, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for extra_env in ({}, other_vendor)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
        reported, *hashes = out.split()
        results.append((reported, hashes))
    return results


def test_compatible_mode_gives_intel_and_amd_kernels_the_same_bits(snac_dir, other_vendor):
    (here_mode, here), (there_mode, there) = decode_here_and_there(snac_dir, "compatible", other_vendor)
    assert here_mode == there_mode == "mkl-compatible"
    assert len(set(here)) == 1, "chunking, batch partners or threads changed bits"
    assert here == there


def test_vendor_mode_is_exact_within_a_vendor_and_says_which_vendor(snac_dir, other_vendor):
    (here_mode, here), (there_mode, there) = decode_here_and_there(snac_dir, "vendor", other_vendor)
    intel = cpu.cpu_vendor() == "GenuineIntel"
    assert (here_mode, there_mode) == (("mkl-avx2-strict", "mkl-non-intel") if intel else
                                       ("mkl-non-intel", "mkl-avx2-strict"))
    assert len(set(here)) == 1 and len(set(there)) == 1, "chunking, batch partners or threads changed bits"
    # The two vendors' kernels give other bits: this is why the modes differ, why a
    # stream fails over only within its mode, and it shows the stand-in took effect.
    assert here[0] != there[0]


def test_a_worker_refuses_to_decode_in_another_mode_than_asked(snac_dir):
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}
    child = ("import torch; a = torch.randn(8, 8); a @ a\n"  # MKL starts in the operator's mode
             "from services.codec_worker.model import load_snac\n"
             f"load_snac({str(snac_dir)!r}, device='cpu', mode='vendor')\n")
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "ModelLoadError" in done.stderr and "MKL_CBWR=COMPATIBLE" in done.stderr
    assert "--numeric-mode vendor" in done.stderr


class _Load(codec_pb2_grpc.CodecServiceServicer):
    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def GetLoad(self, request, context):
        return codec_pb2.GetLoadResponse(max_streams=8, device="cpu", numeric_mode=self.mode)


def _pool_of_workers_in(modes):
    """A started CodecPool over real gRPC servers that answer GetLoad with `modes`, and
    their addresses."""
    return pool_over([_Load(mode) for mode in modes])


def test_a_stream_fails_over_only_to_a_worker_of_its_numeric_mode():
    """CodecPool against real gRPC servers that answer GetLoad with a mode."""
    async def scenario():
        async with _pool_of_workers_in(("mkl-non-intel", "mkl-avx2-strict", "mkl-non-intel")) as (pool, addresses):
            assert [pool.numeric_mode(a) for a in addresses] == ["mkl-non-intel", "mkl-avx2-strict", "mkl-non-intel"]
            # A stream that started on worker 0 resumes on worker 2, never on worker 1.
            assert pool.pick({addresses[0]}, "mkl-non-intel") == addresses[2]
            with pytest.raises(NoCodecWorkerError, match="numeric mode mkl-non-intel.*mkl-avx2-strict"):
                pool.pick({addresses[0], addresses[2]}, "mkl-non-intel")
            # A new stream takes any worker.
            assert pool.pick({addresses[0], addresses[2]}) == addresses[1]

    asyncio.run(scenario())


def test_a_bf16_stream_fails_over_only_to_a_worker_of_its_mode(monkeypatch):
    """A bf16 worker's mode names its precision and bf16 kernels (numeric_mode.with_precision),
    so a bf16 stream never moves to an fp32 worker, nor to one on other bf16 kernels."""
    from services.codec_worker import numeric_mode, precision

    def mode(base: str, decoder_precision: str, vendor: str, flags: set[str]) -> str:
        monkeypatch.setattr(precision, "_cpuinfo", lambda: (vendor, frozenset(flags)))
        return numeric_mode.with_precision(base, decoder_precision)

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    amd_bf16 = mode("mkl-non-intel", "bf16", "AuthenticAMD", {"avx512_bf16"})
    modes = [
        amd_bf16,
        mode("mkl-non-intel", "fp32", "AuthenticAMD", {"avx512_bf16"}),  # same CPU, fp32
        mode("mkl-compatible", "bf16", "GenuineIntel", {"avx512_bf16", "amx_bf16"}),  # AMX kernels
        mode("mkl-compatible", "bf16", "AuthenticAMD", {"avx512_bf16"}),  # same kernels, other MKL mode
        amd_bf16,
    ]
    assert len(set(modes)) == 4

    async def scenario():
        async with _pool_of_workers_in(modes) as (pool, addresses):
            assert [pool.numeric_mode(a) for a in addresses] == modes
            assert pool.pick({addresses[0]}, amd_bf16) == addresses[4]
            with pytest.raises(NoCodecWorkerError, match=f"numeric mode {amd_bf16.replace('+', '.')}"):
                pool.pick({addresses[0], addresses[4]}, amd_bf16)
            # An fp32 stream of the same CPU does not move to a bf16 worker either.
            with pytest.raises(NoCodecWorkerError):
                pool.pick({addresses[1]}, modes[1])

    asyncio.run(scenario())
