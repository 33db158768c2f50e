"""Issue 22, item 3 on a real stack: two token servers and two codec workers on this
machine, each taking every CPU as a service started alone does by default. Asserts
that a busy start keeps capacity within a factor of 2 of a quiet start's, that a
forced bad calibration (fake step times, tests/support/fault_injection) comes back without
traffic, and that seven concurrent short requests all finish. No timing assertions:
waits are bounded only so that a hang fails instead of blocking the suite."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, token_server_pb2, token_server_pb2_grpc
from chorus.realtime.cpu_budget import cpu_budget
from tools.supervisor import Stack

pytestmark = [pytest.mark.slow, pytest.mark.serial]

FAULTS = Path(__file__).resolve().parents[1] / "support" / "fault_injection"
SLOTS = 4


def status(address: str) -> token_server_pb2.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        return token_server_pb2_grpc.TokenServiceStub(channel).GetStatus(token_server_pb2.GetStatusRequest(), timeout=10)


def every_core(demo_models, work_dir: Path, **kwargs) -> Stack:
    """A stack whose every process takes all the CPUs, as each service started on its
    own (README's per-service commands) does when given no thread count."""
    threads = cpu_budget().threads
    return Stack(models_dir=demo_models.root, slots=SLOTS, llama_threads=threads, torch_threads=threads,
                 work_dir=work_dir, **kwargs)


def synthesize(address: str, i: int) -> gateway_pb2.SynthesisSummary | None:
    request = gateway_pb2.SynthesizeRequest(
        text=f"Short request number {i}.", sampling=common_pb2.SamplingParams(max_tokens=7 * 12, seed=i))
    with grpc.insecure_channel(address) as channel:
        summary = None
        for response in gateway_pb2_grpc.SynthesisServiceStub(channel).Synthesize(request, timeout=150):
            if response.WhichOneof("payload") == "summary":
                summary = response.summary
        return summary


def test_a_busy_start_keeps_capacity_recovers_a_bad_calibration_and_serves_seven_at_once(demo_models, tmp_path):
    with every_core(demo_models, tmp_path / "quiet") as quiet:
        [server] = quiet.token_server_processes
        quiet_capacity = status(server.address).capacity_streams
    assert quiet_capacity >= 1

    claim = tmp_path / "busy-calibration.claim"
    pythonpath = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    with every_core(demo_models, tmp_path / "busy", token_servers=2, codec_workers=2,
                    env={"PYTHONPATH": pythonpath, "CHORUS_TEST_BUSY_CALIBRATION": str(claim)}) as busy:
        forced = [p for p in busy.token_server_processes if str(p.popen.pid) == claim.read_text()]
        assert len(forced) == 1, "one token server took the forced bad calibration"
        assert "real-time capacity 1 streams" in forced[0].log_path.read_text(errors="replace")
        # The one that calibrated honestly, beside three neighbours starting at once.
        at_start = {p.name: status(p.address).capacity_streams for p in busy.token_server_processes if p not in forced}
        assert all(2 * c >= quiet_capacity for c in at_start.values()), (quiet_capacity, at_start)
        recovered = {}
        for process in busy.token_server_processes:
            for _ in range(600):  # bounded: a capacity frozen for good fails here
                recovered[process.name] = status(process.address).capacity_streams
                if 2 * recovered[process.name] >= quiet_capacity:
                    break
                time.sleep(0.1)
        assert all(2 * c >= quiet_capacity for c in recovered.values()), (quiet_capacity, recovered)

        with ThreadPoolExecutor(7) as pool:
            summaries = list(pool.map(lambda i: synthesize(busy.gateway_address, i), range(7)))
        busy.check_alive()
    assert all(s is not None and s.frames > 0 for s in summaries), summaries
