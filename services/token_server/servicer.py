"""tts.v1.TokenService: adapts RPCs to the engine and the codec relay.

Validation and status codes live here; scheduling lives in the engine and its
scheduler, transport of frames and PCM in the codec relay. Each request's playback
clock is made here from the caller's schedule and advanced as audio is relayed, so
that the scheduler knows how far ahead of its listener every stream is.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from chorus.speech import orpheus
from chorus.speech.limits import MAX_REQUEST_ID_CHARS, PIECE_SUFFIX_CHARS, request_id_problem
from chorus.speech.voices import unknown_voice
from chorus.telemetry import tracing
from services.token_server import metrics
from chorus.proto.tts.v1 import common_pb2, token_server_pb2, token_server_pb2_grpc
from services.token_server.code_digest import CodeDigest
from services.token_server.codec_relay import CodecPool, CodecRelay, NoCodecWorkerError
from services.token_server.config import TokenServerConfig
from chorus.realtime.engine_thread import EngineDead, EngineStopped
from chorus.realtime.playback import DEFAULT_START_BUFFER_S, PlaybackClock
from services.token_server.engine import (
    Engine,
    Finished,
    Frame,
    GenerationFailed,
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
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        values[name] = getattr(request, name) if request.HasField(name) else getattr(defaults, name)
    if not request.HasField("seed"):
        values["seed"] = uuid.uuid4().int & (2**63 - 1)
    return SamplingParams(**values)


def playback_clock(playback: common_pb2.PlaybackClock, now: float, first_sample: int = 0) -> PlaybackClock:
    """The caller's schedule on this server's clock: running already (a later piece of
    a long text, or a replay from `first_sample`), or starting at the first audio plus
    the start buffer."""
    start_buffer = playback.start_buffer_s or DEFAULT_START_BUFFER_S
    if not 0.0 <= start_buffer <= 60.0:
        raise ValueError(f"playback.start_buffer_s is {start_buffer:g}; it must be in [0, 60]")
    if playback.HasField("first_sample_due_in_s"):
        due_in = playback.first_sample_due_in_s
        if not -3600.0 <= due_in <= 3600.0:
            raise ValueError(f"playback.first_sample_due_in_s is {due_in:g}; it must be within an hour of now")
        return PlaybackClock.scheduled(
            orpheus.SAMPLE_RATE, now + due_in, first_sample=first_sample, start_buffer_s=start_buffer
        )
    return PlaybackClock(orpheus.SAMPLE_RATE, start_buffer)


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
    samples: int, seed: int,
) -> common_pb2.SynthesisSummary:
    now = time.monotonic()
    audio_seconds = samples / orpheus.SAMPLE_RATE
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


async def _check_replay(request, max_tokens: int, context) -> None:
    """resume_from_sample and verify_frames: within what the request can generate."""
    if not (request.resume_from_sample or request.verify_frames):
        return
    if request.codes_only:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "resume_from_sample and verify_frames replay audio; codes_only has none"
        )
    frames = max_tokens // orpheus.CODES_PER_FRAME
    if not 0 <= request.resume_from_sample <= frames * orpheus.SAMPLES_PER_FRAME:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"resume_from_sample {request.resume_from_sample} is outside 0..{frames * orpheus.SAMPLES_PER_FRAME}, "
            f"the audio of this request's {frames} frames at most",
        )
    if not 0 <= request.verify_frames <= frames:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"verify_frames {request.verify_frames} is outside 0..{frames}, this request's frames at most",
        )


class TokenServicer(token_server_pb2_grpc.TokenServiceServicer):
    def __init__(self, config: TokenServerConfig, engine: Engine, pool: CodecPool) -> None:
        self._config = config
        self._engine = engine
        self._pool = pool

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        # Before anything records it: an id of any length would be exported and logged.
        if (problem := request_id_problem(request_id, MAX_REQUEST_ID_CHARS + PIECE_SUFFIX_CHARS)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        tracing.tag_request(request_id)
        gen_request = await self._to_generation_request(request, request_id, started, context)
        if gen_request.needs_codec and (reason := self._pool.unavailable_reason()):
            remaining = context.time_remaining()
            if not await self._pool.wait_for_return(remaining if remaining is not None else 1e9):
                await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        try:
            handle = self._engine.submit(gen_request)
        except QueueFullError as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except PromptTooLongError as err:
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

    async def _to_generation_request(self, request, request_id: str, now: float, context) -> GenerationRequest:
        text = request.text.strip()
        if not text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text is empty: send the words to speak")
        if len(text) > MAX_TEXT_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text has {len(text)} characters, more than {MAX_TEXT_CHARS}; split it (the gateway does)",
            )
        voice = request.voice or self._config.voices[0]
        if (problem := unknown_voice(voice, self._config.voices)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            sampling = resolve_sampling(request.sampling)
            clock = playback_clock(request.playback, now, max(0, request.resume_from_sample))
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {err}")
        requested = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 0
        fixed_length = request.sampling.ignore_end_of_speech
        if fixed_length and not requested:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "sampling.ignore_end_of_speech needs sampling.max_tokens: it generates exactly that many tokens",
            )
        prompt = orpheus.wrap_prompt(
            self._engine.backbone.tokenize(orpheus.prompt_text(text, voice))
        )
        room = self._config.ctx_per_slot - len(prompt) - 1
        if room < orpheus.CODES_PER_FRAME:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text is too long for one request: its prompt of {len(prompt)} tokens leaves no room for audio "
                f"in a slot of {self._config.ctx_per_slot} tokens",
            )
        budget = requested or orpheus.default_max_tokens(text, self._config.budget_headroom)
        # Never more than the slot's context allows, and whole frames only.
        budget = min(budget, room)
        budget -= budget % orpheus.CODES_PER_FRAME
        if budget < orpheus.CODES_PER_FRAME:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sampling.max_tokens is {requested}; it must be 0 (a budget from the text) or at least "
                f"{orpheus.CODES_PER_FRAME} (one frame of audio)",
            )
        await _check_replay(request, budget, context)
        return GenerationRequest(
            request_id, prompt, sampling, budget,
            ignore_end_of_speech=fixed_length, playback=clock, needs_codec=not request.codes_only,
        )

    async def _stream_codes(self, handle, request_id, started, context):
        first_at = None
        async for event in handle.events():
            if isinstance(event, Frame):
                now = time.monotonic()
                first_at = first_at or now
                handle.clock.deliver(orpheus.SAMPLES_PER_FRAME, now)
                yield token_server_pb2.GenerateResponse(
                    frames=common_pb2.CodeFrames(first_frame_index=event.index, codes=event.codes)
                )
            elif isinstance(event, Finished):
                record_stages(event.stats)
                samples = event.stats.frames * orpheus.SAMPLES_PER_FRAME
                yield token_server_pb2.GenerateResponse(
                    summary=summary_of(request_id, event.stats, event.reason, started, first_at, samples,
                                       handle.request.sampling.seed)
                )
            elif isinstance(event, GenerationFailed):
                await context.abort(grpc.StatusCode.UNAVAILABLE, event.message)

    async def _stream_audio(self, handle, request, request_id, started, context):
        # The codec's noise takes the request's seed: same request, same audio.
        remaining = context.time_remaining()
        relay = CodecRelay(
            self._pool, request_id, handle.clock, deterministic=request.deterministic_audio,
            seed=handle.request.sampling.seed, resume_from_sample=request.resume_from_sample,
            deadline=None if remaining is None else time.monotonic() + remaining,
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
                handle.clock.deliver(len(chunk.pcm) // 2, now)
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
                                   relay.relayed_samples, handle.request.sampling.seed)
            )

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
        )


def capacity_streams(engine: Engine, pool: CodecPool) -> int:
    """Streams this server can hold at real time: its own capacity, and no more than
    its codec workers can take."""
    return min(engine.scheduler.admission_limit(), pool.streams_limit())
