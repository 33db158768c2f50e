"""The real gateway (grpc.aio on a port) against fake token servers on loopback.

The fakes are real gRPC servers whose Generate emits deterministic PCM: each piece's
audio is a constant that encodes the piece's index, so the order and the joins of a
long text can be read back from the gateway's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket

import grpc
import numpy as np
import pytest
import soundfile as sf

from chorus.orpheus import SAMPLES_PER_FRAME
from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, token_server_pb2, token_server_pb2_grpc
from gateway.config import GatewayConfig
from gateway.joins import FADE_SAMPLES
from gateway.segmenter import split_text
from gateway.server import start_server

PCM = gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_PCM_S16LE)
OPUS_44100 = gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_OGG_OPUS, sample_rate_hz=44100)
TWENTY_SENTENCES = " ".join(f"This is sentence number {i}, spoken by the gateway test." for i in range(20))


def piece_value(index: int) -> int:
    return 100 * (index + 1)


class FakeTokenService(token_server_pb2_grpc.TokenServiceServicer):
    """Emits `2 + len(text) // 20` frames of constant PCM per request, then a summary."""

    def __init__(
        self, fail_with=None, fail_after_frames=None, frame_delay_s=0.0, reported_busy=0, endless=False, codes=None
    ):
        """`codes`: a model stand-in (an int): then each frame's PCM is piece value + frame,
        each audio chunk carries a code digest that depends on `codes`, and replays
        (resume_from_sample, verify_frames) are served as a token server does."""
        self.fail_with = fail_with
        self.codes = codes
        self.fail_after_frames = fail_after_frames
        self.frame_delay_s = frame_delay_s
        self.reported_busy = reported_busy
        self.endless = endless
        self.requests: list[token_server_pb2.GenerateRequest] = []
        self.time_remaining: list[float | None] = []
        self.active = 0
        self.max_active = 0
        self.cancelled = 0
        self.events: list[tuple[str, int]] = []  # ("start" | "audio", piece index), in order

    @staticmethod
    def frames_for(text: str) -> int:
        return 2 + len(text) // 20

    async def Generate(self, request, context):
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        if self.fail_with is not None:
            await context.abort(self.fail_with, "the fake token server refuses")
        index = int(request.request_id.rsplit(".", 1)[1])
        self.events.append(("start", index))
        frames = self.frames_for(request.text)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            frame = 0
            if request.verify_frames:
                yield token_server_pb2.GenerateResponse(codes=self.digest(request, request.verify_frames))
            if request.resume_from_sample:
                frame = request.resume_from_sample // SAMPLES_PER_FRAME
            while self.endless or frame < frames:
                await asyncio.sleep(self.frame_delay_s)
                value = piece_value(index) + (frame if self.codes is not None else 0)
                pcm = np.full(SAMPLES_PER_FRAME, value, dtype="<i2")
                if frame == 0:
                    self.events.append(("audio", index))
                yield token_server_pb2.GenerateResponse(
                    audio=common_pb2.PcmChunk(
                        sample_offset=frame * SAMPLES_PER_FRAME, pcm=pcm.tobytes(), sample_rate_hz=24000
                    ),
                    codes=self.digest(request, frame + 1) if self.codes is not None else None,
                )
                frame += 1
                if frame == self.fail_after_frames:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the fake codec worker died")
            yield token_server_pb2.GenerateResponse(
                summary=common_pb2.SynthesisSummary(
                    request_id=request.request_id,
                    tokens=7 * frames,
                    frames=frames,
                    audio_seconds=frames * SAMPLES_PER_FRAME / 24000,
                    time_to_first_token_ms=1.0,
                    time_to_first_audio_ms=1.1,  # first token 0.1 ms before first audio
                    prompt_tokens=len(request.text),
                    finish_reason="end_of_speech",
                )
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    def digest(self, request, frames: int) -> token_server_pb2.CodeDigest:
        return token_server_pb2.CodeDigest(frames=frames, digest=hash((self.codes, request.sampling.seed, frames)) % 2**64)

    async def GetStatus(self, request, context):
        return token_server_pb2.GetStatusResponse(
            slots_total=4, slots_busy=self.reported_busy + self.active, queue_depth=0, queue_capacity=8
        )


@contextlib.asynccontextmanager
async def token_server(servicer: FakeTokenService):
    server = grpc.aio.server()
    token_server_pb2_grpc.add_TokenServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def gateway(addresses, **overrides):
    running = await start_server(GatewayConfig(token_servers=tuple(addresses), **overrides), port=0)
    channel = grpc.aio.insecure_channel(running.address)
    stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
    stub.channel = channel  # for calls that send raw bytes
    try:
        yield stub
    finally:
        await channel.close()
        await running.stop(0)


async def collect(call):
    """(audio bytes, summary, number of messages), checking that the summary comes last and once."""
    audio, summary, count = [], None, 0
    while (response := await call.read()) is not grpc.aio.EOF:  # read(), not iteration: tests read some first
        count += 1
        assert summary is None, "nothing may follow the summary"
        if response.WhichOneof("payload") == "audio":
            audio.append(response.audio.data)
        else:
            summary = response.summary
    assert summary is not None, "every stream ends with a summary"
    return b"".join(audio), summary, count


def run(coro):
    return asyncio.run(coro)


def free_port_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def in_order(fake: FakeTokenService) -> list[token_server_pb2.GenerateRequest]:
    """The fake's requests by piece index (request ids are "{request}.{index}")."""
    return sorted(fake.requests, key=lambda r: int(r.request_id.rsplit(".", 1)[1]))


