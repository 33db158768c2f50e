"""The CodecService gRPC servicer and the worker's `start_server`.

Each Decode call is one audio stream: the handler checks the frames on the event
loop (cheap) and hands them to the decode engine's thread; PCM comes back through
the stream's asyncio queue. A bad message ends only its own call, with
INVALID_ARGUMENT naming the frame, and never the streams beside it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc
import numpy as np
import torch
from opentelemetry import trace

from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc, common_pb2
from chorus.realtime.capacity import RealTimeCapacity, calibration_summary
from chorus.realtime.engine_thread import EngineDead, EngineStopped
from chorus.realtime.playback import PlaybackClock
from chorus.rpc.serving import RunningServer, new_server, serve_with_health
from chorus.security.access import AccessPolicy, Share
from chorus.speech import codecs
from chorus.telemetry import tracing
from chorus.speech.limits import REFERENCE_MESSAGE_BYTES
from services.codec_worker import metrics, numeric_mode, precision
from services.codec_worker.config import CodecWorkerConfig
from services.codec_worker.decode_engine import Audio, DecodeEngine, DecodeFailed, End, EngineStream
from services.codec_worker.idle_watch import IdleWatch
from services.codec_worker.memory import HeapTrimmer
from services.codec_worker.model import LoadedSnac, ModelLoadError, load_snac
from services.codec_worker.neucodec_model import NeuCodecLoadError, load_neucodec
from services.codec_worker.neucodec_encoder import load_neucodec_encoder
from services.codec_worker.neucodec_streaming import NeuCodecStreams
from services.codec_worker.reference_encoding import BadReference, EncoderBusy, NoEncoder, ReferenceEncoder
from services.codec_worker.streaming_decoder import StreamingSnacDecoder

log = logging.getLogger(__name__)

SERVICE_NAME = codec_pb2.DESCRIPTOR.services_by_name["CodecService"].full_name
# What a worker decodes (GetLoadResponse.codecs): the codec of the model it loads.
LOADED_CODECS = frozenset({codecs.SNAC_24KHZ})  # the default: SNAC at 24 kHz


class BadRequest(Exception):
    """A message the stream cannot take; the call ends with INVALID_ARGUMENT."""


class StreamCheck:
    """What a Decode stream has accepted so far, so that the next frames can be checked."""

    @classmethod
    def opened_by(cls, first: codec_pb2.DecodeRequest | None, decoder) -> StreamCheck:
        if first is None:
            raise BadRequest("stream closed before DecodeStart")
        kind = first.WhichOneof("payload")
        if kind == "frames":
            raise BadRequest(f"frame {first.frames.first_frame_index}: frames sent before DecodeStart")
        if kind != "start":
            raise BadRequest("the first DecodeRequest must carry DecodeStart; it was empty")
        return cls(first.start, decoder)

    def __init__(self, start: codec_pb2.DecodeStart, decoder) -> None:
        """`decoder`: the worker's streaming decoder, whose codec sets the rules."""
        self._decoder = decoder
        try:
            decoder.check_start(start.first_frame_index, start.resume_from_sample, start.seed)
        except ValueError as err:
            raise BadRequest(f"start: {err}") from err
        self.first_frame = self.next_frame = start.first_frame_index
        self.last_frames_at: float | None = None

    @property
    def frames_received(self) -> int:
        return self.next_frame - self.first_frame

    def frames(self, request: codec_pb2.DecodeRequest):
        kind = request.WhichOneof("payload")
        if kind == "start":
            raise BadRequest(f"frame {self.next_frame}: a second DecodeStart in the same stream")
        if kind != "frames":
            raise BadRequest(f"frame {self.next_frame}: empty DecodeRequest (neither start nor frames)")
        first = request.frames.first_frame_index
        if first != self.next_frame:
            raise BadRequest(f"frame {first}: expected frame {self.next_frame} (frames must be consecutive)")
        try:
            frames = codecs.check_frames(request.frames.codes, first, self._decoder.codes_per_frame,
                                         self._decoder.codebook_size)
        except ValueError as err:
            raise BadRequest(str(err)) from err
        self.next_frame += len(frames)
        self.last_frames_at = time.monotonic()
        return frames


