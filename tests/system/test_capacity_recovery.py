"""Issue 22, item 3: services started one by one on a shared host. Each says at start
that it takes every core when given no thread count, and OpenMP pools sleep rather
than spin when idle. The capacity parts: tests/chorus/test_capacity.py (the model),
tests/token_server/test_token_engine.py (calibration, probes, the queue bound on llama.cpp),
tests/system/test_capacity_stack.py (a two-by-two stack)."""

from __future__ import annotations

import pytest

from chorus.realtime.cpu_budget import sleep_idle_threads

pytestmark = pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)


def test_a_service_given_no_thread_count_says_it_takes_every_core_and_what_to_set(gguf_path, snac_dir, caplog,
                                                                                   monkeypatch):
    """Two token servers and two codec workers started one by one each took every core;
    each must say so at start, naming the flag that divides them."""
    from services.codec_worker import __main__ as codec_main
    from services.token_server import __main__ as token_main

    for name in ("CHORUS_LLAMA_THREADS", "CHORUS_TORCH_THREADS"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level("WARNING"):
        token = token_main.build_config(token_main.parse_args(["--model", str(gguf_path)]))
        codec = codec_main.build_config(codec_main.parse_args(["--model-dir", str(snac_dir)]))
    notices = [r.getMessage() for r in caplog.records if "Processes started separately" in r.getMessage()]
    assert len(notices) == 2
    assert "--llama-threads" in notices[0] and "--torch-threads" in notices[1]
    assert token.llama_threads == codec.torch_threads >= 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        token_main.build_config(token_main.parse_args(["--model", str(gguf_path), "--llama-threads", "1"]))
        monkeypatch.setenv("CHORUS_TORCH_THREADS", "1")
        assert codec_main.build_config(codec_main.parse_args(["--model-dir", str(snac_dir)])).torch_threads == 1
    assert not [r for r in caplog.records if "Processes started separately" in r.getMessage()]


def test_openmp_threads_sleep_when_idle_unless_the_operator_says_otherwise():
    env: dict[str, str] = {}
    sleep_idle_threads(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    sleep_idle_threads(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
