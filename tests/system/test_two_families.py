"""Both model families served at once, as processes (`chorus serve` beside demo models, or its Stack):
the Orpheus pair, the NeuTTS-Air pair (a NeuCodec worker, a NeuTTS token server reading
the demo voice store) and one gateway routing each voice to its family."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from chorus.speech import neutts, orpheus
from ports import free_port_run
from tools.demo_models.neutts_demo import DEMO_VOICE
from tools import serve
from tools.supervisor import Stack, serves_neutts_by_default

ROOT = Path(__file__).resolve().parents[2]

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


def test_chorus_serve_on_demo_models_serves_both_families_through_one_gateway(demo_models, tmp_path):
    """`chorus serve --models DIR` with no family flag, as a process: beside demo models
    it builds and serves the NeuTTS-Air pair too, and one gateway speaks an Orpheus voice
    and the NeuTTS demo voice, every frame's samples."""
    base = free_port_run(5)  # gateway, token server, codec worker, then the NeuTTS-Air pair
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHORUS_NO_CALIBRATE": "1"}
    log = (tmp_path / "serve.log").open("w+")
    serve = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "serve", "--models", str(demo_models.root), "--gateway-port", "0",
         "--http-port", "0", "--metrics-port", str(base)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops" not in (printed := Path(log.name).read_text()):
            assert serve.poll() is None, printed[-3000:]
            assert time.monotonic() < deadline, printed[-3000:]
            time.sleep(0.2)
        gateway_address = next(line.split()[1] for line in printed.splitlines() if line.startswith("gateway: "))
        http_address = next(line.split("//")[1].split("/")[0] for line in printed.splitlines()
                            if line.startswith("HTTP: "))
        metrics = httpx.get(f"http://127.0.0.1:{base + 4}/metrics", timeout=10).text
        with grpc.insecure_channel(gateway_address) as channel:
            stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
            voices = {v.name for v in stub.ListVoices(gateway_pb2.ListVoicesRequest(), timeout=10).voices}
            neutts_audio, neutts_summary = spoken(stub, DEMO_VOICE, 60)  # 60 NeuCodec frames: 1.2 s
            orpheus_audio, orpheus_summary = spoken(stub, "tara", 7 * 10)  # 10 SNAC frames: 0.85 s
        body = {"model": "tts-1", "input": "Through the OpenAI door.", "voice": DEMO_VOICE, "response_format": "pcm",
                "sampling": {"max_tokens": 50, "ignore_end_of_speech": True}}
        over_http = httpx.post(f"http://{http_address}/v1/audio/speech", json=body, timeout=120)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        finally:
            if serve.poll() is None:
                serve.kill()

    assert "NeuTTS-Air: voices in" in printed and "NeuTTS token server http://" in printed
    assert {DEMO_VOICE, "tara"} <= voices
    assert "chorus_token_server" in metrics  # the NeuTTS token server's own port, after the Orpheus services
    # PCM16 at 24 kHz: every frame's samples, nothing lost, in each family's frame size.
    assert len(neutts_audio) == 2 * 60 * neutts.SAMPLES_PER_FRAME and neutts_summary.frames == 60
    assert len(orpheus_audio) == 2 * 10 * orpheus.SAMPLES_PER_FRAME and orpheus_summary.frames == 10
    assert over_http.status_code == 200, over_http.text
    assert len(over_http.content) == 2 * 50 * neutts.SAMPLES_PER_FRAME


def test_chorus_serve_serves_neutts_beside_demo_models_or_its_folder_and_never_beside_weights_alone(tmp_path):
    from tools.demo_models.build import MANIFEST

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "orpheus.gguf").write_bytes(b"GGUF")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / MANIFEST).write_text("{}")
    assert serves_neutts_by_default(tmp_path / "missing") and serves_neutts_by_default(demo)
    assert not serves_neutts_by_default(weights)
    assert serves_neutts_by_default(weights, demo_models=True)
    (weights / "neutts").mkdir()
    assert serves_neutts_by_default(weights)
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(), "serve", "")
    assert parser.parse_args(["serve"]).neutts is None
    assert parser.parse_args(["serve", "--no-neutts"]).neutts is False
    assert parser.parse_args(["serve", "--neutts"]).neutts is True


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


