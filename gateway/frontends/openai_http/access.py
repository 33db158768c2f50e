"""The HTTP door of `chorus.security.access`: the gateway's AccessPolicy asked about every call
on the HTTP port, as CallGuard asks it on the gRPC port, and those calls counted in
the same request metrics.

The page (`/`) and `/health` are open, as health and reflection are on gRPC: the page
holds no secret (it asks its user for a key) and probes carry none. Every other path
needs what the gRPC port needs, a path that does not exist included, so a route added
later is never open by mistake. The key comes as `Authorization: Bearer <key>`, which
OpenAI's clients send (or `X-API-Key`); a refusal is OpenAI's error shape with the
status its gRPC code maps to (401, 403, 429, 503).

A body larger than the policy's message limit is refused with 413: by its declared
length before it is read, or as soon as it grows past the limit.

Request metrics use the gRPC port's names and status codes: `api` is "openai" (the
gRPC port's calls are "tts.v1" or "riva"), `method` is
"POST /v1/audio/speech" (and so on; "other" for paths the gateway does not serve,
so that a scan cannot grow the label set), `code` the gRPC code of the answer: a
refusal's, the one a failed synthesis raised (after the audio started too), or
CANCELLED when the client went away before the end of the body. The same code
marks the request's SERVER span (tracing.py) an error where its HTTP status cannot
say it: a client that went away (with a "client disconnected" event), a stream that
failed after its 200.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chorus.security.access import AccessPolicy, Knock, Refusal, presented_key
from chorus.telemetry.tracing import OPENAI, RpcMetrics
from gateway.frontends import shell
from gateway.frontends.openai_http.errors import refusal_response

SPEECH = "/v1/audio/speech"
ROUTES = (f"POST {SPEECH}", "GET /v1/audio/voices", "GET /v1/models", "POST /v1/audio/voices")
# A voice's name is in its DELETE path; the label names the route, not the voice.
VOICE_DELETE = "DELETE /v1/audio/voices/{name}"
OPEN_PATHS = frozenset({"/", "/health"})

# Where the scope's state carries what the door learned: the admitted caller (for
# the request's span), the verified client certificate's identities (set per
# connection by the TLS listener), and the gRPC code a failure after the response
# started ended the call with.
CALLER = "chorus_caller"
IDENTITIES = "chorus_identities"
OUTCOME = "chorus_outcome"

class _Exchange:
    """One request's response as it goes out: its status and whether the body ended."""

    def __init__(self, send: Send, on_finish=None) -> None:
        self._send = send
        self._on_finish = on_finish
        self.status: int | None = None
        self.finished = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
            if self._on_finish is not None:
                # Before it goes: the tracing middleware ends the span with the last body.
                self._on_finish(self.status)
        await self._send(message)


def _mark_span(span: trace.Span, code: grpc.StatusCode, status: int | None) -> None:
    """The request's SERVER span (tracing.py's middleware is outside this one) gets the
    call's gRPC code (`chorus.status_code`), and an error status where the HTTP status
    does not make it one: 5xx already are, 4xx are the client's (HTTP semantic
    conventions). Once: on the last body, or at the end when the body never ended."""
    if not span.is_recording():
        return
    span.set_attribute("chorus.status_code", code.name)
    if code == grpc.StatusCode.CANCELLED:
        span.set_status(Status(StatusCode.ERROR, "CANCELLED: the client went away before the response ended"))
        span.add_event("client disconnected")
    elif code != grpc.StatusCode.OK and status is not None and status < 400:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: the response failed after its status was sent"))


class HttpGuard:
    """ASGI middleware in front of the HTTP routes; see the module docstring."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, metrics: RpcMetrics) -> None:
        self.app = app
        self.policy = policy
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        route = f"{scope['method']} {scope['path']}"
        if scope["method"] == "DELETE" and scope["path"].startswith("/v1/audio/voices/"):
            route = VOICE_DELETE
        labels = (OPENAI, route if route in ROUTES or route == VOICE_DELETE else "other")
        span = trace.get_current_span()
        state = scope.setdefault("state", {})
        exchange = _Exchange(send, lambda status: _mark_span(span, state.get(OUTCOME) or shell.code_of_http_status(status), status))
        started = time.monotonic()
        self.metrics.in_flight.labels(*labels).inc()
        code = None
        try:
            code = await self._serve(scope, receive, exchange, route)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:  # a failure after the audio started (its code noted) cut the body short
            code = scope["state"].get(OUTCOME, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            if code is None:
                code = shell.code_of_http_status(exchange.status if exchange.finished else None)
            self.metrics.in_flight.labels(*labels).dec()
            self.metrics.requests.labels(*labels, code.name).inc()
            self.metrics.duration.labels(*labels).observe(time.monotonic() - started)
            _mark_span(span, code, exchange.status)  # if the body never ended (the span is still open)

    async def _serve(self, scope: Scope, receive: Receive, exchange: _Exchange, route: str) -> grpc.StatusCode | None:
        """Serves the call if the policy admits it; the call's code where the status does not tell it."""
        state = scope.setdefault("state", {})
        client_host, client_port = scope.get("client") or ("", 0)
        knock = Knock(
            host=client_host, connection=f"{client_host}:{client_port}", identities=state.get(IDENTITIES, ()),
            secret=presented_key((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]),
            open=False, holds_stream=route == f"POST {SPEECH}", method=route,
        )
        try:
            admission = self.policy.admit(knock)
        except Refusal as refusal:
            await refusal_response(refusal)(scope, receive, exchange.send)
            return None
        state[CALLER] = admission.caller
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            self.policy.check_size(received)
            return message

        try:
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit():
                self.policy.check_size(int(declared))
            await self.app(scope, limited, exchange.send)
        except Refusal as refusal:  # the body is too large
            if exchange.status is not None:
                raise
            await refusal_response(refusal, 413)(scope, receive, exchange.send)
        finally:
            admission.release()
        return state.get(OUTCOME)