def pieces_of(audio: bytes, fake: FakeTokenService) -> list[np.ndarray]:
    """The gateway's PCM cut where each of the fake's pieces should be."""
    pcm = np.frombuffer(audio, dtype="<i2")
    sizes = [fake.frames_for(r.text) * SAMPLES_PER_FRAME for r in in_order(fake)]
    assert pcm.size == sum(sizes)
    return np.split(pcm, np.cumsum(sizes)[:-1])


async def wait_until(predicate, what: str, limit_s: float = 10.0) -> None:
    for _ in range(int(limit_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting: {what}")


# --- validation -------------------------------------------------------------------

BAD_REQUESTS = [
    (dict(text=""), "text is empty"),
    (dict(text="   \n "), "text is empty"),
    (dict(text="... !!!"), "nothing to speak"),
    (dict(text="x" * 101), "at most 100"),
    (dict(text="Hi.", voice="nobody"), "unknown voice 'nobody'"),
    (dict(text="Hi.", audio=gateway_pb2.AudioConfig(encoding=42)), "unsupported audio encoding 42"),
    (dict(text="Hi.", audio=gateway_pb2.AudioConfig(sample_rate_hz=12345)), "sample_rate_hz 12345"),
    (
        dict(text="Hi.", audio=OPUS_44100),
        "AUDIO_ENCODING_OGG_OPUS does not support 44100 Hz",
    ),
    (dict(text="Hi.", sampling=common_pb2.SamplingParams(temperature=3.0)), "sampling.temperature is 3"),
    (dict(text="Hi.", sampling=common_pb2.SamplingParams(top_p=0.0)), "sampling.top_p is 0"),
    (dict(text="Hi.", sampling=common_pb2.SamplingParams(repetition_penalty=float("nan"))), "repetition_penalty"),
    (dict(text="Hi.", request_id="r" * 200), "request_id is 200 characters"),
    (dict(text="Hi.", request_id="a\r\nforged log line"), "request_id has control characters"),
    (dict(text="Hi.", sampling=common_pb2.SamplingParams(max_tokens=6)), "at least 7 (one frame of audio)"),
]


@pytest.mark.parametrize("fields,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_get_invalid_argument_before_any_generation(fields, message):
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], max_text_chars=100) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(**fields)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()
            assert fake.requests == []

    run(scenario())


def test_token_server_statuses_reach_the_client_with_their_origin():
    async def scenario():
        fake = FakeTokenService(fail_with=grpc.StatusCode.INVALID_ARGUMENT)
        async with token_server(fake) as address, gateway([address]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.")))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert address in err.value.details() and "refuses" in err.value.details()

    run(scenario())


# --- Synthesize -------------------------------------------------------------------


def test_synthesize_relays_audio_then_one_summary():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            request = gateway_pb2.SynthesizeRequest(text="Hello there, gateway.", audio=PCM, request_id="req-1")
            audio, summary, count = await collect(stub.Synthesize(request))
        frames = fake.frames_for("Hello there, gateway.")
        assert len(audio) == frames * SAMPLES_PER_FRAME * 2
        assert count >= 2
        assert summary.request_id == "req-1"
        assert summary.frames == frames and summary.tokens == 7 * frames
        assert summary.audio_seconds == pytest.approx(frames * SAMPLES_PER_FRAME / 24000)
        assert summary.time_to_first_audio_ms > 0
        assert 0 < summary.time_to_first_token_ms <= summary.time_to_first_audio_ms
        assert summary.real_time_factor > 0
        assert summary.finish_reason == "end_of_speech"
        assert summary.trace_id == ""
        assert fake.requests[0].voice == "tara"  # the default voice
        assert fake.requests[0].request_id == "req-1.0"

    run(scenario())


def test_long_text_is_pipelined_in_order_with_no_gap():
    async def scenario():
        fake = FakeTokenService(frame_delay_s=0.002)
        async with token_server(fake) as address, gateway([address], segment_target_chars=120) as stub:
            request = gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES, audio=PCM)
            audio, summary, _ = await collect(stub.Synthesize(request))
        texts = [r.text for r in in_order(fake)]
        assert texts == split_text(TWENTY_SENTENCES, 120)
        assert len(texts) > 5
        # The audio is the pieces back to back: nothing inserted, nothing dropped.
        pieces = pieces_of(audio, fake)
        assert summary.frames == sum(fake.frames_for(t) for t in texts)
        assert len(audio) == summary.frames * SAMPLES_PER_FRAME * 2
        for index, piece in enumerate(pieces):
            assert (piece[FADE_SAMPLES:-FADE_SAMPLES] == piece_value(index)).all(), f"piece {index} out of place"
            # Faded at both ends, so no join steps: the edge samples are near zero.
            assert abs(int(piece[0])) < piece_value(index) / 10 and abs(int(piece[-1])) < piece_value(index) / 10
        # One piece ahead of the one being relayed (lookahead 1), never more.
        assert fake.max_active == 2

    run(scenario())


def test_a_five_minute_text_starts_with_its_first_sentence_alone():
    async def scenario():
        fake = FakeTokenService(frame_delay_s=0.001)
        five_minutes = "Short start. " + " ".join(f"Then comes sentence {i} of a long read." for i in range(120))
        async with token_server(fake) as address, gateway([address]) as stub:
            call = stub.Synthesize(gateway_pb2.SynthesizeRequest(text=five_minutes, audio=PCM))
            await call.read()
            await wait_until(lambda: ("start", 1) in fake.events, "the second piece to start")
            call.cancel()
        assert in_order(fake)[0].text == "Short start."
        # The second piece starts only after the first one's audio: nothing competes
        # with the first piece for the backbone before the first audio.
        assert fake.events.index(("audio", 0)) < fake.events.index(("start", 1))

    run(scenario())


def test_seed_is_passed_down_distinct_per_piece():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], segment_target_chars=60) as stub:
            sampling = common_pb2.SamplingParams(temperature=0.5, seed=7)
            request = gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES[:200], sampling=sampling)
            await collect(stub.Synthesize(request))
        seeds = sorted(r.sampling.seed for r in fake.requests)
        assert seeds == list(range(7, 7 + len(fake.requests)))
        assert all(r.sampling.temperature == pytest.approx(0.5) for r in fake.requests)

    run(scenario())


