"""tts.v1.SynthesisService: adapts the client calls to the synthesis logic.

Requests become SynthesisOptions (validation), text becomes a TextFeed, and what
`synthesize` yields becomes response messages; a GatewayError raised anywhere becomes
the call's status. Nothing else is decided here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from chorus.proto.riva import riva_tts_pb2_grpc
from chorus.proto.tts.v1 import gateway_pb2, gateway_pb2_grpc
from chorus.rpc.serving import RunningServer, new_server, serve_with_health
from chorus.security.access import AccessPolicy, Share
from chorus.security.api_keys import ApiKeys
from chorus.security.tls import ChannelSecurity
from chorus.telemetry import tracing
from chorus.telemetry.tiers import TOKEN_SERVER
from gateway import metrics, validation
from chorus.speech.audio_formats import FORMATS, NATIVE_RATE, SAMPLE_RATES
from gateway.config import GatewayConfig
from gateway.encoding import Encoded
from gateway.errors import GatewayError, abort_with, invalid
from gateway.feed import TextFeed
from gateway.openai_http.app import HttpListener, SpeechEndpoint
from gateway.riva.servicer import SERVICE_NAME as RIVA_SERVICE_NAME
from gateway.riva.servicer import RivaSynthesisServicer
from gateway.pipeline import Pipeline
from gateway.router import Router
from gateway.segmenter import Segmenter
from gateway.synthesis import SynthesisOptions, synthesize

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["SynthesisService"].full_name


class SynthesisServicer(gateway_pb2_grpc.SynthesisServiceServicer):
    def __init__(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        self._config = config
        self._pipeline = pipeline

    async def Synthesize(self, request, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        try:
            options = validation.synthesize_options(request, self._config, context.time_remaining())
            _tag(options, text_chars=len(request.text))
            feed = await TextFeed.of_text(request.text, self._segmenter())
            async for item in self._run(feed, options, arrived, gateway_pb2.SynthesizeResponse):
                yield item
        except GatewayError as err:
            await abort_with(context, err)

    async def StreamingSynthesize(self, request_iterator, context: grpc.aio.ServicerContext):
        arrived = time.monotonic()
        requests = request_iterator.__aiter__()
        reader = None
        try:
            first = await anext(requests, None)
            if first is None:
                raise invalid("the stream closed before its first message, which must carry `config`")
            options = validation.streaming_options(first, self._config, context.time_remaining())
            _tag(options)
            feed = TextFeed(self._segmenter())
            reader = asyncio.create_task(self._read_text(requests, feed))
            async for item in self._run(feed, options, arrived, gateway_pb2.StreamingSynthesizeResponse):
                yield item
        except GatewayError as err:
            await abort_with(context, err)
        finally:
            if reader is not None:
                reader.cancel()

    async def ListVoices(self, request, context):
        return gateway_pb2.ListVoicesResponse(
            voices=[gateway_pb2.Voice(name=n, description=d) for n, d in self._config.listed_voices()]
        )

    async def GetLimits(self, request, context):
        return gateway_pb2.GetLimitsResponse(
            max_text_chars=self._config.max_text_chars,
            encodings=[f.wire for f in FORMATS.values()],
            sample_rates_hz=list(SAMPLE_RATES),
            native_sample_rate_hz=NATIVE_RATE,
        )

    def _segmenter(self) -> Segmenter:
        return Segmenter(self._config.segment_target_chars)

    async def _run(self, feed: TextFeed, options: SynthesisOptions, arrived: float, response_type):
        async with contextlib.aclosing(synthesize(self._pipeline, feed, options, arrived)) as items:
            async for item in items:
                if isinstance(item, Encoded):
                    yield response_type(audio=gateway_pb2.AudioChunk(data=item.data, num_samples=item.num_samples))
                else:
                    yield response_type(summary=item)

    async def _read_text(self, requests, feed: TextFeed) -> None:
        """Feeds the text messages of a StreamingSynthesize call; end or half-close ends input."""
        try:
            async for message in requests:
                kind = message.WhichOneof("payload")
                if kind == "text":
                    validation.check_text_piece(message.text, self._config)
                    await feed.push(message.text)
                    validation.check_backlog(feed.waiting_chars, self._config)
                elif kind == "flush":
                    await feed.flush()
                elif kind == "end":
                    break
                elif kind == "config":
                    raise invalid("`config` may only be sent once, as the first message")
                else:
                    raise invalid("empty StreamingSynthesize message: set one of text, flush or end")
            await feed.end()
        except GatewayError as err:
            feed.fail(err)
        except Exception as err:  # the call broke on the client's side: end it, never leave it waiting
            feed.fail(GatewayError(grpc.StatusCode.CANCELLED, f"reading the request stream failed: {err}"))


def _tag(options: SynthesisOptions, **extra: object) -> None:
    """The request's id, voice and output on its server span and log lines."""
    tracing.tag_request(options.spec.request_id, **{
        "chorus.voice": options.spec.voice,
        "chorus.encoding": options.format.name,
        "chorus.sample_rate_hz": options.sample_rate,
        **{f"chorus.{key}": value for key, value in extra.items()},
    })


