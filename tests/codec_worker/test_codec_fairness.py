"""The codec worker's stream cap is not a door: streams that send nothing end, and no
one client can take every stream.

Without certificates a client is a connection: one client comes over IPv4, the other
over IPv6 (the worker listens on "localhost", 127.0.0.1 and ::1), so that each has its
own (a process's channels to one address share one). test_codec_share.py has two
clients on one address.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from chorus.proto.tts.v1 import codec_pb2_grpc
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from services.codec_worker import metrics
from services.codec_worker.config import CodecWorkerConfig
from services.codec_worker.server import start_server
from test_codec_server import decode, frames, good_requests, hold_open, random_codes, start

pytestmark = pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)


@contextlib.asynccontextmanager
async def worker_with_two_clients(snac_dir, **overrides):
    # calibrate=False: nothing here measures capacity (start with the limits, seconds sooner).
    config = CodecWorkerConfig(model_dir=snac_dir, device="cpu", host="localhost", **{"calibrate": False, **overrides})
    running = await start_server(config, port=0)
    ipv4 = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    ipv6 = grpc.aio.insecure_channel(f"[::1]:{running.port}")
    try:
        yield running, codec_pb2_grpc.CodecServiceStub(ipv4), codec_pb2_grpc.CodecServiceStub(ipv6)
    finally:
        await ipv4.close()
        await ipv6.close()
        await running.stop(1)


async def open_calls() -> int:
    """Decode calls the worker holds, started or not (GetLoad counts only started ones)."""
    return int(metrics.REGISTRY.get_sample_value("chorus_codec_worker_streams"))


async def until(condition, what: str, attempts: int = 1200) -> None:
    """Polls an async condition; the bound is generous, so it only catches a hang."""
    for _ in range(attempts):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def all_closed(running):
    """Condition: no stream open at the servicer, and none left holding decoder state
    (the engine drops a cancelled stream at its next step)."""

    async def condition() -> bool:
        return await open_calls() == 0 and running.components["engine"].open_streams == 0

    return condition


def test_a_client_holding_idle_streams_leaves_room_for_another(snac_dir):
    """One client opens the cap's worth of streams and sends nothing: it gets its share,
    the rest are refused for it alone, and a second client is still served."""

    refused_before = metrics.REGISTRY.get_sample_value("chorus_codec_worker_refused_calls_total",
                                                       {"reason": "client_limit"}) or 0.0

    async def run():
        # Timeouts out of the way: this is about the share, not idleness.
        async with worker_with_two_clients(snac_dir, max_streams=4, start_timeout_s=600) as (_, hog, polite):
            held = [hog.Decode() for _ in range(4)]  # no messages: idle from the start

            async def settled():
                return await open_calls() + sum(call.done() for call in held) == len(held)

            await until(settled, "every idle stream accepted or refused")
            still_open = await open_calls()
            served = await decode(polite, good_requests(3))
            refused = [(await call.code(), await call.details()) for call in held if call.done()]
            for call in held:
                call.cancel()
            return still_open, served, refused

    still_open, served, refused = asyncio.run(run())
    assert served == (0, 3 * SAMPLES_PER_FRAME, True)
    assert still_open == 2, "the default share of one client is half the streams"
    assert len(refused) == 2
    for code, details in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "streams, the most one client may hold" in details
    assert metrics.REGISTRY.get_sample_value("chorus_codec_worker_refused_calls_total",
                                             {"reason": "client_limit"}) - refused_before == 2


def test_the_share_of_one_client_is_configurable(snac_dir):
    async def run():
        limits = dict(max_streams=4, max_streams_per_client=1, start_timeout_s=600)
        async with worker_with_two_clients(snac_dir, **limits) as (_, hog, polite):
            first = hog.Decode()
            await until(lambda: _is(open_calls(), 1), "the first stream is open")
            second = hog.Decode()
            code = await second.code()
            served = await decode(polite, good_requests(2))
            first.cancel()
            return code, served

    code, served = asyncio.run(run())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served == (0, 2 * SAMPLES_PER_FRAME, True)


async def _is(value, expected) -> bool:
    return await value == expected


def test_a_stream_without_decode_start_ends_after_the_start_timeout(snac_dir):
    async def run():
        async with worker_with_two_clients(snac_dir, start_timeout_s=0.3) as (running, hog, _):
            call = hog.Decode()
            code, details = await call.code(), await call.details()
            await until(all_closed(running), "the idle stream is closed")
            return code, details

    code, details = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no DecodeStart within 0.3 s" in details


def test_a_stream_that_stops_sending_frames_ends_after_the_idle_timeout(snac_dir):
    """The idle timeout holds from DecodeStart even when the start timeout is far longer
    (the watch once slept out the start timeout first: a 0.5 s idle timeout ended a
    stream after 10 s). With an hour to start, only the idle timeout can end it within
    the test's bound."""

    async def run():
        async with worker_with_two_clients(snac_dir, idle_timeout_s=0.5, start_timeout_s=3600) as (running, hog, _):
            async def stalls():
                yield start()
                yield frames(0, random_codes(3))
                await hold_open()

            call = hog.Decode(stalls())
            audio = 0

            async def read_until_it_ends() -> None:
                nonlocal audio
                async for response in call:
                    audio += len(response.audio.pcm) // 2

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(read_until_it_ends(), timeout=60)  # a hang fails here, it does not block
            await until(all_closed(running), "the stalled stream is closed")
            return err.value, audio

    err, audio = asyncio.run(run())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "nothing from the client for 0.5 s" in err.details()
    assert audio > 0, "audio decoded before the stall still reaches the client"


def test_a_client_that_never_reads_its_audio_loses_the_stream(snac_dir):
    """Frames in, PCM never read: the worker's writes wait on flow control for ever
    unless the idle timeout counts reads too."""

    async def run():
        async with worker_with_two_clients(snac_dir, idle_timeout_s=0.5, start_timeout_s=3600,
                                           max_streams=2) as (running, _, polite):
            # No flow-control window growth: the PCM of 40 frames (160 KB) overfills
            # the 64 KB window, so the worker ends up waiting in a write.
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.http2.bdp_probe", 0)])
            hog = codec_pb2_grpc.CodecServiceStub(channel)
            call = hog.Decode()
            await call.write(start())
            codes = random_codes(40)
            for lo in range(0, 40, 20):
                await call.write(frames(lo, codes[lo : lo + 20]))
            await until(all_closed(running), "the unread stream is closed")
            served = await decode(polite, good_requests(2))
            call.cancel()
            await channel.close()
            return served

    assert asyncio.run(run()) == (0, 2 * SAMPLES_PER_FRAME, True)


def test_a_slow_but_live_stream_is_not_idle(snac_dir):
    """Frames that keep coming, each sooner than the idle timeout, keep the stream."""

    async def run():
        # 12 frames 0.25 s apart: the stream lives 3 s, longer than the 2 s timeout.
        async with worker_with_two_clients(snac_dir, idle_timeout_s=2.0) as (_, stub, _):
            return await decode(stub, good_requests(12, pause=0.25))

    assert asyncio.run(run()) == (0, 12 * SAMPLES_PER_FRAME, True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"idle_timeout_s": 0}, "idle_timeout_s must be"),
        ({"start_timeout_s": -1.0}, "start_timeout_s must be"),
        ({"max_streams": 4, "max_streams_per_client": 5}, "max_streams_per_client must be"),
    ],
)
def test_config_rejects_bad_limits(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        CodecWorkerConfig(model_dir=tmp_path, **overrides)
