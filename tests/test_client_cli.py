"""`chorus say` and `chorus voices` as a user runs them, against the real gateway in
this process and a fake token server (the end-to-end suite runs them on the real stack)."""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from chorus.orpheus import SAMPLES_PER_FRAME
from gateway.config import GatewayConfig
from gateway.server import start_server
from audio_check import decode
from tests.test_gateway_server import FakeTokenService, token_server


async def chorus(*args: str) -> tuple[int, bytes, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode, out, err.decode()


def with_gateway(scenario):
    async def run():
        fake = FakeTokenService()
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
