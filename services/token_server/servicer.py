"""tts.v1.TokenService: adapts RPCs to the engine and the codec relay.

Validation and status codes live here; scheduling lives in the engine, transport of
frames and PCM in the codec relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from chorus import orpheus, telemetry
from services.token_server import metrics
from chorus.proto.tts.v1 import common_pb2, token_server_pb2, token_server_pb2_grpc
from services.token_server.codec_relay import CodecPool, CodecRelay, NoCodecWorkerError
from services.token_server.config import TokenServerConfig
from services.token_server.engine import (
    Engine,
    Failed,
    Finished,
    Frame,
    GenerationRequest,
    PromptTooLongError,
    QueueFullError,
    RequestStats,
)
from services.token_server.sampler import SamplingParams

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 20_000


def resolve_sampling(request: common_pb2.SamplingParams) -> SamplingParams:
    """Proto sampling fields (each optional) over the defaults; ValueError on bad values."""
    defaults = SamplingParams()
    values = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed"):
        values[name] = getattr(request, name) if request.HasField(name) else getattr(defaults, name)
    if not request.HasField("seed"):
        values["seed"] = uuid.uuid4().int & (2**63 - 1)
    return SamplingParams(**values)


def record_stages(stats: RequestStats) -> None:
    """Queue wait, prefill and first frame as spans of the request's trace."""
    metrics.QUEUE_WAIT.observe(stats.queue_wait_s)
    telemetry.record_stage("token_server.queue_wait", stats.submitted_at, stats.admitted_at)
    telemetry.record_stage("token_server.prefill", stats.admitted_at, stats.first_token_at,
                           {"chorus.prompt_tokens": stats.prompt_tokens})
    telemetry.record_stage("token_server.first_frame", stats.first_token_at, stats.first_frame_at)
    telemetry.record_stage("token_server.decode", stats.first_token_at, stats.finished_at,
                           {"chorus.tokens": stats.generated_tokens, "chorus.frames": stats.frames})


def build_summary(
    request_id: str, stats: RequestStats, reason: str, started: float, first_audio_at: float | None, samples: int
) -> common_pb2.SynthesisSummary:
    record_stages(stats)
    now = time.monotonic()
    audio_seconds = samples / orpheus.SAMPLE_RATE
    return common_pb2.SynthesisSummary(
        request_id=request_id,
        trace_id=telemetry.current_trace_id(),
        tokens=stats.generated_tokens,
        frames=stats.frames,
        audio_seconds=audio_seconds,
        time_to_first_token_ms=_ms(stats.first_token_at, stats.submitted_at),
        time_to_first_audio_ms=_ms(first_audio_at, started),
        time_to_decodable_frames_ms=_ms(stats.decodable_at, stats.submitted_at),
        real_time_factor=(now - started) / audio_seconds if audio_seconds else 0.0,
        queue_wait_ms=stats.queue_wait_s * 1000,
        prompt_tokens=stats.prompt_tokens,
        finish_reason=reason,
    )


def _ms(at: float | None, since: float) -> float:
    return (at - since) * 1000 if at is not None else 0.0


class TokenServicer(token_server_pb2_grpc.TokenServiceServicer):
    def __init__(self, config: TokenServerConfig, engine: Engine, pool: CodecPool) -> None:
        self._config = config
        self._engine = engine
        self._pool = pool

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        telemetry.tag_request(request_id)
        gen_request = await self._to_generation_request(request, request_id, context)
        try:
            handle = self._engine.submit(gen_request)
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except PromptTooLongError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        try:
            if request.codes_only:
                async for message in self._stream_codes(handle, request_id, started, context):
                    yield message
            else:
                async for message in self._stream_audio(handle, request, request_id, started, context):
                    yield message
        finally:
            handle.cancel()

    async def _to_generation_request(self, request, request_id: str, context) -> GenerationRequest:
        text = request.text.strip()
        if not text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text is empty: send the words to speak")
        if len(text) > MAX_TEXT_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text has {len(text)} characters, more than {MAX_TEXT_CHARS}; split it (the gateway does)",
            )
        try:
            sampling = resolve_sampling(request.sampling)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad sampling parameters: {err}")
        prompt = orpheus.wrap_prompt(
            self._engine.backbone.tokenize(orpheus.prompt_text(text, request.voice or orpheus.DEFAULT_VOICE))
        )
        max_tokens = sampling.max_tokens or orpheus.default_max_tokens(text, self._config.budget_headroom)
        # Never more than the slot's context allows, and whole frames only.
        max_tokens = min(max_tokens, self._config.ctx_per_slot - len(prompt) - 1)
        max_tokens -= max_tokens % orpheus.CODES_PER_FRAME
        if max_tokens < orpheus.CODES_PER_FRAME:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text is too long for one request: its prompt of {len(prompt)} tokens leaves no room for audio "
                f"in a slot of {self._config.ctx_per_slot} tokens",
            )
        return GenerationRequest(request_id, prompt, sampling, max_tokens)

    async def _stream_codes(self, handle, request_id, started, context):
        first_at = None
        async for event in handle.events():
            if isinstance(event, Frame):
                first_at = first_at or time.monotonic()
                yield token_server_pb2.GenerateResponse(
                    frames=common_pb2.CodeFrames(first_frame_index=event.index, codes=event.codes)
                )
            elif isinstance(event, Finished):
                samples = event.stats.frames * orpheus.SAMPLES_PER_FRAME
                yield token_server_pb2.GenerateResponse(
                    summary=build_summary(request_id, event.stats, event.reason, started, first_at, samples)
                )
            elif isinstance(event, Failed):
                await context.abort(grpc.StatusCode.UNAVAILABLE, event.message)

    async def _stream_audio(self, handle, request, request_id, started, context):
        relay = CodecRelay(self._pool, request_id, deterministic=request.deterministic_audio)
        outcome: dict[str, object] = {}

        async def feed() -> None:
            async for event in handle.events():
                if isinstance(event, Frame):
                    relay.push(event.codes)
                else:
                    outcome["event"] = event
                    relay.finish()

        feeder = asyncio.create_task(feed())
        first_audio_at = None
        try:
            async for chunk in relay.audio():
                first_audio_at = first_audio_at or time.monotonic()
                yield token_server_pb2.GenerateResponse(audio=chunk)
        except NoCodecWorkerError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except grpc.aio.AioRpcError as err:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"codec workers failed for this stream: {err.code().name}: {err.details()}"
            )
        finally:
            feeder.cancel()
        event = outcome.get("event")
        if isinstance(event, Failed):
            await context.abort(grpc.StatusCode.UNAVAILABLE, event.message)
        if isinstance(event, Finished):
            yield token_server_pb2.GenerateResponse(
                summary=build_summary(
                    request_id, event.stats, event.reason, started, first_audio_at, relay.relayed_samples
                )
            )

    async def GetStatus(self, request, context):
        busy, waiting = self._engine.load()
        return token_server_pb2.GetStatusResponse(
            slots_total=self._engine.n_slots,
            slots_busy=busy,
            queue_depth=waiting,
            queue_capacity=self._engine.queue_size,
            model=self._config.model_path.name,
        )