async def start_server(config: GatewayConfig, port: int = 0) -> RunningServer:
    """Starts the gateway on `port` (0 picks one) and marks it SERVING; its HTTP port
    (when configured) shares the gRPC port's access policy, certificate and drain."""
    policy = AccessPolicy(
        allowed_clients=config.allowed_clients,
        api_keys=ApiKeys(config.api_keys_file) if config.api_keys_file else None,
        max_streams_per_client=config.max_streams_per_client,
        max_streams_per_key=config.max_streams_per_key,
        share=Share.ADDRESS,
        max_request_bytes=config.max_request_bytes,
        on_refused=lambda reason: metrics.REFUSED_CALLS.labels(reason).inc(),
    )
    router = Router(
        config.token_servers, config.status_interval_s, ChannelSecurity(config.tls, TOKEN_SERVER), config.stall
    )
    await router.start()
    server = new_server(metrics.RPC, policy)
    pipeline = Pipeline(router, config.lookahead_segments)
    gateway_pb2_grpc.add_SynthesisServiceServicer_to_server(SynthesisServicer(config, pipeline), server)
    riva_tts_pb2_grpc.add_RivaSpeechSynthesisServicer_to_server(RivaSynthesisServicer(config, pipeline), server)
    credentials = config.tls.server_credentials(require_client_cert=bool(config.allowed_clients)) if config.tls else None
    try:
        running = await serve_with_health(server, [SERVICE_NAME, RIVA_SERVICE_NAME], port, config.host, credentials)
    except BaseException:
        await router.close()
        raise
    # SERVING only while a token server is reachable and SERVING.
    router.on_availability = lambda available: running.set_condition("token_servers", available)
    await running.set_condition("token_servers", router.available())
    running.on_stop.append(router.close)
    if config.http_port is not None:
        endpoint = SpeechEndpoint(config, pipeline, lambda: running.serving)
        try:
            http = await HttpListener.start(
                endpoint.app(policy, metrics.RPC), config.host, config.http_port, config.tls,
                require_client_cert=bool(config.allowed_clients), read_timeout_s=config.http_read_timeout_s,
                finish=endpoint.finish,
            )
        except BaseException:
            await running.stop(0)
            raise
        running.on_drain.append(http.drain)
        running.endpoints["http"] = f"{_loopback_or(config.host)}:{http.port}"
        log.info("gateway %s (OpenAI /v1/audio/speech, page at /) on %s:%d", "HTTPS" if config.tls else "HTTP",
                 config.host, http.port)
    await running.set_serving(True)
    log.info("gateway serving on %s:%d, token servers %s", config.host, running.port, ", ".join(config.token_servers))
    return running


def _loopback_or(host: str) -> str:
    """Where a local client reaches a listener bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
