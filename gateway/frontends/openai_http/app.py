"""The gateway's HTTP port: OpenAI's `POST /v1/audio/speech`, `GET /v1/audio/voices`,
`GET /v1/models`, `GET /health`, the browser page at `/`, and cloned voices'
`POST /v1/audio/voices` and `DELETE /v1/audio/voices/{name}` (voices.py).

Starlette on uvicorn, on the gateway's own event loop: a request here shares the
gRPC calls' pipeline, router, limits and validation, so there is one gateway with
two doors, not two services. Audio streams as it is generated: the response starts
once the first audio is encoded (so a request that fails before any audio gets a
proper error status), then every piece goes out as it comes. A failure after that
can only end the stream: the body stops short (SSE gets an `error` event first).
A request with `stream: false` gets the whole file in one response instead, sent
when the synthesis has ended: WAV and FLAC with their real length in the header
(which a stream cannot know up front), and any failure as an error status.

Errors are OpenAI's JSON shape, with the status mapped from the gRPC code the
gateway's logic raised. Keys, limits, the drain and the request metrics are the
gRPC port's, applied by the same access policy (`access.HttpGuard`); with TLS on, the
port serves HTTPS with the gRPC port's certificate, never plaintext.

Hostile clients (docs/reliability.md, "Bad input" and "Drain"):
- Every body a client can send gets a 4xx with a message: only `application/json`
  is read (415 otherwise: a form or text/plain body is what any web page can make a
  visitor's browser send without asking, so it must never start a synthesis); JSON
  nested too deeply or holding an unpaired UTF-16 surrogate is 400, not a crash.
- A client that sends slowly or not at all is cut off: headers must arrive within
  `http_read_timeout_s` of the connection (or of the previous response), else the
  connection is closed; a body that does not arrive whole in that time gets 408.
- A client that half-closes its side after its request still gets the response.
- On a drain the port stays open: `/health` answers 503 "draining", new speech 503
  (the access policy), open streams go on; a stream still open when the drain's
  time is up is cut, and an SSE stream gets an `error` event first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import uvicorn
from google.protobuf import json_format
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from chorus.proto.tts.v1 import common_pb2
from chorus.security.access import AccessPolicy
from chorus.security.tls import TlsFiles, certificate_identities
from chorus.telemetry import tracing
from chorus.telemetry.tracing import RpcMetrics
from gateway import voice_aliases
from gateway.config import GatewayConfig
from gateway.encoding import Encoded, whole_file
from gateway.errors import GatewayError
from gateway.frontends import shell
from gateway.frontends.openai_http.access import CALLER, IDENTITIES, OUTCOME, HttpGuard
from gateway.frontends.openai_http.body import json_body
from gateway.frontends.openai_http.errors import error_response
from gateway.frontends.openai_http.request import (
    OPENAI_FORMATS,
    SpeechRequest,
    listed_models,
    parse,
)
from gateway.frontends.openai_http.tracing import traced
from gateway.frontends.openai_http.voices import VoiceEndpoints
from gateway.pipeline import Pipeline
from gateway.synthesis import synthesize

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"

# What a browser page on another origin may send and read (when its origin is allowed).
_CORS_HEADERS = ["authorization", "content-type", "x-api-key"]
_CORS_EXPOSED = ["x-request-id", "x-trace-id"]
# After the drain's wait, how long cut streams get to send their last bytes (an SSE
# `error` event) before uvicorn closes what is left.
CUT_FLUSH_S = 2.0
# Riva's realtime (WebSocket) synthesis: where its client opens a session.
RIVA_REALTIME_SESSIONS = "/v1/realtime/synthesis_sessions"
RIVA_REALTIME_UNSUPPORTED = (
    "Riva's realtime WebSocket synthesis (/v1/realtime) is not supported by this gateway. "
    "Use Riva's gRPC SynthesizeOnline on the gateway's gRPC port (riva.client.SpeechSynthesisService"
    ".synthesize_online), tts.v1 StreamingSynthesize there for text that arrives in pieces, or "
    "POST /v1/audio/speech on this port (stream_format sse for events)"
)
CLIENT_LEFT = "the client went away before the response ended"
_CUT_MESSAGE = "the gateway stopped before this stream ended (its drain time ran out); retry the request"


class SpeechEndpoint:
    def __init__(self, config: GatewayConfig, pipeline: Pipeline, is_serving: Callable[[], bool]) -> None:
        self._config = config
        self._pipeline = pipeline
        self._voices = VoiceEndpoints(config, pipeline)
        self._is_serving = is_serving
        self._policy: AccessPolicy | None = None
        # The tasks of speech requests waiting for or relaying audio, to cut when the
        # drain's time runs out; `_cut` tells their cancellation from a client's.
        self._open: set[asyncio.Task] = set()
        self._cut = False
        # `created` of the models listed: when this gateway began serving them.
        self._created = int(time.time())

    def app(self, policy: AccessPolicy, metrics: RpcMetrics):
        """The routes behind the access policy, and CORS outside it (a browser's
        preflight carries no key) when origins are allowed; all of it traced
        (`gateway.frontends.openai_http.tracing.traced`: a SERVER span per request, refusals included)."""
        self._policy = policy
        middleware = [Middleware(HttpGuard, policy=policy, metrics=metrics)]
        if self._config.cors_origins:
            middleware.insert(0, Middleware(
                CORSMiddleware, allow_origins=self._config.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                allow_headers=_CORS_HEADERS, expose_headers=_CORS_EXPOSED,
            ))
        return traced(Starlette(middleware=middleware, routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/audio/voices", self.voices, methods=["GET"]),
            Route("/v1/audio/voices", self._voices.register, methods=["POST"]),
            Route("/v1/audio/voices/{name}", self._voices.delete, methods=["DELETE"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route(RIVA_REALTIME_SESSIONS, self.riva_realtime, methods=["POST"]),
            Route("/v1/audio/speech", self.speech, methods=["POST"]),
        ]))

    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    async def health(self, request: Request) -> Response:
        if self._policy is not None and self._policy.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        serving = self._is_serving()
        return JSONResponse({"status": "serving" if serving else "not_serving"}, status_code=200 if serving else 503)

    async def finish(self, grace: float | None) -> None:
        """The drain of this door: waits up to `grace` (None: for ever) until no call is in
        flight, then cuts the speech requests still open (an SSE stream ends with an
        `error` event; audio stops short; one still waiting for audio gets 503)."""
        if grace is None or grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._policy.wait_idle(), grace)
                return
        self._cut = True
        if self._open:
            log.warning("%d HTTP speech requests still open at the end of the drain; cutting them", len(self._open))
        for task in list(self._open):
            task.cancel()

    @contextlib.contextmanager
    def _cuttable(self):
        """The current task is cut (cancelled) if the drain's time runs out while it is open."""
        task = asyncio.current_task()
        self._open.add(task)
        try:
            yield
        finally:
            self._open.discard(task)

    async def _next(self, items: AsyncIterator):
        """The next item of a synthesis (None at its end); a cut fails it as UNAVAILABLE."""
        try:
            return await anext(items)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not self._cut:
                raise
            asyncio.current_task().uncancel()
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, _CUT_MESSAGE) from None

    async def voices(self, request: Request) -> Response:
        listed = await asyncio.to_thread(self._config.listed_voices)  # a file per registered voice
        return JSONResponse({
            "voices": [{"id": name, "name": name, "description": description} for name, description in listed],
            "aliases": voice_aliases.aliases(self._config),
            "response_formats": list(OPENAI_FORMATS),
        })

    async def models(self, request: Request) -> Response:
        """OpenAI's model list, for clients that fill a model picker from it: the names
        clients commonly send and the model families (`model` takes any name)."""
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self._created, "owned_by": "chorus"}
            for name in listed_models(self._config)
        ]})

    async def riva_realtime(self, request: Request) -> Response:
        """Riva 2.28's realtime WebSocket synthesis starts with this call
        (`riva.client.realtime.RealtimeClientTTS`); Chorus does not speak that
        protocol, so the client is told what to use instead. `detail` is where Riva's
        client reads a failed session's reason from."""
        return JSONResponse({
            "error": {"message": RIVA_REALTIME_UNSUPPORTED, "type": "invalid_request_error", "param": None,
                      "code": grpc.StatusCode.UNIMPLEMENTED.name.lower()},
            "detail": RIVA_REALTIME_UNSUPPORTED,
        }, status_code=501)

    async def speech(self, request: Request) -> Response:
        arrived = time.monotonic()
        if not self._is_serving():
            return error_response(GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry"))
        body = await json_body(request, self._config.http_read_timeout_s)
        if isinstance(body, Response):
            return body
        try:
            parsed = parse(body, self._config)
        except GatewayError as err:
            return error_response(err)
        # The request's id, voice and output on its HTTP SERVER span (tracing.py) and log
        # lines, under the gRPC doors' attribute names; the synthesis is a child of that span.
        shell.tag(parsed.options)
        span = tracing.get_tracer().start_span(
            "gateway.openai.speech",
            attributes={"chorus.request_id": parsed.options.spec.request_id, "chorus.text_chars": len(parsed.text),
                        **request.state[CALLER].attributes},
        )
        # Current while the pipeline starts: its tasks keep the span's context, so the
        # token servers' spans join this trace.
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            feed = await shell.whole_text_feed(parsed.text, self._config)
            items = synthesize(self._pipeline, feed, parsed.options, arrived)
            with self._cuttable():
                first = await self._next(items)
        except GatewayError as err:
            span.set_attribute("http.response.status_code", shell.http_status(err.code))
            span.end()
            return error_response(err)
        finally:
            otel_context.detach(token)
        span_context = span.get_span_context()
        trace_id = trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""
        request_id = parsed.options.spec.request_id
        headers = {"X-Request-Id": request_id} if shell.printable_ascii(request_id) else {}
        if trace_id:
            headers["X-Trace-Id"] = trace_id
        if not parsed.stream:
            return await self._whole(first, items, parsed, span, headers, request)
        body = self._relay(first, items, parsed, span, trace_id, request.state)
        if parsed.sse:
            return StreamingResponse(body, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        return StreamingResponse(body, media_type=parsed.options.format.content_type, headers=headers)

    async def _whole(self, first, items: AsyncIterator, parsed: SpeechRequest, span, headers: dict,
                     request: Request) -> Response:
        """The whole file once the synthesis has ended (`stream: false`), with its
        length in the header; nothing has been sent before, so a failure at any point
        is an error status, never a file cut short."""
        pieces: list[bytes] = []
        samples = 0
        # Nothing is written until the end, so a client that went away shows only as a
        # disconnect (a reset, or a TLS close; a plain FIN reads as a half-close, which
        # is still answered): the synthesis stops then rather than holding its stream
        # (and the client's share) for audio nobody will read.
        watcher = asyncio.create_task(_cancel_on_disconnect(request, asyncio.current_task()))
        try:
            with self._cuttable():
                item = first
                while item is not None:
                    if isinstance(item, Encoded):
                        pieces.append(item.data)
                        samples += item.num_samples
                    item = await self._next(items)
        except GatewayError as err:
            log.warning("speech %s failed: %s", parsed.options.spec.request_id, err)
            span.set_attribute("http.response.status_code", shell.http_status(err.code))
            span.set_status(Status(StatusCode.ERROR, f"{err.code.name}: {err.message}"))
            return error_response(err)
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # not the client leaving
            asyncio.current_task().uncancel()
            # Counted as a stream whose client left; the answer goes nowhere (uvicorn
            # drops what is sent on a closed connection), 499 as nginx logs it.
            request.state[OUTCOME] = grpc.StatusCode.CANCELLED
            span.set_status(Status(StatusCode.ERROR, f"CANCELLED: {CLIENT_LEFT}"))
            span.add_event("client disconnected")
            return error_response(GatewayError(grpc.StatusCode.CANCELLED, CLIENT_LEFT), 499)
        finally:
            watcher.cancel()
            await items.aclose()
            span.end()
        data = whole_file(parsed.options.format, b"".join(pieces), samples)
        return Response(data, media_type=parsed.options.format.content_type, headers=headers)

    async def _relay(self, first, items: AsyncIterator, parsed: SpeechRequest, span, trace_id: str, state):
        try:
            with self._cuttable():
                item = first
                while item is not None:
                    if isinstance(item, Encoded):
                        if item.data:
                            yield _sse_delta(item.data) if parsed.sse else item.data
                    else:
                        item.trace_id = trace_id
                        if parsed.sse:
                            yield _sse_done(item)
                    item = await self._next(items)
        except GatewayError as err:
            log.warning("speech %s failed mid-stream: %s", parsed.options.spec.request_id, err)
            span.set_attribute("chorus.error", str(err))
            span.set_status(Status(StatusCode.ERROR, f"{err.code.name}: {err.message}"))
            state[OUTCOME] = err.code
            if parsed.sse:
                yield _sse({"type": "error", "error": {"message": err.message, "code": err.code.name.lower()}})
            else:
                raise
        except (asyncio.CancelledError, GeneratorExit):
            # Starlette cancels the body when its client disconnects (a drain's cut comes
            # as UNAVAILABLE from `_next`): without this the span ended unset.
            span.set_status(Status(StatusCode.ERROR, f"CANCELLED: {CLIENT_LEFT}"))
            span.add_event("client disconnected")
            raise
        finally:
            await items.aclose()
            span.end()



async def _cancel_on_disconnect(request: Request, task: asyncio.Task) -> None:
    """Cancels `task` when the client disconnects (the body has been read: what comes now is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    task.cancel()


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


class _GatewayProtocol(H11Protocol):
    """uvicorn's h11 protocol with what the gateway's port needs on top:

    - The verified client certificate's identities in the state of every request on
      the connection, for the access policy (uvicorn exposes no certificate to the
      app). asyncio calls `connection_made` once the TLS handshake has succeeded, so
      the certificate is known by then.
    - A deadline for a request's headers: uvicorn waits for ever for the first
      request, and its keep-alive timer stops at the first byte of the next, so a
      client sending a byte now and then (slowloris) held a connection open for good.
      The connection is closed when headers are not complete `read_timeout_s` after
      it opened or after the previous response.
    - A client's half-close (EOF after its request) does not drop the response:
      asyncio closes the transport on EOF unless `eof_received` says otherwise; the
      response is written, then the connection closes. (TLS cannot half-close: there
      EOF still closes.)
    """

    def __init__(self, *args, read_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._read_timeout_s = read_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._timed_cycle = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._note_new_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._note_new_request() and not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return True  # keep the transport for the response
        return None

    def _note_new_request(self) -> bool:
        """Whether the headers of a request not seen before have arrived (its timer stops)."""
        if self.cycle is None or self.cycle is self._timed_cycle:
            return False
        self._timed_cycle = self.cycle
        self._stop_head_timer()
        return True

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self._read_timeout_s, self._head_late)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()
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

    def __init__(self, server: _UvicornServer, task, port: int,
                 finish: Callable[[float | None], Awaitable[None]] | None) -> None:
        self._server = server
        self._task = task
        self.port = port
        self._finish = finish

    @classmethod
    async def start(
        cls, app, host: str, port: int, tls: TlsFiles | None = None, require_client_cert: bool = False,
        read_timeout_s: float = 15.0, finish: Callable[[float | None], Awaitable[None]] | None = None,
    ) -> HttpListener:
        """With `tls`, HTTPS only; `require_client_cert` asks clients for a certificate of its CA.
        `read_timeout_s` bounds the wait for a request's headers; `finish(grace)` is the
        app's own drain, awaited before the port closes."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise OSError(f"could not bind the HTTP port {host}:{port}: {err}") from None
        config = uvicorn.Config(app, log_config=None, lifespan="off", access_log=False, server_header=False,
                                http=functools.partial(_GatewayProtocol, read_timeout_s=read_timeout_s),
                                **_tls_settings(tls, require_client_cert))
        server = _UvicornServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http-listener")
        while not server.started:
            if task.done():
                task.result()
                raise OSError("the HTTP listener stopped while starting")
            await asyncio.sleep(0.01)
        return cls(server, task, sock.getsockname()[1], finish)

    async def drain(self, grace: float | None) -> None:
        """Keeps the port open while the app drains within `grace` (health and new
        calls are answered, open responses go on), then closes it: what is still
        open after CUT_FLUSH_S more is dropped."""
        if self._finish is not None:
            await self._finish(grace)
        self._server.config.timeout_graceful_shutdown = CUT_FLUSH_S
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
