"""Routing over token servers: least loaded first, retries on refusal, sample-exact
failover, and the status when every server is full or missing.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from chorus.proto.tts.v1 import common_pb2, gateway_pb2
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from gateway.joins import FADE_SAMPLES
from gateway.router import Router

from fake_token_server import FakeTokenService, PCM, collect, free_port_address, gateway, piece_value, run, token_server

@pytest.mark.parametrize("failure", ["down", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_refused_call_is_retried_on_another_token_server(failure):
    async def scenario():
        good = FakeTokenService(reported_busy=3)  # looks busier, so the bad one is tried first
        bad = FakeTokenService(fail_with=None if failure == "down" else failure)
        async with token_server(good) as good_address, token_server(bad) as bad_address:
            first = free_port_address() if failure == "down" else bad_address
            async with gateway([first, good_address]) as stub:
                request = gateway_pb2.SynthesizeRequest(text="Hello.", audio=PCM)
                audio, summary, _ = await collect(stub.Synthesize(request))
        assert len(audio) == summary.frames * SAMPLES_PER_FRAME * 2 > 0
        assert len(good.requests) == 1
        if failure != "down":
            assert len(bad.requests) == 1  # tried first, refused, not tried again

    run(scenario())


def test_least_loaded_token_server_is_picked():
    async def scenario():
        busy, idle = FakeTokenService(reported_busy=4), FakeTokenService()
        async with token_server(busy) as busy_address, token_server(idle) as idle_address:
            async with gateway([busy_address, idle_address]) as stub:
                for _ in range(3):
                    await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.", audio=PCM)))
        assert (len(busy.requests), len(idle.requests)) == (0, 3)

    run(scenario())


def test_a_failure_after_audio_without_code_digests_is_not_replayed():
    async def scenario():
        failing = FakeTokenService(fail_after_frames=1)
        spare = FakeTokenService(reported_busy=3)
        async with token_server(failing) as a, token_server(spare) as b, gateway([a, b]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                request = gateway_pb2.SynthesizeRequest(text="Hello there, all of you.", audio=PCM)
                await collect(stub.Synthesize(request))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "codec worker died" in err.value.details()
        assert spare.requests == []

    run(scenario())


REPLAYED_TEXT = "Hello there, all of you, how are we all doing on this fine day?"  # one piece, 5 frames


async def audio_until_error(call) -> tuple[bytes, grpc.aio.AioRpcError | None, common_pb2.SynthesisSummary | None]:
    audio, summary = [], None
    try:
        async for response in call:
            if response.WhichOneof("payload") == "audio":
                audio.append(response.audio.data)
            else:
                summary = response.summary
    except grpc.aio.AioRpcError as err:
        return b"".join(audio), err, summary
    return b"".join(audio), None, summary


def test_a_server_failing_mid_stream_is_replaced_sample_for_sample():
    request = gateway_pb2.SynthesizeRequest(
        text=REPLAYED_TEXT, audio=PCM, sampling=common_pb2.SamplingParams(seed=77)
    )

    async def scenario():
        async with token_server(FakeTokenService(codes=1)) as alone, gateway([alone]) as stub:
            fault_free, _, _ = await collect(stub.Synthesize(request))
        failing = FakeTokenService(codes=1, fail_after_frames=2)
        spare = FakeTokenService(codes=1, reported_busy=3)  # ranked second
        async with token_server(failing) as a, token_server(spare) as b, gateway([a, b]) as stub:
            audio, summary, _ = await collect(stub.Synthesize(request))
        return fault_free, audio, summary, failing, spare

    fault_free, audio, summary, failing, spare = run(scenario())
    assert FakeTokenService.frames_for(REPLAYED_TEXT) == 5
    assert audio == fault_free
    assert len(audio) // 2 == 5 * SAMPLES_PER_FRAME
    # The replay: same request and seed, resumed after the 2 frames relayed, checked
    # against their digest before any of its audio was taken.
    [first], [replay] = failing.requests, spare.requests
    assert replay.sampling.seed == first.sampling.seed == 77
    assert replay.text == first.text and replay.request_id == first.request_id
    assert (replay.resume_from_sample, replay.verify_frames) == (2 * SAMPLES_PER_FRAME, 2)
    # Its schedule is the resume sample's: due no later than the first attempt's clock
    # (started at its first audio, 0.15 s of buffer) says, which is in under 0.15 s + 2 frames.
    assert replay.playback.HasField("first_sample_due_in_s")
    assert replay.playback.first_sample_due_in_s < 0.15 + 2 * SAMPLES_PER_FRAME / 24000
    assert summary.seed == 77


def test_a_replay_with_other_codes_is_unavailable_and_plays_nothing_of_it():
    request = gateway_pb2.SynthesizeRequest(
        text=REPLAYED_TEXT, audio=PCM, sampling=common_pb2.SamplingParams(seed=77)
    )

    async def scenario():
        failing = FakeTokenService(codes=1, fail_after_frames=2)
        other_model = FakeTokenService(codes=2, reported_busy=3)
        async with token_server(failing) as a, token_server(other_model) as b, gateway([a, b]) as stub:
            audio, err, summary = await audio_until_error(stub.Synthesize(request))
        return audio, err, summary, other_model

    audio, err, summary, other_model = run(scenario())
    assert summary is None and err is not None
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "different codes" in err.details()
    assert len(other_model.requests) == 1
    # Only the failed server's audio, and none of the replay's (piece value + frame 2+).
    pcm = np.frombuffer(audio, dtype="<i2")
    assert pcm.size <= 2 * SAMPLES_PER_FRAME
    assert set(np.unique(pcm[FADE_SAMPLES:])) <= {piece_value(0), piece_value(0) + 1}


def test_all_token_servers_full_is_resource_exhausted():
    async def scenario():
        fakes = [FakeTokenService(fail_with=grpc.StatusCode.RESOURCE_EXHAUSTED) for _ in range(2)]
        async with token_server(fakes[0]) as a, token_server(fakes[1]) as b, gateway([a, b]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.")))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert a in err.value.details() and b in err.value.details()

    run(scenario())


def test_no_token_server_resolved_is_unavailable_not_at_capacity():
    """With nothing to route to, "at capacity, retry with backoff" would send clients
    into a retry loop against servers that do not exist."""
    async def scenario():
        async with gateway(["nowhere.invalid:50051"]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello."), timeout=20))
        return err.value

    err = run(scenario())
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "no token server is resolved or reachable" in err.details()


def test_ranking_reads_the_servers_and_changes_nothing():
    async def scenario():
        router = Router(("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
        try:
            await router.start()  # none answers: all equally (un)loaded
            first, again = router.ranked(0), router.ranked(0)
            rotated = router.ranked(1)
        finally:
            await router.close()
        return [s.address for s in first], [s.address for s in again], [s.address for s in rotated]

    first, again, rotated = run(scenario())
    assert first == again == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    assert rotated == ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"]


def test_polling_survives_a_poll_that_fails_unexpectedly():
    # A router whose poll loop ended on one unexpected error never saw a restarted
    # token server again (the soak's "token server did not rejoin").
    async def scenario():
        service = FakeTokenService()
        async with token_server(service) as address:
            router = Router((address,), status_interval_s=0.01)
            told: list[bool] = []

            async def on_availability(available: bool) -> None:
                told.append(available)
                if len(told) == 2:
                    raise RuntimeError("a poll that fails in a way nobody planned for")

            router.on_availability = on_availability
            await router.start()
            try:
                for _ in range(500):
                    if len(told) >= 5:
                        break
                    await asyncio.sleep(0.01)
            finally:
                await router.close()
        assert len(told) >= 5, told  # polling went on past the failing poll
        assert all(told)

    run(scenario())