class CodecServicer(codec_pb2_grpc.CodecServiceServicer):
    """Registered before the server starts (gRPC wants its methods then); answers
    UNAVAILABLE until `attach` hands it the warmed-up engine.

    The stream cap is shared by every client, so it is guarded twice: streams that go
    idle end (IdleWatch), and no one client holds more than its share (the server's
    AccessPolicy, before a handler runs: a client is a certificate identity at its
    address, else a connection, so that no other process on a token server's host
    spends that token server's share).

    GetLoad's `open_streams`, which token servers admit against, counts the streams
    that have started (DecodeStart): a call that has sent nothing has no decoder and
    costs no decode time, and counting it let a neighbour's idle calls fill every
    token server's codec room until they timed out."""

    def __init__(
        self, max_streams: int, start_timeout_s: float, idle_timeout_s: float, trimmer: HeapTrimmer | None = None
    ) -> None:
        self._max_streams = max_streams
        self._trimmer = trimmer
        self._start_timeout_s = start_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._engine: DecodeEngine | None = None
        self._device = ""
        self._numeric_mode = ""
        self._codecs: frozenset[str] = frozenset()
        self._encoder = ReferenceEncoder(None)
        self._open = 0  # calls, against max_streams
        self._decoding = 0  # streams past DecodeStart, reported by GetLoad

    def attach(self, engine: DecodeEngine, device: str, numeric_mode: str, decodes: frozenset[str],
               encoder: ReferenceEncoder | None = None) -> None:
        self._engine, self._device, self._numeric_mode, self._codecs = engine, device, numeric_mode, decodes
        if encoder is not None:
            self._encoder = encoder

    async def GetLoad(self, request, context):
        reply = codec_pb2.GetLoadResponse(open_streams=self._decoding, max_streams=self._max_streams,
                                          device=self._device, numeric_mode=self._numeric_mode,
                                          codecs=sorted(self._codecs))
        if self._engine is not None:
            reply.decode_rate = self._engine.load.decode_rate
            reply.busy_ratio = self._engine.load.busy_ratio
            reply.lag_seconds = self._engine.lag_seconds
            reply.capacity_streams = self._engine.capacity.streams()
        return reply

    async def Encode(self, request: codec_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        if self._engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "codec worker is still loading its model")
        codec = request.codec or next(iter(sorted(self._codecs)))
        if codec not in self._codecs:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this codec worker encodes {', '.join(sorted(self._codecs))}, not {codec[:70]!r}")
        tracing.tag_request(request.request_id, **{"chorus.reference_samples": len(request.audio.samples)})
        try:
            codes = await self._encoder.encode(np.asarray(request.audio.samples, dtype=np.float32),
                                               request.audio.sample_rate_hz)
        except NoEncoder as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except BadReference as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EncoderBusy as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        trace.get_current_span().set_attribute("chorus.frames", int(codes.size))
        return codec_pb2.EncodeResponse(codes=common_pb2.ReferenceCodes(codec=codec, codes=codes.tolist()))

    async def Decode(
        self, request_iterator: AsyncIterator[codec_pb2.DecodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[codec_pb2.DecodeResponse]:
        if self._engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "codec worker is still loading its model")
        if self._open >= self._max_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"codec worker is at its limit of {self._max_streams} streams",
            )
        opened_at = time.monotonic()
        self._count_open(+1)
        stream: EngineStream | None = None
        reader: asyncio.Task | None = None
        watch = IdleWatch(self._start_timeout_s, self._idle_timeout_s)
        try:
            first = await anext(aiter(request_iterator), None)
            try:
                check = StreamCheck.opened_by(first, self._engine.decoder)
            except BadRequest as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            watch.started()
            start = first.start
            # The name is echoed cut short: a long one in the status trailer would turn
            # the refusal into RESOURCE_EXHAUSTED with no message.
            if codecs.requested(start.codec) not in self._codecs:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"start: this codec worker decodes {', '.join(sorted(self._codecs))}, not {start.codec[:70]!r}; "
                    "a token server opens streams only on workers whose GetLoad lists its codec",
                )
            tracing.tag_request(start.request_id, **{
                "chorus.first_frame_index": start.first_frame_index,
                "chorus.resume_from_sample": start.resume_from_sample,
            })
            try:
                clock = PlaybackClock.from_wire(
                    start.playback, self._engine.decoder.sample_rate, time.monotonic(), start.resume_from_sample)
            except ValueError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"start: {err}")
            try:
                stream = self._engine.open_stream(
                    start.first_frame_index, start.resume_from_sample, start.deterministic, clock, seed=start.seed
                )
            except (EngineStopped, EngineDead) as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
            self._decoding += 1
            reader = asyncio.create_task(_read(request_iterator, check, stream, watch))
            samples = 0
            while True:
                item = await stream.get()
                if isinstance(item, Audio):
                    if not samples:
                        _record_first_audio(opened_at, check)
                    samples += item.samples
                    yield codec_pb2.DecodeResponse(
                        audio=common_pb2.PcmChunk(
                            sample_offset=item.sample_offset, pcm=item.pcm,
                            sample_rate_hz=self._engine.decoder.sample_rate,
                        )
                    )
                    watch.touch()  # the client read enough for this write to go out
                elif isinstance(item, End):
                    trace.get_current_span().set_attributes(
                        {"chorus.frames": check.frames_received, "chorus.samples": samples}
                    )
                    yield codec_pb2.DecodeResponse(final=True)
                    return
                elif isinstance(item, DecodeFailed):
                    code = grpc.StatusCode.INVALID_ARGUMENT if item.rejected else grpc.StatusCode.INTERNAL
                    await context.abort(code, item.message)
        except asyncio.CancelledError:
            if watch.expired is None:
                raise  # the client cancelled, or the server is stopping
            asyncio.current_task().uncancel()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, watch.expired)
        finally:
            # Also on cancellation by the client: the decoder state goes at once.
            watch.close()
            self._count_open(-1)
            if reader is not None:
                reader.cancel()
            if stream is not None:
                self._decoding -= 1
                stream.cancel()
                if self._trimmer is not None:
                    self._trimmer.stream_ended(self._open)

    def _count_open(self, delta: int) -> None:
        self._open += delta
        metrics.STREAMS.set(self._open)


