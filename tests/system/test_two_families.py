"""Both model families served at once, as processes (`chorus serve --neutts`'s Stack):
the Orpheus pair, the NeuTTS-Air pair (a NeuCodec worker, a NeuTTS token server reading
the demo voice store) and one gateway routing each voice to its family."""

from __future__ import annotations

import grpc
import httpx2 as httpx
import pytest

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from chorus.speech import neutts, orpheus
from ports import free_port_run
from tools.demo_models.neutts_demo import DEMO_VOICE
from tools.supervisor import Stack

pytestmark = pytest.mark.slow


def spoken(stub, voice: str, tokens: int) -> tuple[bytes, common_pb2.SynthesisSummary]:
    sampling = common_pb2.SamplingParams(max_tokens=tokens, seed=7, ignore_end_of_speech=True)
    audio, summary = b"", None
    for message in stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Two families, one gateway.", voice=voice,
                                                                 sampling=sampling), timeout=120):
        if message.WhichOneof("payload") == "audio":
            audio += message.audio.data
        else:
            summary = message.summary
    return audio, summary


def test_one_gateway_speaks_an_orpheus_voice_and_the_neutts_demo_voice(demo_models, tmp_path):
    base = free_port_run(5)  # gateway, token server, codec worker, then the NeuTTS-Air pair
    with Stack(models_dir=demo_models.root, neutts=True, calibrate=False, work_dir=tmp_path / "stack",
               metrics_port=base) as stack:
        assert len(stack.neutts_processes) == 2
        metrics = httpx.get(f"http://{stack.metrics_addresses['NeuTTS token server']}/metrics", timeout=10).text
        with grpc.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
            voices = {v.name for v in stub.ListVoices(gateway_pb2.ListVoicesRequest(), timeout=10).voices}
            neutts_audio, neutts_summary = spoken(stub, DEMO_VOICE, 60)  # 60 NeuCodec frames: 1.2 s
            orpheus_audio, orpheus_summary = spoken(stub, "tara", 7 * 10)  # 10 SNAC frames: 0.85 s
        body = {"model": "tts-1", "input": "Through the OpenAI door.", "voice": DEMO_VOICE, "response_format": "pcm",
                "sampling": {"max_tokens": 50, "ignore_end_of_speech": True}}
        over_http = httpx.post(f"http://{stack.gateway_http_address}/v1/audio/speech", json=body, timeout=120)

    assert {DEMO_VOICE, "tara"} <= voices
    assert "chorus_token_server" in metrics  # the NeuTTS token server's own port, after the Orpheus services
    # PCM16 at 24 kHz: every frame's samples, nothing lost, in each family's frame size.
    assert len(neutts_audio) == 2 * 60 * neutts.SAMPLES_PER_FRAME and neutts_summary.frames == 60
    assert len(orpheus_audio) == 2 * 10 * orpheus.SAMPLES_PER_FRAME and orpheus_summary.frames == 10
    assert over_http.status_code == 200, over_http.text
    assert len(over_http.content) == 2 * 50 * neutts.SAMPLES_PER_FRAME


def test_a_store_voice_speaks_again_after_every_tier_restarts(demo_models, tmp_path):
    """The voice store is on disk, read by each process when a request names a voice:
    killing and restarting the NeuCodec worker, the NeuTTS token server and the gateway
    loses no voice, and the seeded request gets the same audio as before."""
    with Stack(models_dir=demo_models.root, neutts=True, calibrate=False, work_dir=tmp_path / "stack",
               gateway_http_port=None) as stack:
        def speak() -> bytes:
            with grpc.insecure_channel(stack.gateway_address) as channel:
                return spoken(gateway_pb2_grpc.SynthesisServiceStub(channel), DEMO_VOICE, 40)[0]

        before = speak()
        for process in [*stack.neutts_processes, stack.gateway_process]:
            stack.kill(process)
            stack.restart(process)
        after = speak()
    assert len(before) == 2 * 40 * neutts.SAMPLES_PER_FRAME
    assert after == before


def test_the_neutts_pair_gets_its_share_of_the_cpus(monkeypatch):
    """Both families on one machine: the NeuTTS-Air pair's token server and codec worker
    count in the division of the CPUs, so no compute thread is promised a core twice."""
    from chorus.realtime.cpu_budget import CpuBudget
    from tools import supervisor

    monkeypatch.setattr(supervisor, "cpu_budget", lambda: CpuBudget(cpus=8.0, affinity=8, quota=None))
    one = Stack(neutts=False)
    both = Stack(neutts=True)
    assert (one.llama_threads, one.torch_threads) == (4, 4)
    assert (both.llama_threads, both.torch_threads) == (2, 2)