def test_a_request_without_a_seed_gets_one_and_the_summary_reports_it():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], segment_target_chars=60) as stub:
            _, unseeded, _ = await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES[:200])))
            first = sorted(r.sampling.seed for r in fake.requests)
            fake.requests.clear()
            sampling = common_pb2.SamplingParams(temperature=0.5)  # sampling set, seed not
            _, other, _ = await collect(
                stub.Synthesize(gateway_pb2.SynthesizeRequest(text=TWENTY_SENTENCES[:200], sampling=sampling))
            )
            second = sorted(r.sampling.seed for r in fake.requests)
        return unseeded, first, other, second

    unseeded, first, other, second = run(scenario())
    assert all(r for r in (first, second)) and len(first) > 1
    # Each piece derives its own seed from the request's, which the summary reports.
    assert first == list(range(unseeded.seed, unseeded.seed + len(first)))
    assert second == list(range(other.seed, other.seed + len(second)))
    assert unseeded.seed != other.seed  # drawn per request


def test_encoded_output_is_resampled_and_decodes():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            audio = gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_WAV, sample_rate_hz=16000)
            data, summary, _ = await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.", audio=audio)))
        samples, rate = sf.read(io.BytesIO(data), dtype="int16")
        assert rate == 16000
        expected = round(summary.frames * SAMPLES_PER_FRAME * 16000 / 24000)
        assert abs(samples.size - expected) <= 1
        assert summary.audio_seconds == pytest.approx(samples.size / 16000)

    run(scenario())


