"""A llama.cpp library that dies on this CPU is reported where it dies, once, clearly.

The crash is faked with a library stub: a shared object, preloaded, that defines the
ggml function llama_decode calls to run its graph and raises SIGILL there, which is
where a build with instructions the CPU refuses (AMX on some VMs) dies. Everything
else is real: the pytest session, the smoke child, the token server process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.llama_wheel import preload
from tools.supervisor import Stack, StackError

ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module")
def sigill_on_decode(tmp_path_factory) -> dict[str, str]:
    return preload.build("sigill_on_decode", preload.SIGILL_IN_LLAMA_DECODE, tmp_path_factory.mktemp("stub"))


def test_the_suite_stops_at_once_with_the_reason_when_the_backbone_cannot_decode(sigill_on_decode, demo_models):
    env = {**os.environ, **sigill_on_decode, "CHORUS_TEST_MODELS": str(demo_models.root)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/chorus/test_orpheus.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 3, out
    assert "died of SIGILL (illegal instruction" in out
    assert "libggml-cpu.so" in out and "none ran" in out and "./scripts/setup.sh" in out
    assert " passed" not in out and " error" not in out


def test_a_token_server_that_dies_at_start_names_the_library_and_the_signal(sigill_on_decode, demo_models):
    stack = Stack(models_dir=demo_models.root, gateway_http_port=None, env=sigill_on_decode, start_timeout_s=120)
    with pytest.raises(StackError) as err:
        stack.start()
    message = str(err.value)
    assert message.startswith("token server (in llama.cpp) died of SIGILL (illegal instruction"), message
    assert "libggml-cpu.so" in message and "chorus doctor" in message
    assert "llama_backend.py" in message  # faulthandler's frame, from the service's log
