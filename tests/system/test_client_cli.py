"""`chorus say` and `chorus voices` as a user runs them, against the real gateway in
this process and a fake token server (the end-to-end suite runs them on the real stack)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
import wave

import grpc
import numpy as np
import pytest
import soundfile as sf

from chorus.speech.orpheus import SAMPLES_PER_FRAME
from gateway.config import GatewayConfig
from gateway.server import start_server
from audio_check import assert_decoded_length, decode
from fake_token_server import FakeTokenService, token_server
from tools.supervisor import StackError, locate_models

pytestmark = pytest.mark.slow  # over 15 s: started first (tests/conftest.py)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


async def chorus(*args: str, cwd=None) -> tuple[int, bytes, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    out, err = await process.communicate()
    return process.returncode, out, err.decode()


def with_gateway(scenario, fake_factory=FakeTokenService):
    async def run():
        fake = fake_factory()
        async with token_server(fake) as address:
            running = await start_server(GatewayConfig(token_servers=(address,)), port=0)
            try:
                await scenario(running.address, fake)
            finally:
                await running.stop(0)

    asyncio.run(run())


def test_say_writes_the_format_of_the_file_extension(tmp_path):
    async def scenario(address, fake):
        out = tmp_path / "nested" / "hello.mp3"
        code, _, err = await chorus(
            "say", "Hello there.", "-o", str(out), "--gateway", address, "--sample-rate", "22050"
        )
        assert code == 0, err
        assert "time to first audio" in err and "wrote" in err
        samples, rate = decode("mp3", 22050, out.read_bytes())
        assert rate == 22050 and samples.size > 0

    with_gateway(scenario)


def test_say_to_stdout_streams_raw_audio():
    async def scenario(address, fake):
        code, out, err = await chorus("say", "Hi.", "-o", "-", "--encoding", "pcm", "--gateway", address)
        assert code == 0, err
        frames = fake.frames_for(fake.requests[0].text)
        assert np.frombuffer(out, "<i2").size == frames * SAMPLES_PER_FRAME

    with_gateway(scenario)


def test_say_reports_a_bad_request_and_leaves_no_file(tmp_path):
    async def scenario(address, fake):
        out = tmp_path / "x.wav"
        code, _, err = await chorus("say", "Hi.", "-o", str(out), "--voice", "nobody", "--gateway", address)
        assert code == 1
        assert "INVALID_ARGUMENT" in err and "unknown voice" in err
        assert not out.exists()

    with_gateway(scenario)


def test_voices_lists_the_default_first():
    async def scenario(address, fake):
        code, out, err = await chorus("voices", "--gateway", address)
        assert code == 0, err
        first = out.decode().splitlines()[0]
        assert first.startswith("tara") and "(default)" in first

    with_gateway(scenario)


def test_unreachable_gateway_gets_a_hint():
    async def scenario(address, fake):
        code, _, err = await chorus("voices", "--gateway", "127.0.0.1:1", "--timeout", "5")
        assert code == 1 and "UNAVAILABLE" in err and "chorus serve" in err

    with_gateway(scenario)


def test_unavailable_from_a_running_gateway_gets_no_connection_hint():
    async def scenario(address, fake):
        code, _, err = await chorus("say", "Hi.", "-o", "-", "--gateway", address, "--timeout", "20")
        assert code == 1 and "UNAVAILABLE" in err and "no token server could take" in err
        assert "is a gateway running" not in err

    with_gateway(scenario, lambda: FakeTokenService(fail_with=grpc.StatusCode.UNAVAILABLE))


@pytest.mark.parametrize("name,fmt_name", [("a.flac", "flac"), ("a.aac", "aac"), ("a.alaw", "alaw"),
                                           ("a.ogg", "opus"), ("a.ulaw", "mulaw")])
def test_every_extension_gets_its_own_format(tmp_path, name, fmt_name):
    async def scenario(address, fake):
        out = tmp_path / name
        code, _, err = await chorus("say", "Hello there.", "-o", str(out), "--gateway", address,
                                    "--sample-rate", "16000")
        assert code == 0, err
        assert f"({fmt_name}," in err
        samples, rate = decode(fmt_name, 16000, out.read_bytes())
        assert rate == 16000
        frames = fake.frames_for(fake.requests[0].text)
        assert_decoded_length(fmt_name, samples.size, round(frames * SAMPLES_PER_FRAME * 16000 / 24000), 16000)

    with_gateway(scenario)


def test_wav_and_flac_files_get_their_real_length_in_the_header(tmp_path):
    async def scenario(address, fake):
        for name in ("a.wav", "a.flac"):
            code, _, err = await chorus("say", "Hello there.", "-o", str(tmp_path / name), "--gateway", address)
            assert code == 0, err
        frames = fake.frames_for(fake.requests[0].text) * SAMPLES_PER_FRAME
        with wave.open(str(tmp_path / "a.wav")) as w:
            assert w.getnframes() == frames  # was 2147483647 with the streaming sizes
        assert sf.info(str(tmp_path / "a.wav")).frames == frames
        assert sf.info(str(tmp_path / "a.flac")).frames == frames
        data, _ = sf.read(str(tmp_path / "a.flac"), dtype="int16")
        assert data.size == frames

    with_gateway(scenario)


@pytest.mark.parametrize("args,message", [
    (["-o", "a.m4a"], "'.m4a' is not an audio format"),
    (["-o", "a.txt"], "aac (.aac, .adts)"),
    (["-o", "a.flac", "--encoding", "wav"], "names flac but --encoding is wav"),
])
def test_an_extension_that_does_not_match_the_bytes_is_refused(tmp_path, args, message):
    async def scenario(address, fake):
        args[1] = str(tmp_path / args[1])
        code, _, err = await chorus("say", "Hi.", *args, "--gateway", address)
        assert code == 2 and message in err, err
        assert not fake.requests and not list(tmp_path.iterdir())

    with_gateway(scenario)


def test_say_without_output_writes_out_wav(tmp_path):
    async def scenario(address, fake):
        code, _, err = await chorus("say", "--gateway", address, "Hello there.", cwd=tmp_path)
        assert code == 0, err
        with wave.open(str(tmp_path / "out.wav")) as w:
            assert w.getnframes() == fake.frames_for(fake.requests[0].text) * SAMPLES_PER_FRAME

    with_gateway(scenario)


# --- chorus serve --models: never overwrite what Chorus did not create ----------------


def _fingerprint(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture()
def real_weights(demo_models, tmp_path):
    """A folder laid out like real weights (a GGUF and a SNAC folder) that Chorus did not write."""
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(demo_models.gguf, folder / "orpheus-3b-q4_k_m.gguf")
    shutil.copytree(demo_models.snac_dir, folder / "snac_24khz")
    return folder


def test_real_weights_are_served_as_they_are(real_weights):
    before = _fingerprint(real_weights)
    models = locate_models(real_weights)
    assert (models.gguf.name, models.snac_dir.name, models.demo) == ("orpheus-3b-q4_k_m.gguf", "snac_24khz", False)
    with pytest.raises(StackError, match="refusing to build demo models"):
        locate_models(real_weights, demo=True)
    assert _fingerprint(real_weights) == before


def test_a_folder_of_other_files_is_refused_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "a.gguf").write_bytes(b"not really")
    before = _fingerprint(tmp_path)
    with pytest.raises(StackError, match="one SNAC folder"):
        locate_models(tmp_path)
    with pytest.raises(StackError, match="refusing"):
        locate_models(tmp_path, demo=True)
    assert _fingerprint(tmp_path) == before


def test_demo_models_are_built_only_where_nothing_else_is(tmp_path):
    models = locate_models(tmp_path / "new")
    assert models.demo and models.gguf.is_file() and (models.snac_dir / "config.json").is_file()
    again = locate_models(tmp_path / "new", demo=True)  # its own folder: reused
    assert again == models