def _record_first_audio(opened_at: float, check: StreamCheck) -> None:
    """A stage from the stream's opening to its first audio; most of it is waiting for
    the ~2.3 frames of lookahead, so the part after the last frame came in, which is
    the codec's own latency, goes with it."""
    now = time.monotonic()
    attributes = {"chorus.frames_received": check.frames_received}
    if check.last_frames_at is not None:
        attributes["chorus.after_last_frame_ms"] = (now - check.last_frames_at) * 1000
    tracing.record_stage("codec_worker.first_audio", opened_at, now, attributes)


async def _read(
    requests: AsyncIterator[codec_pb2.DecodeRequest], check: StreamCheck, stream: EngineStream, watch: IdleWatch
) -> None:
    try:
        async for request in requests:
            watch.touch()
            stream.submit(check.frames(request))
        watch.touch()
        stream.finish()
    except BadRequest as err:
        stream.reject(str(err))
    except (EngineStopped, EngineDead) as err:
        stream.reject(str(err))
    except Exception as err:  # the request stream broke: end the call, never leave it waiting
        stream.reject(f"reading the request stream failed: {err}")


async def start_server(config: CodecWorkerConfig, port: int = 0) -> RunningServer:
    """Binds and answers health (NOT_SERVING) at once, then loads, warms and measures
    the model and goes SERVING."""
    policy = AccessPolicy(
        allowed_clients=config.allowed_clients if config.tls else (),
        max_streams_per_client=config.max_streams_per_client,
        max_request_bytes=REFERENCE_MESSAGE_BYTES,  # a reference to encode is the largest message
        share=Share.CONNECTION,
        on_refused=lambda reason: metrics.RPC.refused_calls.labels(reason).inc(),
    )
    server = new_server(metrics.RPC, policy)
    trimmer = HeapTrimmer()
    servicer = CodecServicer(config.max_streams, config.start_timeout_s, config.idle_timeout_s, trimmer)
    codec_pb2_grpc.add_CodecServiceServicer_to_server(servicer, server)
    credentials = config.tls.server_credentials(require_client_cert=True) if config.tls else None
    running = await serve_with_health(server, [SERVICE_NAME], port, config.host, credentials)
    try:
        loaded, decoder, encoder = await asyncio.to_thread(_load_decoder, config)
        engine = DecodeEngine(
            decoder,
            max_batch=config.max_batch,
            batch_wait_ms=config.batch_wait_for(loaded.device_name),
            threads=config.torch_threads,
            on_forward=metrics.BATCH_STREAMS.observe,
            capacity=RealTimeCapacity(decoder.frame_seconds, config.max_streams, config.capacity_margin),
        )
        await asyncio.to_thread(decoder.warm_up)
        measured = await asyncio.to_thread(engine.calibrate) if config.calibrate else None
        log.info("%s", calibration_summary(measured, engine.capacity))
    except BaseException:
        await running.stop(grace=None)
        raise
    engine.start()
    trimmer.start()
    running.on_stop.append(engine.aclose)
    running.on_stop.append(lambda: asyncio.to_thread(trimmer.stop))
    running.components.update(engine=engine, decoder=decoder, model=loaded, trimmer=trimmer)
    reported_mode = numeric_mode.with_precision(loaded.numeric_mode, decoder.precision, loaded.device_name)
    reference_encoder = ReferenceEncoder(encoder)
    running.on_stop.append(lambda: asyncio.to_thread(reference_encoder.close))
    servicer.attach(engine, loaded.device_name, reported_mode, frozenset({config.codec}), reference_encoder)

    def engine_died(error: BaseException) -> None:
        log.error("the decode engine died (%s): NOT_SERVING", error)
        asyncio.ensure_future(running.set_serving(False))

    engine.bridge.on_death(engine_died)
    gauges = asyncio.create_task(_publish_load(engine))

    async def stop_gauges() -> None:
        gauges.cancel()

    running.on_stop.append(stop_gauges)
    await running.set_serving(True)
    log.info("codec worker SERVING on %s:%d (%s, %s decoder, numeric mode %s)", config.host, running.port,
             loaded.device_name, decoder.precision, reported_mode)
    return running


