"""The gateway's discovery RPCs and its listener accounting (underruns against the playback
clock), against fake token servers.
"""

from __future__ import annotations

import asyncio

from chorus.proto.tts.v1 import gateway_pb2

from fake_token_server import FakeTokenService, PCM, collect, gateway, run, token_server


def test_voices_and_limits():
    async def scenario():
        async with token_server(FakeTokenService()) as address:
            choice = dict(voices=("leo", "tara", "mia"), default_voice="tara")
            async with gateway([address], max_text_chars=500, **choice) as stub:
                voices = await stub.ListVoices(gateway_pb2.ListVoicesRequest())
                limits = await stub.GetLimits(gateway_pb2.GetLimitsRequest())
        assert [v.name for v in voices.voices] == ["tara", "leo", "mia"]
        assert all(v.description for v in voices.voices)
        assert limits.max_text_chars == 500
        assert set(limits.encodings) == {1, 2, 3, 4, 5, 6, 7, 8}
        assert 24000 in limits.sample_rates_hz and 8000 in limits.sample_rates_hz
        assert limits.native_sample_rate_hz == 24000

    run(scenario())


def test_a_starved_listener_counts_underruns_and_stall_seconds():
    """Audio that arrives after the listener's playback clock needs it is an underrun:
    the token server sends one frame (85 ms), then stalls for a second."""
    from gateway import metrics

    stalls_before = metrics.UNDERRUNS._value.get()
    stall_seconds_before = metrics.STALL_SECONDS._value.get()

    class Stalling(FakeTokenService):
        async def Generate(self, request, context):
            count = 0
            async for response in super().Generate(request, context):
                if response.HasField("audio") and count == 1:
                    await asyncio.sleep(1.0)  # far longer than the 150 ms buffer and 85 ms of audio
                count += 1
                yield response

    async def scenario():
        async with token_server(Stalling()) as address, gateway([address], start_buffer_s=0.15) as stub:
            return await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello there.", audio=PCM)))

    _, summary, _ = asyncio.run(scenario())
    assert summary.underruns >= 1
    assert summary.stall_seconds > 0.5  # at least the second, less what was buffered
    assert metrics.UNDERRUNS._value.get() >= stalls_before + 1
    assert metrics.STALL_SECONDS._value.get() > stall_seconds_before + 0.5
