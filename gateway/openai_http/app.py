"""The gateway's HTTP port: OpenAI's `POST /v1/audio/speech`, `GET /v1/audio/voices`,
`GET /health`, and the browser page at `/`.

Starlette on uvicorn, on the gateway's own event loop: a request here shares the
gRPC calls' pipeline, router, limits and validation, so there is one gateway with
two doors, not two services. Audio streams as it is generated: the response starts
once the first audio is encoded (so a request that fails before any audio gets a
proper error status), then every piece goes out as it comes. A failure after that
can only end the stream: the body stops short (SSE gets an `error` event first).

Errors are OpenAI's JSON shape, with the status mapped from the gRPC code the
gateway's logic raised. Keys, limits, the drain and the request metrics are the
gRPC port's, applied by the same access policy (`access.HttpGuard`); with TLS on, the
port serves HTTPS with the gRPC port's certificate, never plaintext.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import uvicorn
from google.protobuf import json_format
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from chorus import telemetry
from chorus.access import AccessPolicy
from chorus.proto.tts.v1 import common_pb2
from chorus.telemetry import RpcMetrics
from chorus.tls import TlsFiles, certificate_identities
from gateway import voice_aliases
from gateway.config import GatewayConfig
from gateway.encoding import Encoded
from gateway.errors import GatewayError, invalid
from gateway.feed import TextFeed
from gateway.openai_http.access import CALLER, IDENTITIES, OUTCOME, HttpGuard
from gateway.openai_http.errors import HTTP_STATUS, error_response
from gateway.openai_http.request import OPENAI_FORMATS, SpeechRequest, parse
from gateway.pipeline import Pipeline
from gateway.segmenter import Segmenter
from gateway.synthesis import synthesize

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"

# What a browser page on another origin may send and read (when its origin is allowed).
_CORS_HEADERS = ["authorization", "content-type", "x-api-key"]
_CORS_EXPOSED = ["x-request-id", "x-trace-id"]


class SpeechEndpoint:
    def __init__(self, config: GatewayConfig, pipeline: Pipeline, is_serving: Callable[[], bool]) -> None:
        self._config = config
        self._pipeline = pipeline
        self._is_serving = is_serving

    def app(self, policy: AccessPolicy, metrics: RpcMetrics) -> Starlette:
        """The routes behind the access policy, and CORS outside it (a browser's
        preflight carries no key) when origins are allowed."""
        middleware = [Middleware(HttpGuard, policy=policy, metrics=metrics)]
        if self._config.cors_origins:
            middleware.insert(0, Middleware(
                CORSMiddleware, allow_origins=self._config.cors_origins, allow_methods=["GET", "POST"],
                allow_headers=_CORS_HEADERS, expose_headers=_CORS_EXPOSED,
            ))
        return Starlette(middleware=middleware, routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/audio/voices", self.voices, methods=["GET"]),
            Route("/v1/audio/speech", self.speech, methods=["POST"]),
        ])

    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    async def health(self, request: Request) -> Response:
        serving = self._is_serving()
        return JSONResponse({"status": "serving" if serving else "not_serving"}, status_code=200 if serving else 503)

    async def voices(self, request: Request) -> Response:
        return JSONResponse({
            "voices": [{"id": name, "name": name, "description": description}
                       for name, description in self._config.listed_voices()],
            "aliases": voice_aliases.aliases(self._config),
            "response_formats": list(OPENAI_FORMATS),
        })

    async def speech(self, request: Request) -> Response:
        arrived = time.monotonic()
        if not self._is_serving():
            return error_response(GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry"))
        try:
            parsed = parse(await self._read_json(request), self._config)
        except GatewayError as err:
            return error_response(err)
        span = telemetry.get_tracer().start_span(
            "gateway.openai.speech", kind=trace.SpanKind.SERVER,
            context=propagate.extract(dict(request.headers)),
            attributes={"chorus.text_chars": len(parsed.text), **request.state[CALLER].attributes},
        )
        # Current while the pipeline starts: its tasks keep the span's context, so the
        # token servers' spans join this trace.
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            feed = await TextFeed.of_text(parsed.text, Segmenter(self._config.segment_target_chars))
            items = synthesize(self._pipeline, feed, parsed.options, arrived)
            first = await anext(items)
        except GatewayError as err:
            span.set_attribute("http.response.status_code", HTTP_STATUS.get(err.code, 500))
            span.end()
            return error_response(err)
        finally:
            otel_context.detach(token)
        span_context = span.get_span_context()
        trace_id = trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""
        request_id = parsed.options.spec.request_id
        headers = {"X-Request-Id": request_id} if request_id.isascii() and request_id.isprintable() else {}
        if trace_id:
            headers["X-Trace-Id"] = trace_id
        body = self._relay(first, items, parsed, span, trace_id, request.state)
        if parsed.sse:
            return StreamingResponse(body, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        return StreamingResponse(body, media_type=parsed.options.format.content_type, headers=headers)

    async def _relay(self, first, items: AsyncIterator, parsed: SpeechRequest, span, trace_id: str, state):
        try:
            item = first
            while True:
                if isinstance(item, Encoded):
                    if item.data:
                        yield _sse_delta(item.data) if parsed.sse else item.data
                else:
                    item.trace_id = trace_id
                    if parsed.sse:
                        yield _sse_done(item)
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
        except GatewayError as err:
            log.warning("speech %s failed mid-stream: %s", parsed.options.spec.request_id, err)
            span.set_attribute("chorus.error", str(err))
            state[OUTCOME] = err.code
            if parsed.sse:
                yield _sse({"type": "error", "error": {"message": err.message, "code": err.code.name.lower()}})
            else:
                raise
        finally:
            await items.aclose()
            span.end()

    async def _read_json(self, request: Request) -> object:
        """The body as JSON (its size is HttpGuard's to limit)."""
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise invalid(f"the body is not JSON: {err}") from None


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def _sse_delta(data: bytes) -> bytes:
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})


