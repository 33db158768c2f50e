"""The codec decoder gives the same bits on Intel and AMD CPUs (numeric_mode.py).

Two CPUs cannot meet in one test, but MKL decides between its Intel and its other
kernels by one exported vendor check, so a preloaded stub that answers the other
way makes this CPU take the other vendor's path. The same decode then runs under
both: pinned (the served mode) the bits must be equal; unpinned they must differ,
or the stand-in changed nothing and the first half would prove nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.llama_wheel import cpu

ROOT = Path(__file__).resolve().parents[1]

# MKL's vendor check, answering for the other vendor than this CPU's.
STUB = r"""
int mkl_serv_intel_cpu_true(void) { return %(intel)d; }
int mkl_serv_intel_cpu(void) { return %(intel)d; }
"""

CHILD = r"""
import hashlib, os, sys
import numpy as np
from services.codec_worker import numeric_mode
if sys.argv[2] == "unpinned":
    os.environ.pop("MKL_CBWR")                      # before MKL's first call: its own default
    numeric_mode.ensure_pinned = lambda: "unpinned"
    numeric_mode.gemms_on_one_thread = lambda: None
import torch
from services.codec_worker.model import load_snac
from services.codec_worker.streaming_decoder import StreamingSnacDecoder
decoder = StreamingSnacDecoder(load_snac(sys.argv[1], device="cpu").model)
rng = np.random.default_rng(1)
frames = [rng.integers(0, 4096, (16, 7)) for _ in range(3)]

def stream(step, n_streams, threads):
    torch.set_num_threads(threads)
    states = [decoder.new_stream(seed=2**64 - 12345 + k) for k in range(n_streams)]
    out = []
    for lo in range(0, 16, step):
        chunk = decoder.decode([(states[k], frames[k][lo:lo + step]) for k in range(n_streams)])[0]
        if chunk is not None:
            out.append(chunk.samples)
    out.append(decoder.flush(states[0]).samples)
    return hashlib.sha256(np.concatenate(out).tobytes()).hexdigest()

print(numeric_mode.current(), stream(1, 1, 1), stream(5, 3, 2), stream(16, 2, 3))
"""


@pytest.fixture(scope="module")
def other_vendor(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("mkl-vendor")
    source, library = folder / "other_vendor.c", folder / "libother_vendor.so"
    source.write_text(STUB % {"intel": 0 if cpu.cpu_vendor() == "GenuineIntel" else 1})
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O1", "-o", str(library), str(source)], check=True)
    return {"LD_PRELOAD": str(library)}


def decode(snac_dir: Path, mode: str, extra_env: dict[str, str]) -> tuple[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(snac_dir), mode], cwd=ROOT, env={**env, **extra_env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reported, *hashes = done.stdout.split()
    return reported, hashes


def test_intel_and_amd_kernels_give_the_same_bits_in_the_served_mode(snac_dir, other_vendor):
    here_mode, here = decode(snac_dir, "pinned", {})
    there_mode, there = decode(snac_dir, "pinned", other_vendor)
    assert here_mode == there_mode == "COMPATIBLE"
    # One stream fed 1 frame a step on 1 thread, 5 a step beside 2 partners on 2
    # threads, 16 a step beside 1 partner on 3 threads: one set of bits, both vendors.
    assert len(set(here)) == 1, here
    assert here == there

    unpinned_here = decode(snac_dir, "unpinned", {})[1]
    unpinned_there = decode(snac_dir, "unpinned", other_vendor)[1]
    assert unpinned_here[0] != unpinned_there[0], "the stand-in did not change MKL's kernels"


def test_a_worker_refuses_to_decode_in_another_mode(snac_dir):
    env = {**os.environ, "MKL_CBWR": "SSE4_2"}
    child = ("import torch; a = torch.randn(8, 8); a @ a\n"  # MKL starts in the operator's mode
             "from services.codec_worker.model import load_snac\n"
             f"load_snac({str(snac_dir)!r}, device='cpu')\n")
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "ModelLoadError" in done.stderr and "MKL_CBWR=SSE4_2" in done.stderr
    assert "COMPATIBLE" in done.stderr
