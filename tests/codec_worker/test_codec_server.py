"""The codec worker over real gRPC (grpc.aio on port 0), with the demo SNAC weights."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc, common_pb2
from chorus.speech.orpheus import CODEBOOK_SIZE, CODES_PER_FRAME, SAMPLE_RATE, SAMPLES_PER_FRAME
from chorus.telemetry import tracing
from services.codec_worker.config import CodecWorkerConfig
from services.codec_worker.server import SERVICE_NAME, start_server


@contextlib.asynccontextmanager
async def codec_worker(snac_dir, **overrides):
    config = CodecWorkerConfig(model_dir=snac_dir, device="cpu", **{"calibrate": False, **overrides})
    running = await start_server(config, port=0)
    channel = grpc.aio.insecure_channel(running.address)
    try:
        yield running, codec_pb2_grpc.CodecServiceStub(channel), channel
    finally:
        await channel.close()
        await running.stop(1)


def start(**fields) -> codec_pb2.DecodeRequest:
    return codec_pb2.DecodeRequest(start=codec_pb2.DecodeStart(request_id="test", deterministic=True, **fields))


def frames(first: int, codes) -> codec_pb2.DecodeRequest:
    return codec_pb2.DecodeRequest(
        frames=common_pb2.CodeFrames(first_frame_index=first, codes=np.asarray(codes).reshape(-1).tolist())
    )


def random_codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CODEBOOK_SIZE, (n, CODES_PER_FRAME))


async def good_requests(n_frames: int, chunk: int = 1, pause: float = 0.0, first: int = 0, **start_fields):
    yield start(first_frame_index=first, **start_fields)
    codes = random_codes(n_frames, seed=first)
    for lo in range(0, n_frames, chunk):
        yield frames(first + lo, codes[lo : lo + chunk])
        if pause:
            await asyncio.sleep(pause)


async def decode(stub, requests) -> tuple[int, int, bool]:
    """Returns (first sample offset, samples, ended with final) and checks contiguity."""
    first, total, final = None, 0, False
    async for response in stub.Decode(requests):
        assert not final, "nothing may follow the final message"
        if response.HasField("audio"):
            audio = response.audio
            assert audio.sample_rate_hz == SAMPLE_RATE
            if first is None:
                first = audio.sample_offset
            assert audio.sample_offset == first + total
            total += len(audio.pcm) // 2
        final = response.final
    return first, total, final


def test_good_stream_returns_every_sample(snac_dir):
    async def run():
        async with codec_worker(snac_dir) as (_, stub, _):
            return await decode(stub, good_requests(10, chunk=3))

    first, total, final = asyncio.run(run())
    assert (first, total, final) == (0, 10 * SAMPLES_PER_FRAME, True)


def test_resumed_stream_starts_at_resume_point(snac_dir):
    resume = 8 * SAMPLES_PER_FRAME + 5

    async def run():
        async with codec_worker(snac_dir) as (_, stub, _):
            return await decode(stub, good_requests(6, first=5, resume_from_sample=resume))

    first, total, final = asyncio.run(run())
    assert (first, total, final) == (resume, 11 * SAMPLES_PER_FRAME - resume, True)


# A grpc.aio client whose write (or half-close) lands after the server ended the call
# reports INTERNAL "Internal error from Core" instead of the server's status
# (grpc/grpc#36066). So the bad clients here write nothing after the bad message: they
# hold the stream open until the server ends it.


async def hold_open():
    await asyncio.Event().wait()


def bad_after_good(bad: codec_pb2.DecodeRequest):
    async def requests():
        yield start()
        yield frames(0, random_codes(3))
        yield bad
        await hold_open()

    return requests()


async def frames_before_start():
    yield frames(0, random_codes(1))
    await hold_open()


BAD_STREAMS = {
    "wrong_count": (lambda: bad_after_good(frames(3, [1] * 6)), "frame 3: got 6 codes"),
    "code_4096": (lambda: bad_after_good(frames(3, [1] * 6 + [4096])), "frame 3: code 4096"),
    "code_minus_1": (lambda: bad_after_good(frames(3, [[1] * 7, [1, 2, -1, 3, 4, 5, 6]])), "frame 4: code -1"),
    "gap": (lambda: bad_after_good(frames(5, random_codes(1))), "frame 5: expected frame 3"),
    "before_start": (frames_before_start, "frame 0: frames sent before DecodeStart"),
    # Once answered UNKNOWN ("Value out of range"): frames and samples must stay in int64.
    "first_frame_2_62": (lambda: opened_with(start(first_frame_index=2**62)), "first_frame_index 4611686018427387904"),
    "resume_2_62": (lambda: opened_with(start(resume_from_sample=2**62)), "resume_from_sample 4611686018427387904"),
}


async def opened_with(first: codec_pb2.DecodeRequest):
    # The start alone: the refusal answers it, and frames written behind a refused start
    # race the server's abort (grpc then reports INTERNAL "Internal error from Core").
    yield first
    await hold_open()


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_bad_frames_are_invalid_argument_and_spare_other_streams(snac_dir, case):
    make_bad, message = BAD_STREAMS[case]

    async def run():
        async with codec_worker(snac_dir) as (_, stub, _):
            # The good stream trickles its frames, so it is mid-flight when the bad one fails.
            good = asyncio.create_task(decode(stub, good_requests(8, pause=0.05)))
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await decode(stub, make_bad())
            return err.value, await good

    err, good = asyncio.run(run())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()
    assert good == (0, 8 * SAMPLES_PER_FRAME, True)


def test_health_load_limit_and_cancel(snac_dir):
    async def run():
        async with codec_worker(snac_dir, max_streams=1) as (running, stub, channel):
            health = health_pb2_grpc.HealthStub(channel)
            statuses = [
                (await health.Check(health_pb2.HealthCheckRequest(service=name))).status
                for name in ("", SERVICE_NAME)
            ]
            idle = await stub.GetLoad(codec_pb2.GetLoadRequest())

            async def held_open():
                yield start()
                yield frames(0, random_codes(4))
                await hold_open()

            call = stub.Decode(held_open())
            await call.read()  # audio for the first frames: the stream is open
            busy = await stub.GetLoad(codec_pb2.GetLoadRequest())
            # The worker refuses before reading anything; a client that writes
            # nothing sees the refusal itself (see hold_open).
            refused = stub.Decode()
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await refused.read()
            call.cancel()
            engine = running.components["engine"]
            for _ in range(100):
                after = await stub.GetLoad(codec_pb2.GetLoadRequest())
                if after.open_streams == 0 and engine.open_streams == 0:
                    break
                await asyncio.sleep(0.02)
            decoder_streams = engine.open_streams
            # The slot is free again.
            again = await decode(stub, good_requests(2))
            return statuses, idle, busy, over.value, after, decoder_streams, again

    statuses, idle, busy, over, after, decoder_streams, again = asyncio.run(run())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert (idle.open_streams, idle.max_streams, idle.device) == (0, 1, "cpu")
    assert busy.open_streams == 1
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after.open_streams == 0
    assert decoder_streams == 0, "a cancelled stream's decoder state must go"
    assert again == (0, 2 * SAMPLES_PER_FRAME, True)


def test_decode_is_traced_with_its_first_audio(snac_dir, receiver):
    tracing.setup_tracing(tracing.CODEC_WORKER, receiver.endpoint)

    async def run():
        async with codec_worker(snac_dir) as (_, stub, _):
            return await decode(stub, good_requests(4))

    assert asyncio.run(run())[2]
    tracing.flush_tracing()
    spans = receiver.spans()
    resource, decode_span = spans["/tts.v1.CodecService/Decode"]
    _, first_audio = spans["codec_worker.first_audio"]
    assert resource["service.name"] == tracing.CODEC_WORKER
    assert first_audio.trace_id == decode_span.trace_id
    assert first_audio.parent_span_id == decode_span.span_id
    attributes = {a.key: a.value for a in decode_span.attributes}
    assert attributes["chorus.request_id"].string_value == "test"
    assert attributes["chorus.samples"].int_value == 4 * SAMPLES_PER_FRAME


def test_concurrent_streams_cancelled_mid_audio_detach_cleanly(snac_dir, receiver, caplog):
    """Under concurrent load, streams whose client goes away while audio flows are
    dropped by grpc.aio at a yield: each must end its span as CANCELLED and free its
    decoder, without "Failed to detach context" (a trace context detached in
    another task than the one that attached it)."""
    tracing.setup_tracing(tracing.CODEC_WORKER, receiver.endpoint)
    streams = 8

    async def run():
        async with codec_worker(snac_dir) as (running, stub, _):
            async def held_open(seed):
                yield start()
                yield frames(0, random_codes(6, seed=seed))
                await hold_open()

            calls = [stub.Decode(held_open(i)) for i in range(streams)]
            for call in calls:
                await call.read()  # audio is flowing on every stream
            for call in calls:
                call.cancel()
            engine = running.components["engine"]
            for _ in range(200):
                if engine.open_streams == 0 and (await stub.GetLoad(codec_pb2.GetLoadRequest())).open_streams == 0:
                    break
                await asyncio.sleep(0.02)
            gc.collect()
            await asyncio.sleep(0.2)
            return engine.open_streams

    with caplog.at_level(logging.ERROR):
        assert asyncio.run(run()) == 0
    assert not [r for r in caplog.records if "detach" in r.getMessage()]
    assert tracing.flush_tracing()
    decodes = [s for r in receiver.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans
               if s.name == "/tts.v1.CodecService/Decode"]
    assert len(decodes) == streams
    assert {(s.status.code, s.status.message.split(":")[0]) for s in decodes} == {(2, "CANCELLED")}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"device": "tpu"}, "device must be one of"),
        ({"device": "cpu", "half": True}, "half precision needs CUDA"),
        ({"max_streams": 0}, "max_streams must be"),
        ({"batch_wait_ms": -1.0}, "batch_wait_ms must be"),
        ({"torch_threads": 0}, "torch_threads must be 1..1024"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        CodecWorkerConfig(model_dir=tmp_path, **overrides)


def test_the_worker_lists_its_codec_and_refuses_a_stream_of_another(snac_dir):
    """GetLoad lists what the worker decodes; a DecodeStart naming another codec is
    FAILED_PRECONDITION with both names, and the worker goes on decoding its own,
    named or left empty (a token server from before DecodeStart.codec)."""
    async def run():
        async with codec_worker(snac_dir) as (_, stub, _):
            load = await stub.GetLoad(codec_pb2.GetLoadRequest())
            # The start alone: frames behind a start the worker refuses race the refusal
            # inside grpc's client (INTERNAL "Internal error from Core").
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await decode(stub, iter([start(codec="neucodec_24khz")]))
            with pytest.raises(grpc.aio.AioRpcError) as huge:
                await decode(stub, iter([start(codec="x" * 100_000)]))
            named = await decode(stub, good_requests(2, codec="snac_24khz"))
            unnamed = await decode(stub, good_requests(2))
            return list(load.codecs), refused.value, huge.value, named, unnamed

    codecs, refused, huge, named, unnamed = asyncio.run(run())
    assert codecs == ["snac_24khz"]
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "snac_24khz" in refused.details() and "'neucodec_24khz'" in refused.details()
    # A name of any length is refused the same way, its echo cut short.
    assert huge.code() == grpc.StatusCode.FAILED_PRECONDITION and len(huge.details()) < 400
    assert named == unnamed == (0, 2 * SAMPLES_PER_FRAME, True)
