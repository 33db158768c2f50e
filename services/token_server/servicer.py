"""tts.v1.TokenService: adapts RPCs to the engine and the codec relay.

Status codes and streams live here; what a request may ask for lives in
request_mapping, scheduling in the engine and its scheduler, transport of frames and
PCM in the codec relay. Each request's playback clock (made by request_mapping from
the caller's schedule) is advanced here as audio is relayed, through the request's
handle, so that the scheduler knows how far ahead of its listener every stream is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid

import grpc

from chorus.speech import orpheus
from chorus.speech.limits import MAX_REQUEST_ID_CHARS, PIECE_SUFFIX_CHARS, request_id_problem
from chorus.telemetry import tracing
from services.token_server import metrics
from chorus.proto.tts.v1 import codec_pb2, common_pb2, token_server_pb2, token_server_pb2_grpc
from services.token_server.code_digest import CodeDigest
from services.token_server.codec_pool import CodecPool, NoCodecWorkerError
from services.token_server.codec_relay import CodecRelay
from services.token_server.config import TokenServerConfig
from chorus.realtime.engine_thread import EngineDead, EngineStopped
from services.token_server.engine import Engine
from services.token_server.request import (
    Finished,
    Frame,
    GenerationFailed,
    PromptTooLongError,
    QueueFullError,
    RequestStats,
)
from services.token_server.prompts import Prompts
from services.token_server.request_mapping import InvalidRequest, to_generation_request

log = logging.getLogger(__name__)

def record_stages(stats: RequestStats) -> None:
    """Queue wait, prefill, first frame and decode as spans of the request's trace,
    and the queue wait in its histogram."""
    metrics.QUEUE_WAIT.observe(stats.queue_wait_s)
    tracing.record_stage("token_server.queue_wait", stats.submitted_at, stats.admitted_at)
    tracing.record_stage("token_server.prefill", stats.admitted_at, stats.first_token_at,
                           {"chorus.prompt_tokens": stats.prompt_tokens})
    tracing.record_stage("token_server.first_frame", stats.first_token_at, stats.first_frame_at)
    tracing.record_stage("token_server.decode", stats.first_token_at, stats.finished_at,
                           {"chorus.tokens": stats.generated_tokens, "chorus.frames": stats.frames,
                            "chorus.paced_steps": stats.paced_steps})


def summary_of(
    request_id: str, stats: RequestStats, reason: str, started: float, first_audio_at: float | None,
    samples: int, seed: int, sample_rate: int = orpheus.SAMPLE_RATE,
) -> common_pb2.SynthesisSummary:
    now = time.monotonic()
    audio_seconds = samples / sample_rate
    return common_pb2.SynthesisSummary(
        request_id=request_id,
        trace_id=tracing.current_trace_id(),
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
        seed=seed,
    )


def _ms(at: float | None, since: float) -> float:
    return (at - since) * 1000 if at is not None else 0.0


# A caller without a deadline still gets an answer: a reference of at most 30 s encodes
# in seconds even on a CPU, so a worker silent for this long has failed.
ENCODE_TIMEOUT_S = 120.0


class TokenServicer(token_server_pb2_grpc.TokenServiceServicer):
    def __init__(self, config: TokenServerConfig, engine: Engine, pool: CodecPool, prompts: Prompts) -> None:
        self._config = config
        self._prompts = prompts
        self._engine = engine
        self._pool = pool

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        # Before anything records it: an id of any length would be exported and logged.
        if (problem := request_id_problem(request_id, MAX_REQUEST_ID_CHARS + PIECE_SUFFIX_CHARS)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        tracing.tag_request(request_id)
        try:
            build = functools.partial(to_generation_request, request, request_id, started, self._prompts,
                                      self._config.budget_headroom, self._engine.token_room)
            # Phonemizing long text or reading the voice store would stall every stream on this loop.
            gen_request = await asyncio.to_thread(build) if self._prompts.blocking else build()
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        try:
            self._engine.check_fits(gen_request)  # bad input is refused before any wait
        except PromptTooLongError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if gen_request.needs_codec and (reason := self._pool.unavailable_reason()):
            remaining = context.time_remaining()
            if not await self._pool.wait_for_return(remaining if remaining is not None else 1e9):
                await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        try:
            handle = self._engine.submit(gen_request)
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except PromptTooLongError as err:  # the engine alone decides what fits a slot
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except (EngineStopped, EngineDead) as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        try:
            if request.codes_only:
                stream = self._stream_codes(handle, request_id, started, context)
            else:
                stream = self._stream_audio(handle, request, request_id, started, context)
            async for message in stream:
                yield message
        finally:
            handle.cancel()

    async def _stream_codes(self, handle, request_id, started, context):
        first_at = None
        async for event in handle.events():
            if isinstance(event, Frame):
                now = time.monotonic()
                first_at = first_at or now
                handle.deliver(self._engine.family.samples_per_frame, now)
                yield token_server_pb2.GenerateResponse(
                    frames=common_pb2.CodeFrames(first_frame_index=event.index, codes=event.codes)
                )
            elif isinstance(event, Finished):
                record_stages(event.stats)
                samples = event.stats.frames * self._engine.family.samples_per_frame
                yield token_server_pb2.GenerateResponse(
                    summary=summary_of(request_id, event.stats, event.reason, started, first_at, samples,
                                       handle.request.sampling.seed, self._engine.family.sample_rate)
                )
            elif isinstance(event, GenerationFailed):
                await context.abort(grpc.StatusCode.UNAVAILABLE, event.message)

    async def _stream_audio(self, handle, request, request_id, started, context):
        # The codec's noise takes the request's seed: same request, same audio.
        remaining = context.time_remaining()
        relay = CodecRelay(
            self._pool, request_id, handle.clock, deterministic=request.deterministic_audio,
            seed=handle.request.sampling.seed, resume_from_sample=request.resume_from_sample,
            deadline=None if remaining is None else time.monotonic() + remaining, family=self._engine.family,
        )
        outcome: dict[str, object] = {}
        digest = CodeDigest()
        # A replay's check: the digest of its first verify_frames frames, sent before
        # any audio (generation ending sooner settles it with what there is).
        checkpoint = asyncio.get_running_loop().create_future() if request.verify_frames else None

        def settle_checkpoint() -> None:
            if checkpoint is not None and not checkpoint.done():
                checkpoint.set_result(digest.message())

        async def feed() -> None:
            try:
                async for event in handle.events():
                    if isinstance(event, Frame):
                        digest.update(event.codes)
                        if digest.frames == request.verify_frames:
                            settle_checkpoint()
                        relay.push(event.codes)
                    else:
                        outcome["event"] = event
                        settle_checkpoint()
                        relay.finish()
            except Exception as err:  # a bug here must end this stream, not leave it waiting for frames
                log.exception("relaying frames failed for %s", request_id)
                outcome["event"] = GenerationFailed(f"relaying frames to the codec worker failed: {err}")
                settle_checkpoint()
                relay.finish()

        feeder = asyncio.create_task(feed())
        feeder.add_done_callback(lambda _: settle_checkpoint())
        first_audio_at = None
        try:
            async for chunk in relay.audio():
                if checkpoint is not None:
                    yield token_server_pb2.GenerateResponse(codes=await checkpoint)
                    checkpoint = None
                now = time.monotonic()
                first_audio_at = first_audio_at or now
                handle.deliver(len(chunk.pcm) // 2, now)
                yield token_server_pb2.GenerateResponse(audio=chunk, codes=digest.message())
        except NoCodecWorkerError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except grpc.aio.AioRpcError as err:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"codec workers failed for this stream: {err.code().name}: {err.details()}"
            )
        finally:
            feeder.cancel()
        event = outcome.get("event")
        if isinstance(event, GenerationFailed):
            await context.abort(grpc.StatusCode.UNAVAILABLE, event.message)
        if isinstance(event, Finished):
            if checkpoint is not None:
                yield token_server_pb2.GenerateResponse(codes=await checkpoint)
            record_stages(event.stats)
            yield token_server_pb2.GenerateResponse(
                summary=summary_of(request_id, event.stats, event.reason, started, first_audio_at,
                                   relay.relayed_samples, handle.request.sampling.seed, self._engine.family.sample_rate)
            )

    async def EncodeReference(self, request, context: grpc.aio.ServicerContext):
        family = self._engine.family
        if (problem := request_id_problem(request.request_id)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        tracing.tag_request(request.request_id)
        if not family.clones_voices:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this token server's family, {family.name}, speaks fixed voices only and clones "
                                "none; register the voice with a server of a family that clones (neutts-air)")
        try:
            remaining = context.time_remaining()
            reply = await self._pool.encode(
                codec_pb2.EncodeRequest(request_id=request.request_id, audio=request.audio, codec=family.codec),
                ENCODE_TIMEOUT_S if remaining is None else min(remaining, ENCODE_TIMEOUT_S),
            )
        except NoCodecWorkerError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except grpc.aio.AioRpcError as err:  # the worker refused the recording itself
            await context.abort(err.code(), f"codec worker: {err.details()}")
        return token_server_pb2.EncodeReferenceResponse(codes=reply.codes)

    async def GetStatus(self, request, context):
        busy, waiting = self._engine.load()
        return token_server_pb2.GetStatusResponse(
            slots_total=self._engine.n_slots,
            slots_busy=busy,
            queue_depth=waiting,
            queue_capacity=self._engine.queue_size,
            model=self._config.model_path.name,
            capacity_streams=capacity_streams(self._engine, self._pool),
            active_streams=busy,
            family=self._engine.family.name,
        )


def capacity_streams(engine: Engine, pool: CodecPool) -> int:
    """Streams this server can hold at real time: its own capacity, and no more than
    its codec workers can take."""
    return min(engine.scheduler.admission_limit(), pool.streams_limit())
