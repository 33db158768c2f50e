"""The gateway's test neighbours: fake token servers (real gRPC servers on loopback)
whose Generate emits deterministic PCM, and the real gateway started against them.

Each piece's audio is a constant that encodes the piece's index, so the order and the
joins of a long text can be read back from the gateway's output."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import numpy as np

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, token_server_pb2, token_server_pb2_grpc
from chorus.speech.orpheus import SAMPLES_PER_FRAME
from gateway.config import GatewayConfig
from gateway.server import start_server

PCM = gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_PCM_S16LE)
OPUS_44100 = gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_OGG_OPUS, sample_rate_hz=44100)
TWENTY_SENTENCES = " ".join(f"This is sentence number {i}, spoken by the gateway test." for i in range(20))


def piece_value(index: int) -> int:
    return 100 * (index + 1)


class FakeTokenService(token_server_pb2_grpc.TokenServiceServicer):
    """Emits `2 + len(text) // 20` frames of constant PCM per request, then a summary."""

    def __init__(
        self, fail_with=None, fail_after_frames=None, frame_delay_s=0.0, reported_busy=0, endless=False, codes=None,
        family="", encode_fails_with=None,
    ):
        """`codes`: a model stand-in (an int): then each frame's PCM is piece value + frame,
        each audio chunk carries a code digest that depends on `codes`, and replays
        (resume_from_sample, verify_frames) are served as a token server does."""
        self.fail_with = fail_with
        self.family = family  # what GetStatus reports ("" as a server from before the field)
        self.encode_fails_with = encode_fails_with  # (code, details) EncodeReference answers with
        self.encoded: list[token_server_pb2.EncodeReferenceRequest] = []
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

    async def EncodeReference(self, request, context):
        """One code per 320 samples (NeuCodec's 50 Hz at 16 kHz), from the samples' level."""
        self.encoded.append(request)
        if self.encode_fails_with is not None:
            await context.abort(*self.encode_fails_with)
        samples = np.asarray(request.audio.samples, np.float32)
        frames = samples[: samples.size // 320 * 320].reshape(-1, 320)
        codes = (np.abs(frames).mean(axis=1) * 65535).astype(np.int32)
        return token_server_pb2.EncodeReferenceResponse(
            codes=common_pb2.ReferenceCodes(codec="neucodec_24khz", codes=codes.tolist()))

    async def GetStatus(self, request, context):
        return token_server_pb2.GetStatusResponse(
            slots_total=4, slots_busy=self.reported_busy + self.active, queue_depth=0, queue_capacity=8,
            family=self.family,
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
