"""Same seed, same audio, through every fault: the whole stack as separate processes.

Two token servers and two codec workers behind a gateway. A seeded request's audio is
a function of the request: asked twice it is the same, and it stays the same, sample
for sample, when the codec worker decoding it is SIGKILLed mid-stream (the token
server resumes on the other worker) and when the token server generating it is
SIGKILLed mid-stream (the gateway replays it on the other token server, checks the
regenerated codes against those already relayed, and continues from the last sample
relayed). The kills run in file order on one stack: the codec worker first, so that
the token server kill finds one worker left for both servers.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from chorus.speech.orpheus import SAMPLES_PER_FRAME
from chorus.proto.tts.v1 import (
    codec_pb2,
    codec_pb2_grpc,
    common_pb2,
    gateway_pb2,
    token_server_pb2,
    token_server_pb2_grpc,
)
from tools.supervisor import ServiceProcess, Stack

FRAMES = 60
REQUEST = gateway_pb2.SynthesizeRequest(
    text="Failover must not change a single sample of this sentence.",
    audio=gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_PCM_S16LE),
    sampling=common_pb2.SamplingParams(seed=20261123, max_tokens=7 * FRAMES),
)


@pytest.fixture(scope="module")
def stack(demo_models, tmp_path_factory):
    with Stack(
        calibrate=False,  # measures no capacity: start without calibrating
        models_dir=demo_models.root,
        slots=2,
        token_servers=2,
        codec_workers=2,
        work_dir=tmp_path_factory.mktemp("failover-stack"),
        llama_threads=1,
    ) as running:
        yield running


def synthesize(gateway, on_first_audio=None, timeout: float = 300) -> tuple[bytes, common_pb2.SynthesisSummary, int]:
    """(PCM, summary, bytes received before on_first_audio ran, which happens once)."""
    audio, summary, before = [], None, 0
    for response in gateway.Synthesize(REQUEST, timeout=timeout):
        if response.WhichOneof("payload") == "audio":
            audio.append(response.audio.data)
            if on_first_audio is not None and not before:
                before = len(b"".join(audio))
                on_first_audio()
        else:
            summary = response.summary
    assert summary is not None
    return b"".join(audio), summary, before


@pytest.fixture(scope="module")
def fault_free(gateway):
    pcm, summary, _ = synthesize(gateway)
    # Long enough that a kill after the first audio lands mid-stream.
    assert summary.frames >= 30
    assert len(pcm) == summary.frames * SAMPLES_PER_FRAME * 2
    assert summary.seed == REQUEST.sampling.seed
    return pcm


def kill(process: ServiceProcess) -> None:
    process.popen.kill()
    process.popen.wait(30)


def serving_codec_worker(stack) -> ServiceProcess:
    busy = []
    for process in stack.codec_worker_processes:
        if process.alive:
            with grpc.insecure_channel(process.address) as channel:
                load = codec_pb2_grpc.CodecServiceStub(channel).GetLoad(codec_pb2.GetLoadRequest(), timeout=10)
            busy += [process] * (load.open_streams > 0)
    assert len(busy) == 1, "exactly one codec worker decodes the request"
    return busy[0]


def serving_token_server(stack) -> ServiceProcess:
    busy = []
    for process in stack.token_server_processes:
        if process.alive:
            with grpc.insecure_channel(process.address) as channel:
                status = token_server_pb2_grpc.TokenServiceStub(channel).GetStatus(
                    token_server_pb2.GetStatusRequest(), timeout=10
                )
            busy += [process] * (status.slots_busy > 0)
    assert len(busy) == 1, "exactly one token server generates the request"
    return busy[0]


def logs_of(stack, logged_by: str) -> str:
    """The logs of the stack's processes named by `logged_by` (a list of them, or one)."""
    loggers = getattr(stack, logged_by)
    return "".join(p.log_path.read_text() for p in (loggers if isinstance(loggers, list) else [loggers]))


def assert_same_samples(expected: bytes, got: bytes) -> None:
    a, b = np.frombuffer(expected, "<i2"), np.frombuffer(got, "<i2")
    assert len(b) == len(a), f"{len(b)} samples, fault-free {len(a)}"
    differing = np.flatnonzero(a != b)
    assert differing.size == 0, f"{differing.size} samples differ, first at {differing[0]}"


def test_two_identical_seeded_requests_give_identical_audio(gateway, fault_free):
    pcm, summary, _ = synthesize(gateway)
    assert_same_samples(fault_free, pcm)
    assert summary.seed == REQUEST.sampling.seed


def test_the_seed_drawn_for_an_unseeded_request_reproduces_its_audio(gateway):
    unseeded = gateway_pb2.SynthesizeRequest()
    unseeded.CopyFrom(REQUEST)
    unseeded.sampling.ClearField("seed")
    unseeded.sampling.max_tokens = 7 * 12
    first = [r for r in gateway.Synthesize(unseeded, timeout=300)]
    replayed = gateway_pb2.SynthesizeRequest()
    replayed.CopyFrom(unseeded)
    replayed.sampling.seed = first[-1].summary.seed
    again = [r for r in gateway.Synthesize(replayed, timeout=300)]
    assert again[-1].summary.seed == first[-1].summary.seed
    assert_same_samples(b"".join(r.audio.data for r in first[:-1]), b"".join(r.audio.data for r in again[:-1]))


# The codec worker first: the token server kill then finds one worker left for both servers.
FAULTS = {
    "codec worker": (serving_codec_worker, "token_server_processes", "resuming on another worker"),
    "token server": (serving_token_server, "gateway_process", "replaying on another"),
}


@pytest.mark.parametrize("victim", list(FAULTS))
def test_a_process_killed_mid_stream_changes_no_sample(stack, gateway, fault_free, victim):
    find_serving, logged_by, failover_line = FAULTS[victim]
    killed = []

    def kill_the_serving_process() -> None:
        process = find_serving(stack)
        kill(process)
        killed.append(process)

    pcm, _, before = synthesize(gateway, on_first_audio=kill_the_serving_process)
    assert killed and not killed[0].alive
    assert 0 < before < len(pcm), "the kill came mid-stream"
    assert_same_samples(fault_free, pcm)
    assert failover_line in logs_of(stack, logged_by)