def _load_decoder(config: CodecWorkerConfig):
    """The model of the configured codec, the streaming decoder over it, and its
    reference encoder (None: the codec clones no voices, or this directory lacks it)."""
    if config.codec == codecs.NEUCODEC_24KHZ:
        try:
            model = load_neucodec(config.model_dir)
            encoder = load_neucodec_encoder(config.model_dir)
        except NeuCodecLoadError as err:
            raise ModelLoadError(str(err)) from None
        if encoder is None:
            log.warning("%s has no encoder: this worker decodes but cannot clone voices", config.model_dir)
        device = torch.device("cpu")
        mode = numeric_mode.ensure(config.numeric_mode)
        return LoadedSnac(model, device, mode), NeuCodecStreams(model), encoder
    loaded = load_snac(config.model_dir, config.device, config.half, config.numeric_mode)
    return loaded, StreamingSnacDecoder(loaded.model, precision=decoder_precision(config, loaded)), None


def decoder_precision(config: CodecWorkerConfig, loaded: LoadedSnac) -> str:
    """The configured precision for this model and device; a float16 model (--half)
    decodes in its own dtype, whatever "auto" would pick."""
    if config.decoder_precision == "auto" and next(loaded.model.parameters()).dtype != torch.float32:
        return "fp32"
    return precision.resolve(config.decoder_precision, loaded.device_name)


async def _publish_load(engine: DecodeEngine, interval_s: float = 0.5) -> None:
    """Utilization and lag gauges, sampled: the engine thread never touches them."""
    while True:
        metrics.BUSY_RATIO.set(engine.load.busy_ratio)
        metrics.LAG_SECONDS.set(engine.lag_seconds)
        await asyncio.sleep(interval_s)