# --- routing ------------------------------------------------------------------------


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


# --- deadlines and cancellation ------------------------------------------------------


def test_client_deadline_is_passed_down():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], request_deadline_s=600) as stub:
            await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello."), timeout=30))
            await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.")))
        with_deadline, without = fake.time_remaining
        # (gRPC rounds timeouts on the wire up to a coarser unit, hence the slack.)
        assert 0 < with_deadline <= 31
        assert 500 < without <= 601  # the gateway's default applies

    run(scenario())


def test_expired_deadline_is_deadline_exceeded_and_stops_generation():
    async def scenario():
        fake = FakeTokenService(endless=True, frame_delay_s=0.01)
        async with token_server(fake) as address, gateway([address]) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.", audio=PCM), timeout=0.5))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: fake.active == 0, "the token server's call to end")
            assert len(fake.requests) == 1

    run(scenario())


def test_client_going_away_cancels_generation():
    async def scenario():
        fake = FakeTokenService(endless=True, frame_delay_s=0.01)
        async with token_server(fake) as address, gateway([address]) as stub:
            call = stub.Synthesize(gateway_pb2.SynthesizeRequest(text="Hello.", audio=PCM))
            await call.read()  # audio is flowing
            call.cancel()
            await wait_until(lambda: fake.cancelled == 1 and fake.active == 0, "the token server's call to end")

    run(scenario())


# --- StreamingSynthesize --------------------------------------------------------------


def streaming(*messages):
    config = gateway_pb2.StreamingSynthesizeRequest(
        config=gateway_pb2.StreamingSynthesizeConfig(audio=PCM, request_id="bidi")
    )
    return [config, *messages]


def text(piece: str):
    return gateway_pb2.StreamingSynthesizeRequest(text=piece)


FLUSH = gateway_pb2.StreamingSynthesizeRequest(flush=gateway_pb2.Flush())
END = gateway_pb2.StreamingSynthesizeRequest(end=gateway_pb2.EndOfInput())


def test_streaming_speaks_text_as_it_arrives():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            call = stub.StreamingSynthesize()
            for message in streaming(text("Hello wor"), text("ld. How are")):
                await call.write(message)
            # A complete sentence is spoken before any more text or the end arrives.
            first = await call.read()
            assert first.WhichOneof("payload") == "audio"
            assert [r.text for r in fake.requests] == ["Hello world."]
            for message in (text(" you"), FLUSH, text(" Bye now."), END):
                await call.write(message)
            audio, summary, _ = await collect(call)
        audio = first.audio.data + audio
        spoken = " ".join(r.text for r in in_order(fake))
        assert spoken == "Hello world. How are you Bye now."
        assert summary.request_id == "bidi"
        assert summary.frames == sum(fake.frames_for(r.text) for r in fake.requests)
        assert len(audio) == summary.frames * SAMPLES_PER_FRAME * 2

    run(scenario())


def test_streaming_half_close_ends_input():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            call = stub.StreamingSynthesize(iter(streaming(text("No end marker, just a half-close"))))
            audio, summary, _ = await collect(call)
        assert [r.text for r in fake.requests] == ["No end marker, just a half-close"]
        assert len(audio) == summary.frames * SAMPLES_PER_FRAME * 2 > 0

    run(scenario())


