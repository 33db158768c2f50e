"""The clients people already have, against the running stack as separate processes
(tools.supervisor.Stack): NVIDIA's `nvidia-riva-client`, OpenAI's `openai` package,
Server-Sent Events, and the browser page in headless Chromium.

Lengths are exact where the format allows: requests use a seeded, fixed-length budget
(`ignore_end_of_speech` with `max_tokens`), so the audio is exactly FRAMES frames.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx2 as httpx
import numpy as np
import openai
import pytest
import soundfile

from audio_check import assert_decoded_length, decode
from chorus.proto.tts.v1 import common_pb2, token_server_pb2, token_server_pb2_grpc
from chorus.speech.orpheus import SAMPLE_RATE, SAMPLES_PER_FRAME
from tools.supervisor import Stack

pytestmark = pytest.mark.slow

FRAMES = 12
FIXED = {"max_tokens": 7 * FRAMES, "ignore_end_of_speech": True, "seed": 7}
RIVA_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "riva_client_run.py"


@pytest.fixture(scope="module")
def stack(demo_models, tmp_path_factory):
    with Stack(calibrate=False, models_dir=demo_models.root, slots=4, work_dir=tmp_path_factory.mktemp("client-apis")) as running:
        yield running


@pytest.fixture(scope="module")
def openai_client(stack):
    with openai.OpenAI(base_url=f"http://{stack.gateway_http_address}/v1", api_key="chorus", max_retries=0,
                       timeout=120) as client:
        yield client


def riva(stack, mode: str, **options) -> dict:
    done = subprocess.run([sys.executable, str(RIVA_SCRIPT), stack.gateway_address, mode, json.dumps(options)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary_of(result: dict) -> common_pb2.SynthesisSummary:
    assert result["summary_bin"], "the summary travels in trailing metadata"
    return common_pb2.SynthesisSummary.FromString(base64.b64decode(result["summary_bin"]))


def expected_samples(rate: int, frames: int = FRAMES) -> int:
    return round(frames * SAMPLES_PER_FRAME * rate / SAMPLE_RATE)


# --- Riva ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding,fmt_name,rate", [
    ("LINEAR_PCM", "pcm", 22050), ("FLAC", "flac", 16000), ("MULAW", "mulaw", 8000), ("ALAW", "alaw", 8000),
    ("OGGOPUS", "opus", 48000),
])
def test_riva_synthesize_returns_the_whole_audio(stack, encoding, fmt_name, rate):
    result = riva(stack, "synthesize", text="Riva clients speak unchanged.", encoding=encoding, sample_rate_hz=rate,
                  voice_name="English-US.Female-1", custom_configuration={k: str(v) for k, v in FIXED.items()})
    audio = base64.b64decode(result["audio"])
    samples, decoded_rate = decode(fmt_name, rate, audio)
    assert decoded_rate == rate
    summary = summary_of(result)
    assert summary.frames == FRAMES
    if fmt_name == "flac":  # sent whole, so its header says its length (a streamed one says "unknown")
        assert soundfile.info(io.BytesIO(audio)).frames == samples.size
    assert_decoded_length(fmt_name, samples.size, expected_samples(rate), rate)
    assert result["readable"]["chorus-request-id"] == summary.request_id


def test_riva_synthesize_online_streams_chunks_and_echoes_the_id(stack):
    # The client's default rate (22050) and encoding (LINEAR_PCM); several texts, one stream.
    texts = ["The first text of the stream.", "And a second one."]
    result = riva(stack, "online", text=texts, custom_configuration={k: str(v) for k, v in FIXED.items()})
    pcm = np.frombuffer(base64.b64decode(result["audio"]), "<i2")
    summary = summary_of(result)
    assert summary.frames == 2 * FRAMES  # each text its own piece, each FRAMES long
    assert abs(pcm.size - expected_samples(22050, 2 * FRAMES)) <= 1
    assert result["responses"] > 1  # streamed, not one blob
    assert float(result["readable"]["chorus-audio-seconds"]) == pytest.approx(pcm.size / 22050, abs=1e-3)


def test_riva_config_lists_voices_that_synthesize_accepts(stack):
    [config] = riva(stack, "config")
    parameters = config["parameters"]
    assert parameters["language_code"] == "en-US"
    first = parameters["voice_name"] + "." + parameters["subvoices"].split(",")[0].split(":")[0]
    assert first == "English-US.Female-1"
    result = riva(stack, "synthesize", text="Hi there.", voice_name=first, sample_rate_hz=24000,
                  custom_configuration={k: str(v) for k, v in FIXED.items()})
    assert len(base64.b64decode(result["audio"])) == 2 * expected_samples(24000)


def test_riva_bad_input_gets_invalid_argument(stack):
    done = subprocess.run(
        [sys.executable, str(RIVA_SCRIPT), stack.gateway_address, "synthesize",
         json.dumps({"text": "Hi.", "custom_configuration": {"temperatur": "0.5"}})],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "INVALID_ARGUMENT" in done.stderr and "unknown key 'temperatur'" in done.stderr


# --- OpenAI --------------------------------------------------------------------------


def _busy_slots(stack) -> int:
    address = stack.token_server_processes[0].address
    with grpc.insecure_channel(address) as channel:
        status = token_server_pb2_grpc.TokenServiceStub(channel).GetStatus(
            token_server_pb2.GetStatusRequest(), timeout=10
        )
    return status.slots_busy


def test_openai_streaming_response_starts_before_generation_ends(stack, openai_client):
    long = {"max_tokens": 7 * 150, "ignore_end_of_speech": True, "seed": 3}
    with openai_client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="This answer streams while it is generated.", response_format="pcm",
        extra_body={"sampling": long},
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        chunks = response.iter_bytes()
        first = next(chunks)
        assert first
        # The first bytes are here and the backbone is still generating the rest.
        assert _busy_slots(stack) >= 1
        rest = b"".join(chunks)
    assert (len(first) + len(rest)) // 2 == 150 * SAMPLES_PER_FRAME


@pytest.mark.parametrize("fmt_name", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_openai_every_response_format_decodes_to_the_right_length(openai_client, fmt_name):
    with openai_client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="nova", input="Every format decodes.", response_format=fmt_name,
        extra_body={"sampling": FIXED},
    ) as response:
        data = b"".join(response.iter_bytes())
    rate = 48000 if fmt_name == "opus" else SAMPLE_RATE
    samples, decoded_rate = decode(fmt_name, SAMPLE_RATE, data)
    if fmt_name == "opus":
        assert decoded_rate in (SAMPLE_RATE, 48000)
        rate = decoded_rate
    assert_decoded_length(fmt_name, samples.size, expected_samples(rate), rate)


def test_openai_speed_time_stretches(openai_client):
    data = openai_client.audio.speech.create(
        model="tts-1", voice="echo", input="Twice as fast.", response_format="pcm", speed=2.0,
        extra_body={"sampling": FIXED},
    ).read()
    expected = expected_samples(SAMPLE_RATE) / 2
    assert abs(len(data) // 2 - expected) <= expected * 0.02 + 240


def test_openai_errors_are_openai_shaped(openai_client):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
    assert err.value.status_code == 400
    assert "unknown voice 'nobody'" in err.value.body["message"]


def test_sse_streams_deltas_then_done_with_usage(stack):
    body = {"model": "tts-1", "input": "Server-sent events carry the audio.", "voice": "tara",
            "response_format": "pcm", "stream_format": "sse", "sampling": FIXED}
    events = []
    with httpx.stream("POST", f"http://{stack.gateway_http_address}/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) > 1 and events[-1]["type"] == "speech.audio.done"
    assert [e["type"] for e in events].count("speech.audio.done") == 1
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(pcm) // 2 == expected_samples(SAMPLE_RATE)
    usage = events[-1]["usage"]
    assert usage["output_tokens"] == 7 * FRAMES and usage["total_tokens"] == usage["input_tokens"] + 7 * FRAMES


# --- the browser page ----------------------------------------------------------------

SCREENSHOT = Path(__file__).resolve().parents[2] / "out" / "browser-page.png"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed here when missing (as root, which CI is)."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if Path(path).exists():
        return path
    steps = [["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]]
    for step in steps:
        done = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", *step[1:]], capture_output=True, text=True,
                              timeout=1200, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            pytest.fail(f"headless Chromium is needed and `{' '.join(step)}` failed "
                        f"(run it as root, or install Debian's chromium):\n{done.stderr[-2000:]}")
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("apt-get installed chromium but /usr/bin/chromium is missing")
    return "/usr/bin/chromium"


@contextlib.contextmanager
def browser_page(http_address: str, chromium: str, profile: Path, sampling: dict):
    """The gateway's page in headless Chromium, its voices loaded; `sampling` goes in the
    page's query (tts.v1 sampling parameters, bounding each request's length)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
        )
        try:
            page = browser.new_page()
            page.goto(f"http://{http_address}/?sampling={quote(json.dumps(sampling))}")
            page.wait_for_function("document.querySelectorAll('#voice option').length > 0")
            yield page
        finally:
            browser.close()


