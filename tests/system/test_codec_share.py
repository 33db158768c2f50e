"""A process on the token server's host cannot take the token server's codec streams.

Issue 17 found it through `chorus serve`: the codec worker counted its per-client
share by peer address, so 64 idle Decode streams opened from the same host spent the
token server's share, and the next synthesis failed UNAVAILABLE until they timed out.
Here the three services run as processes on loopback, as `chorus serve` runs them,
and this test process, on the same host, is the neighbour. In plaintext a client is
a connection; with mutual TLS a client without the token server's certificate does
not get a Decode stream at all (test_security.py).
"""

from __future__ import annotations

import threading
import time

import grpc
import httpx2 as httpx
import pytest

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc, common_pb2, gateway_pb2
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from fake_token_server import free_port_address
from services.token_server.codec_pool import LOAD_POLL_INTERVAL_S
from tools.supervisor import Stack

pytestmark = pytest.mark.slow

MAX_STREAMS = 64  # the worker's default cap; its default share per client is half


@pytest.fixture(scope="module")
def stack(demo_models, tmp_path_factory):
    # Idle streams stay until the test ends them: this is about the share, not the timeouts.
    metrics_port = int(free_port_address().rpartition(":")[2])
    worker_flags = ["--max-streams", str(MAX_STREAMS), "--start-timeout", "600", "--metrics-port", str(metrics_port)]
    with Stack(calibrate=False, models_dir=demo_models.root, slots=1, gateway_http_port=None,
               work_dir=tmp_path_factory.mktemp("codec-share"), extra_args={"codec_worker": worker_flags}) as running:
        running.codec_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        yield running


def open_calls(stack) -> int:
    """Decode calls the worker holds, started or not, from its metrics."""
    text = httpx.get(stack.codec_metrics, timeout=10).text
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("chorus_codec_worker_streams "))))


def nothing_until(released: threading.Event):
    """A request stream that sends nothing and stays open until `released`."""
    released.wait(600)
    yield from ()


def hold_idle_streams(stack, stub, count: int, released: threading.Event) -> tuple[list, int]:
    """Opens `count` Decode streams that send nothing; returns them once each is
    accepted or refused, with how many were accepted."""
    calls = [stub.Decode(nothing_until(released), timeout=600) for _ in range(count)]
    for _ in range(1200):  # generous: it only catches a hang
        refused = sum(call.done() for call in calls)
        accepted = open_calls(stack)
        if accepted + refused == count:
            return calls, accepted
        time.sleep(0.05)
    raise AssertionError("the idle streams were neither all accepted nor refused")


def test_idle_streams_from_the_token_servers_host_leave_its_share_alone(stack, gateway):
    worker = stack.codec_worker_processes[0].address
    released = threading.Event()
    with grpc.insecure_channel(worker) as channel:
        stub = codec_pb2_grpc.CodecServiceStub(channel)
        calls, accepted = hold_idle_streams(stack, stub, MAX_STREAMS, released)
        try:
            refusals = {(call.code(), call.details()) for call in calls if call.done()}
            time.sleep(3 * LOAD_POLL_INTERVAL_S)  # the token server has polled GetLoad since they opened
            reported = stub.GetLoad(codec_pb2.GetLoadRequest(), timeout=10).open_streams
            request = gateway_pb2.SynthesizeRequest(
                text="Still served.", sampling=common_pb2.SamplingParams(max_tokens=7 * 8, seed=3,
                                                                         ignore_end_of_speech=True))
            replies = list(gateway.Synthesize(request, timeout=120))
        finally:
            released.set()
            for call in calls:
                call.cancel()
    assert accepted == MAX_STREAMS // 2, "the neighbour gets one client's share"
    assert reported == 0, "calls that never started cost no decode time: token servers do not count them"
    [(code, details)] = refusals
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"already holds {MAX_STREAMS // 2} streams" in details and "127.0.0.1:" in details
    assert sum(r.audio.num_samples for r in replies) == 8 * SAMPLES_PER_FRAME
    assert replies[-1].HasField("summary")
