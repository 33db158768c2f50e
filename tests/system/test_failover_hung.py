"""A peer that hangs mid-stream is replaced as one that dies is, sample for sample.

The stack, request and fault-free audio of tests/system/test_failover_exact.py. The process
serving a seeded request is SIGSTOPped at the request's first audio and stays stopped
until the request is over: a stopped process ends none of its calls, so without the
stall watch (chorus.rpc.stall) the request waits for its deadline and fails
DEADLINE_EXCEEDED. With it, the token server takes a stopped codec worker for dead
and resumes on the other, and the gateway takes a stopped token server for dead and
replays on the other, and the audio is the fault-free run's, sample for sample. Each
stopped process is continued when its test ends. The codec worker goes first, as in
tests/system/test_failover_exact.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from test_failover_exact import (  # noqa: F401 (stack, fault_free: the fixtures shared with the kill tests)
    FAULTS,
    assert_same_samples,
    fault_free,
    logs_of,
    stack,
    synthesize,
)

pytestmark = pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)

# The request's deadline: ample for the stall watch and a replay, and what a request
# on a stack without the watch waits for before it fails.
DEADLINE_S = 90


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: T is stopped."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@pytest.fixture
def stopped():
    """Processes the test stopped; continued when it ends, pass or fail."""
    processes = []
    yield processes
    for process in processes:
        os.kill(process.popen.pid, signal.SIGCONT)


@pytest.mark.parametrize("victim", list(FAULTS))
def test_a_process_stopped_mid_stream_is_replaced_sample_for_sample(stack, gateway, fault_free, stopped, victim):
    find_serving, logged_by, failover_line = FAULTS[victim]

    def stop_the_serving_process() -> None:
        process = find_serving(stack)
        os.kill(process.popen.pid, signal.SIGSTOP)
        stopped.append(process)

    pcm, _, before = synthesize(gateway, on_first_audio=stop_the_serving_process, timeout=DEADLINE_S)
    assert stopped and process_state(stopped[0].popen.pid) == "T", "stopped throughout the request"
    assert 0 < before < len(pcm), "the stop came mid-stream"
    assert_same_samples(fault_free, pcm)
    # The watch, not an error of the stopped peer's, ended its call.
    assert f"{victim} {stopped[0].address} sent no audio for longer than the stream's lead allows" in logs_of(
        stack, logged_by
    )
    assert failover_line in logs_of(stack, logged_by)
    if victim == "codec worker":
        # Replaced inside the token server, before the gateway would have replayed the piece.
        assert "replaying on another" not in logs_of(stack, "gateway_process")