def _sse_done(summary: common_pb2.SynthesisSummary) -> bytes:
    usage = {"input_tokens": summary.prompt_tokens, "output_tokens": summary.tokens,
             "total_tokens": summary.prompt_tokens + summary.tokens}
    return _sse({"type": "speech.audio.done", "usage": usage,
                 "chorus_summary": json_format.MessageToDict(summary, preserving_proto_field_name=True)})


class _UvicornServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The gateway's entry point owns SIGTERM and drains every listener itself.
        yield


class _PeerCertificateProtocol(H11Protocol):
    """h11 that puts the verified client certificate's identities into the state of
    every request on the connection, for the access policy (uvicorn exposes no
    certificate to the app). asyncio calls `connection_made` once the TLS handshake
    has succeeded, so the certificate is known by then."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        if certificate:
            names = certificate_identities(
                [value for _kind, value in certificate.get("subjectAltName", ())],
                [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"],
            )
            self.app_state = {**self.app_state, IDENTITIES: names}


def _tls_settings(tls: TlsFiles | None, require_client_cert: bool) -> dict:
    """uvicorn's TLS settings from the gRPC port's certificate (none: plaintext)."""
    if tls is None:
        return {}
    return {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key), "ssl_ca_certs": str(tls.ca),
            "ssl_cert_reqs": ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE}


class HttpListener:
    """uvicorn serving an ASGI app on this event loop, on a socket bound up front (port 0 works)."""

    def __init__(self, server: _UvicornServer, task, port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    @classmethod
    async def start(
        cls, app, host: str, port: int, tls: TlsFiles | None = None, require_client_cert: bool = False
    ) -> HttpListener:
        """With `tls`, HTTPS only; `require_client_cert` asks clients for a certificate of its CA."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise OSError(f"could not bind the HTTP port {host}:{port}: {err}") from None
        config = uvicorn.Config(app, log_config=None, lifespan="off", access_log=False, server_header=False,
                                http=_PeerCertificateProtocol, **_tls_settings(tls, require_client_cert))
        server = _UvicornServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http-listener")
        while not server.started:
            if task.done():
                task.result()
                raise OSError("the HTTP listener stopped while starting")
            await asyncio.sleep(0.01)
        return cls(server, task, sock.getsockname()[1])

    async def drain(self, grace: float | None) -> None:
        """Stops accepting, lets open responses finish within `grace`, then closes them."""
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