def test_browser_page_plays_the_stream_as_it_arrives(stack, chromium, tmp_path, capsys):
    sampling = {"max_tokens": 7 * 40, "ignore_end_of_speech": True, "seed": 5}
    with browser_page(stack.gateway_http_address, chromium, tmp_path / "profile", sampling) as page:
        assert page.locator("#voice option").first.get_attribute("value") == "tara"
        page.fill("#text", "A sentence for the browser to play.")
        page.click("#speak")
        page.wait_for_function("window.chorus.done", timeout=180_000)
        stats = page.evaluate("window.chorus")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    with capsys.disabled():
        print(f"\n[browser] screenshot: {SCREENSHOT}; page stats: {stats}")
    assert stats["error"] is None
    assert stats["receivedSamples"] == 40 * SAMPLES_PER_FRAME
    # Every received sample was played by Web Audio (counted as each buffer ended).
    assert stats["playedSamples"] == stats["receivedSamples"]
    assert stats["ttfaMs"] > 0 and stats["lateChunks"] >= 0


def test_browser_page_clones_a_voice_from_a_recording_and_speaks_with_it(demo_models, chromium, tmp_path):
    """The page's clone form: a recording file and its words go to POST
    /v1/audio/voices (JSON, base64), the new voice is listed and picked, and Speak plays
    it through the NeuTTS-Air pair, every sample. A second clone under the same name is
    refused with the gateway's message, shown on the page."""
    from chorus.speech import neutts
    from chorus.speech.voice_store import VoiceStore
    from support.speechlike import recording

    reference = tmp_path / "me.wav"
    reference.write_bytes(recording(2.0))
    sampling = {"max_tokens": 30, "ignore_end_of_speech": True, "seed": 5}
    with Stack(calibrate=False, models_dir=demo_models.root, neutts=True, voice_store=tmp_path / "voices",
               work_dir=tmp_path / "stack") as stack, \
            browser_page(stack.gateway_http_address, chromium, tmp_path / "profile", sampling) as page:
        def clone() -> object:
            page.evaluate("window.chorus.cloned = null")
            page.fill("#clone-name", "page-voice")
            page.fill("#clone-transcript", "Hello, this is my voice.")
            page.set_input_files("#clone-audio", str(reference))
            page.click("#clone")
            page.wait_for_function("window.chorus.cloned !== null", timeout=120_000)
            return page.evaluate("window.chorus.cloned")

        cloned = clone()
        picked = page.locator("#voice").input_value()
        page.fill("#text", "Spoken in a cloned voice.")
        page.click("#speak")
        page.wait_for_function("window.chorus.done", timeout=180_000)
        stats = page.evaluate("window.chorus")
        again = clone()
        refusal = page.locator("#clone-state").inner_text()
    assert cloned == picked == "page-voice"
    assert VoiceStore(tmp_path / "voices").get("page-voice").codes["neucodec_24khz"].size == 100
    assert stats["error"] is None and stats["receivedSamples"] == 30 * neutts.SAMPLES_PER_FRAME
    assert stats["playedSamples"] == stats["receivedSamples"]
    assert again is False and "already registered" in refusal