STREAMING_MISTAKES = [
    ([text("Hello.")], "must carry `config`"),
    (streaming(END), "without any text"),
    (streaming(text("Hi."), streaming()[0]), "only be sent once"),
    (streaming(gateway_pb2.StreamingSynthesizeRequest()), "empty StreamingSynthesize message"),
    (streaming(text("x" * 101)), "at most 100"),
    ([], "closed before its first message"),
]


@pytest.mark.parametrize("messages,message", STREAMING_MISTAKES, ids=[m for _, m in STREAMING_MISTAKES])
def test_streaming_mistakes_get_invalid_argument(messages, message):
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], max_text_chars=100) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.StreamingSynthesize(iter(messages)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()

    run(scenario())


def test_streaming_text_sent_far_ahead_of_speech_is_refused():
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], max_text_chars=100) as stub:
            # No sentence end, so nothing can be spoken yet, and 120 characters wait.
            messages = streaming(text("word " * 12), text("word " * 12), END)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub.StreamingSynthesize(iter(messages)))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "120 characters are waiting" in err.value.details()

    run(scenario())


def test_streaming_message_with_invalid_utf8_ends_the_call_at_once():
    """Defect: a third message carrying invalid UTF-8 left the call hanging until its deadline."""
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address]) as stub:
            channel = stub.channel
            raw = channel.stream_stream(
                "/tts.v1.SynthesisService/StreamingSynthesize",
                request_serializer=lambda b: b, response_deserializer=gateway_pb2.StreamingSynthesizeResponse.FromString,
            )
            call = raw(timeout=60)
            await call.write(streaming()[0].SerializeToString())
            await call.write(text("Hello.").SerializeToString())
            await call.write(b"\x12\x02\xff\xfe")  # field 2 (text): two bytes that are not UTF-8
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass
            return err.value

    err = run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "UTF-8" in err.details()


@pytest.mark.parametrize("messages", [[], [text("Hello there.")]], ids=["config only", "text, then silence"])
def test_streaming_call_that_never_closes_ends_at_the_request_deadline(messages):
    """Defect: with --request-deadline 15 a StreamingSynthesize that never closed was still open at 45 s."""
    async def scenario():
        fake = FakeTokenService()
        async with token_server(fake) as address, gateway([address], request_deadline_s=1.0) as stub:
            # The gateway's deadline is the shorter one; the client's only bounds the test.
            call = stub.StreamingSynthesize(timeout=60)
            for message in streaming(*messages):
                await call.write(message)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass
            return err.value

    err = run(scenario())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "waiting for more text" in err.details()


@pytest.mark.parametrize("method, raw", [
    ("Synthesize", b"\x0a\x02\xff\xfe"),  # text: invalid UTF-8
    ("Synthesize", b"\xff\xff\xff"),  # not protobuf at all
    ("GetLimits", b"\x0a\x05ab"),  # a length running past the end
])
def test_undecodable_request_bytes_are_invalid_argument(method, raw):
    """Defect: grpc answered a request that does not parse with UNKNOWN and a Python exception name."""
    async def scenario():
        async with token_server(FakeTokenService()) as address, gateway([address]) as stub:
            channel = stub.channel
            if method == "Synthesize":
                call = channel.unary_stream(f"/tts.v1.SynthesisService/{method}",
                                            request_serializer=lambda b: b, response_deserializer=lambda b: b)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call(raw, timeout=30):
                        pass
            else:
                call = channel.unary_unary(f"/tts.v1.SynthesisService/{method}",
                                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(raw, timeout=30)
            # The same gateway still answers a good request.
            limits = await stub.GetLimits(gateway_pb2.GetLimitsRequest(), timeout=30)
            return err.value, limits

    err, limits = run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "does not parse" in err.details()
    assert limits.max_text_chars > 0


# --- discovery ------------------------------------------------------------------------


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


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="at least one token server"):
        GatewayConfig(token_servers=())
    with pytest.raises(ValueError, match="must be host:port"):
        GatewayConfig(token_servers=("localhost",))
    with pytest.raises(ValueError, match="default voice"):
        GatewayConfig(token_servers=("a:1",), voices=("leo",), default_voice="tara")


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