def test_voices_cloned_through_every_door_speak_through_every_door_and_outlive_every_tier(demo_models, tmp_path,
                                                                                          capsys):
    """A voice registered over tts.v1 (`chorus voices --add`), one over HTTP and one from
    a zero-shot prompt sent by NVIDIA's `nvidia-riva-client`, encoded by the NeuCodec
    worker's real encoder (demo weights) into the stack's voice store; each speaks
    through tts.v1, the Riva client and OpenAI's `openai` package, and after the
    NeuCodec worker, the NeuTTS token server and the gateway are each killed and
    restarted, every one is still there and gives the same seeded audio."""
    import base64
    import json

    import numpy as np
    import openai

    from chorus.speech.voice_store import VoiceStore
    from services.codec_worker.neucodec_encoder import load_neucodec_encoder
    from support.speechlike import recording
    from tools import cli

    riva_script = ROOT / "tests" / "support" / "riva_client_run.py"
    store_root = tmp_path / "voices"
    transcript = "Hello, this is my voice."
    sampling = {"max_tokens": 30, "seed": 7, "ignore_end_of_speech": True}
    riva_sampling = {key: str(value).lower() for key, value in sampling.items()}

    def riva(address: str, **options) -> bytes:
        done = subprocess.run([sys.executable, str(riva_script), address, "synthesize", json.dumps(
            {"text": "Riva speaks it.", "sample_rate_hz": 24_000, "custom_configuration": riva_sampling,
             **options})], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return base64.b64decode(json.loads(done.stdout.strip().splitlines()[-1])["audio"])

    with Stack(models_dir=demo_models.root, neutts=True, calibrate=False, work_dir=tmp_path / "stack",
               voice_store=store_root) as stack:
        def speak_everywhere(voice: str) -> tuple[bytes, bytes, bytes]:
            with grpc.insecure_channel(stack.gateway_address) as channel:
                over_tts = spoken(gateway_pb2_grpc.SynthesisServiceStub(channel), voice, 40)[0]
            over_riva = riva(stack.gateway_address, voice_name=voice)
            with openai.OpenAI(base_url=f"http://{stack.gateway_http_address}/v1", api_key="chorus", max_retries=0,
                               timeout=120) as client:
                over_openai = client.audio.speech.create(model="neutts-air", voice=voice, input="OpenAI speaks it.",
                                                         response_format="pcm",
                                                         extra_body={"sampling": sampling}).content
            return over_tts, over_riva, over_openai

        reference = tmp_path / "reference.wav"
        reference.write_bytes(recording(2.0))
        # tts.v1's RegisterVoice, as `chorus voices --add` sends it.
        added = cli.main(["voices", "--gateway", stack.gateway_address, "--add", "grpc-voice", "--audio",
                          str(reference), "--transcript", transcript])
        registered = capsys.readouterr().out
        prompt = tmp_path / "prompt.wav"
        prompt.write_bytes(recording(3.0, level=0.5))
        zero_shot = riva(stack.gateway_address, zero_shot_audio_prompt_file=str(prompt),
                         zero_shot_transcript="A prompt for Riva.")
        over_http = httpx.post(f"http://{stack.gateway_http_address}/v1/audio/voices", timeout=120, json={
            "name": "http-voice", "transcript": transcript,
            "audio": base64.b64encode(recording(2.5, rate=48_000, fmt="FLAC")).decode()})
        assert over_http.status_code == 201, over_http.text
        voices = ["grpc-voice", "http-voice", *(n for n in VoiceStore(store_root).names() if n.startswith("zero"))]
        before = {voice: speak_everywhere(voice) for voice in voices}
        for process in [*stack.neutts_processes, stack.gateway_process]:
            stack.kill(process)
            stack.restart(process)
        after = {voice: speak_everywhere(voice) for voice in voices}

    assert added == 0 and "registered grpc-voice" in registered and "100 frames" in registered
    assert over_http.json()["reference_frames"] == 125
    assert len(zero_shot) == 2 * 30 * neutts.SAMPLES_PER_FRAME and len(voices) == 3
    for voice in voices:
        over_tts, over_riva, over_openai = before[voice]
        assert len(over_tts) == 2 * 40 * neutts.SAMPLES_PER_FRAME
        assert len(over_riva) == len(over_openai) == 2 * 30 * neutts.SAMPLES_PER_FRAME
    assert after == before
    # What the store holds are the real encoder's codes of the stored 16 kHz reference.
    encoder = load_neucodec_encoder(demo_models.root / "neutts" / "neucodec")
    for voice in voices:
        stored = VoiceStore(store_root).get(voice)
        np.testing.assert_array_equal(stored.codes["neucodec_24khz"], encoder.encode(stored.reference))
