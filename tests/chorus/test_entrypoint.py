"""The services' command lines: bad configuration is one clear line, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

SERVICES = ["gateway", "services.token_server", "services.codec_worker"]


def launch(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("module", SERVICES)
def test_help_works_whatever_the_environment_says(module):
    """Defect: CHORUS_METRICS_PORT=abc made even --help raise ValueError."""
    done = launch(module, "--help", env={"CHORUS_METRICS_PORT": "abc", "CHORUS_DRAIN_SECONDS": "soon"})
    assert done.returncode == 0, done.stderr
    assert "--metrics-port" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("variable, value", [("CHORUS_METRICS_PORT", "abc"), ("CHORUS_PORT", "5x"),
                                             ("CHORUS_DRAIN_SECONDS", "soon")])
def test_a_bad_environment_value_is_named_in_one_line(variable, value):
    done = launch("gateway", "--token-servers", "127.0.0.1:9", env={variable: value})
    assert done.returncode == 2
    assert f"{variable}={value!r}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_service_flag_from_the_environment_is_checked_too():
    done = launch("gateway", "--token-servers", "127.0.0.1:9", env={"CHORUS_LOOKAHEAD": "two"})
    assert done.returncode == 2
    assert "CHORUS_LOOKAHEAD='two'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("how", ["env", "flag"])
def test_an_unknown_log_level_is_refused_with_the_choices(how):
    """Defect: CHORUS_LOG_LEVEL=verbose silently became INFO."""
    args, env = (["--log-level", "verbose"], {}) if how == "flag" else ([], {"CHORUS_LOG_LEVEL": "verbose"})
    done = launch("gateway", "--token-servers", "127.0.0.1:9", *args, env=env)
    assert done.returncode == 2
    assert "verbose" in done.stderr and "DEBUG, INFO, WARNING, ERROR, CRITICAL" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_without_a_traceback(which):
    """Defect: a port already in use gave a raw RuntimeError traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = ["--port", port] if which == "--port" else ["--port", "0", "--metrics-port", port]
        done = launch("gateway", "--token-servers", "127.0.0.1:9", *args)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in last and "in use" in last, done.stderr
