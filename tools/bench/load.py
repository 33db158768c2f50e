"""Drives one concurrency level through a gateway and records what each listener got.

Closed loop: `concurrency` callers each send a request, read its audio to the end,
and send the next, until `requests` were sent or `max_seconds` passed (no new request
starts after that; those in flight finish). Every request asks for the same fixed
length (`ignore_end_of_speech` with `max_tokens`), so that every level does the same
work per request and a batch keeps its size for the whole request. Raw PCM at 24 kHz:
the cheapest encoding, so the gateway's encoder does not weigh on the figures.

For each request the record keeps the send time, every audio chunk's arrival time and
sample count, and the final status: enough to replay it through a listener's
playback clock afterwards (report.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from chorus.rpc.serving import GRPC_OPTIONS
from chorus.speech import orpheus

TEXT = "Benchmarks speak the same sentence, so that every request costs the same."


@dataclass
class RequestRecord:
    index: int
    sent_at: float  # time.monotonic()
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, samples at 24 kHz)
    code: str = "OK"
    details: str = ""
    ended_at: float | None = None
    summary_ttfa_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttfa_s(self) -> float | None:
        return self.chunks[0][0] - self.sent_at if self.chunks else None


@dataclass
class LevelRun:
    concurrency: int
    started_at: float
    ended_at: float
    records: list[RequestRecord]


@dataclass(frozen=True)
class BenchFamily:
    """What the load sweep asks of one model family: a voice of it, and the frames of
    its codec (a request's length is set in frames)."""

    name: str
    voice: str  # "" for the gateway's default voice
    codes_per_frame: int
    frame_seconds: float
    default_frames: int  # about 5.12 s of audio

    @property
    def tokens_per_frame(self) -> int:
        return self.codes_per_frame


FAMILIES = {
    "orpheus": BenchFamily("orpheus", "", orpheus.CODES_PER_FRAME, orpheus.FRAME_SECONDS, 60),
    # The demo NeuTTS-Air family's only voice (tools/demo_models/neutts_demo.py).
    "neutts-air": BenchFamily("neutts-air", "demo", 1, 0.02, 256),
}


def fixed_length_request(index: int, frames: int, text: str = TEXT,
                         family: BenchFamily = FAMILIES["orpheus"]) -> gateway_pb2.SynthesizeRequest:
    return gateway_pb2.SynthesizeRequest(
        text=text,
        voice=family.voice,
        audio=gateway_pb2.AudioConfig(encoding=gateway_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=orpheus.SAMPLE_RATE),
        sampling=common_pb2.SamplingParams(
            max_tokens=frames * family.tokens_per_frame, ignore_end_of_speech=True, seed=index
        ),
        request_id=f"bench-{index}",
    )


async def _one(stub, index: int, frames: int, timeout_s: float, family: BenchFamily) -> RequestRecord:
    record = RequestRecord(index, time.monotonic())
    call = stub.Synthesize(fixed_length_request(index, frames, family=family), timeout=timeout_s)
    try:
        async for response in call:
            now = time.monotonic()
            if response.WhichOneof("payload") == "audio":
                samples = len(response.audio.data) // 2
                if samples:
                    record.chunks.append((now, samples))
            else:
                record.summary_ttfa_ms = response.summary.time_to_first_audio_ms
    except grpc.aio.AioRpcError as err:
        record.code, record.details = err.code().name, err.details() or ""
    record.ended_at = time.monotonic()
    return record


async def run_level(
    address: str,
    concurrency: int,
    requests: int,
    frames: int,
    max_seconds: float,
    timeout_s: float,
    first_index: int = 0,
    on_done: Callable[[RequestRecord], None] = lambda record: None,
    family: BenchFamily = FAMILIES["orpheus"],
) -> LevelRun:
    records: list[RequestRecord] = []
    issued = 0
    started = time.monotonic()

    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = gateway_pb2_grpc.SynthesisServiceStub(channel)

        async def caller() -> None:
            nonlocal issued
            while issued < requests and time.monotonic() - started < max_seconds:
                index = first_index + issued
                issued += 1
                record = await _one(stub, index, frames, timeout_s, family)
                records.append(record)
                on_done(record)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return LevelRun(concurrency, started, time.monotonic(), sorted(records, key=lambda r: r.index))
