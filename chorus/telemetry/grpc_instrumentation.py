"""What every RPC records: standard OpenTelemetry gRPC spans on both ends of every
call, and each service's request metrics.

The spans are opentelemetry-instrumentation-grpc's (pinned with the SDK): span names
are the method paths (`/tts.v1.TokenService/Generate`), attributes the `rpc.*`
semantic conventions, and the client interceptor puts `traceparent` on every
outgoing call. Chorus changes three things on the server side, in
`ServerInterceptor`:

- **Every non-OK status is an error, with its message.** The library leaves
  INVALID_ARGUMENT and CANCELLED spans unset and never sees the end of a call the
  client cancelled or whose deadline passed (grpc.aio cancels the handler's task, an
  exception it does not catch), so such calls were exported as OK. Here the status
  is read once the handler is done (`rpc_outcome`) and set as `CODE: message`.
- **The span is current only while the handler runs, never across a `yield`.** The
  library holds its span current around the whole response stream. grpc.aio stops
  iterating a stream whose client has gone and leaves the generator to the garbage
  collector, which closes it from another task: the context token attached in the
  RPC's task is then detached in a different one ("Failed to detach context" under
  load). Attaching around each step of the handler keeps attach and detach in one task.
- **Request metrics** (`tracing.RpcMetrics`) are counted from the same outcome,
  labelled with the call's API (`tts.v1`, `riva`) and method.

On the client side, the library ends a CLIENT span, and reads its status, only where
the caller awaits the call or reads its stream to the end. A call the caller
cancels (grpc.aio raises CancelledError), whose reader stops early or whose task is
cancelled (the gateway's when its client goes away) was exported as OK, or only
when the garbage collector got to it, while its SERVER span said CANCELLED. Here
(`_ClientSpanEnd`) the CLIENT span ends when the call does, from grpc's own done
callback, with the status the call ended with, `CODE: details` as on the server.

Health checks and reflection are neither traced nor counted (probes would drown
the requests), and neither are load polls (`GetStatus`, `GetLoad`) unless they are
part of a traced request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import grpc
from grpc._common import CYGRPC_STATUS_CODE_TO_STATUS_CODE
from grpc._cython.cygrpc import AbortError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import _aio_client
from opentelemetry.instrumentation.grpc._aio_server import OpenTelemetryAioServerInterceptor
from opentelemetry.semconv._incubating.attributes.rpc_attributes import RPC_GRPC_STATUS_CODE
from opentelemetry.trace import SpanKind, Status, StatusCode

from chorus.telemetry import tracing

__all__ = ["ServerInterceptor", "server_interceptors", "client_interceptors", "rpc_outcome", "current_tracer_provider"]

_SCOPE = "opentelemetry.instrumentation.grpc"
_UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                      "grpc.reflection.v1.ServerReflection")
# A cancel this close to the deadline is the client's deadline (see rpc_outcome).
DEADLINE_SLACK_S = 0.25
# Polled several times a second per peer: a trace each would bury the requests.
_LOAD_POLLS = ("GetStatus", "GetLoad")


def _split(method: str | bytes) -> tuple[str, str]:
    if isinstance(method, bytes):  # grpc.aio hands clients bytes (grpc/grpc#31092)
        method = method.decode()
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def rpc_outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> tuple[grpc.StatusCode, str]:
    """The status a finished call ended with, as its client saw it.

    An abort or set_code leaves its code on the context. A handler cancelled by
    grpc.aio (CancelledError), or a stream that grpc.aio dropped (GeneratorExit), was
    cut off by its deadline when (almost) no time remained, else by its client. Almost:
    the client's clock runs out first and it resets the stream, which reaches the
    server while the server's own copy of the deadline still has the one-way
    latency to go.
    """
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code, context.details() or ""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before it finished"
        return grpc.StatusCode.CANCELLED, "the client cancelled the call or went away"
    if error is not None:
        return grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"
    return grpc.StatusCode.OK, ""


class _UnattachedTracer:
    """Gives the library's `_start_span` a started span that is neither made current
    nor ended when its `with` block exits: `ServerInterceptor` makes it current per
    step and ends it when the call is over."""

    def start_as_current_span(self, name, kind=SpanKind.INTERNAL, attributes=None, **_ignored):
        return contextlib.nullcontext(tracing.get_tracer(_SCOPE).start_span(name, kind=kind, attributes=attributes))


def _server_filter(details: grpc.HandlerCallDetails) -> bool:
    """True for calls to trace and count."""
    service, name = _split(details.method or "")
    if service in _UNTRACED_SERVICES:
        return False
    if name in _LOAD_POLLS:
        return any(key == "traceparent" for key, _ in details.invocation_metadata or ())
    return True


class ServerInterceptor(OpenTelemetryAioServerInterceptor):
    """The standard aio server interceptor, with the changes the module docstring
    lists; records into `metrics` (the service's `RpcMetrics`) when given."""

    def __init__(self, metrics: tracing.RpcMetrics | None = None) -> None:
        super().__init__(_UnattachedTracer(), filter_=_server_filter)
        self._metrics = metrics

    def _begin(self, handler_call_details, context):
        with self._set_remote_context(context):
            with self._start_span(handler_call_details, context) as span:
                current = trace.set_span_in_context(span)
        service, name = _split(handler_call_details.method or "")
        labels = (tracing.api_of(service), name)
        if self._metrics is not None:
            self._metrics.in_flight.labels(*labels).inc()
        return span, current, labels, time.monotonic()

    def _end(self, span, labels: tuple[str, str], started: float, context, error: BaseException | None) -> None:
        code, details = rpc_outcome(context, error)
        span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
        if error is not None and not isinstance(error, (AbortError, asyncio.CancelledError, GeneratorExit)):
            span.record_exception(error)
        span.end()
        if self._metrics is not None:
            self._metrics.in_flight.labels(*labels).dec()
            self._metrics.requests.labels(*labels, code.name).inc()
            self._metrics.duration.labels(*labels).observe(time.monotonic() - started)

    def _intercept_aio_server_unary(self, behavior, handler_call_details):
        async def unary(request_or_iterator, context):
            span, current, labels, started = self._begin(handler_call_details, context)
            error = None
            token = otel_context.attach(current)
            try:
                return await behavior(request_or_iterator, context)
            except BaseException as err:
                error = err
                raise
            finally:
                otel_context.detach(token)
                self._end(span, labels, started, context, error)

        return unary

    def _intercept_aio_server_stream(self, behavior, handler_call_details):
        async def stream(request_or_iterator, context):
            span, current, labels, started = self._begin(handler_call_details, context)
            responses = behavior(request_or_iterator, context)
            error = None
            try:
                while True:
                    token = otel_context.attach(current)
                    try:
                        response = await anext(responses)
                    except StopAsyncIteration:
                        break
                    finally:
                        otel_context.detach(token)
                    yield response
            except BaseException as err:
                error = err
                raise
            finally:
                # Dropped mid-stream (GeneratorExit): close the handler's generator
                # now, so its own cleanup runs before the span ends.
                token = otel_context.attach(current)
                try:
                    await responses.aclose()
                finally:
                    otel_context.detach(token)
                    self._end(span, labels, started, context, error)

        return stream


class _CurrentTracer:
    """The tracer of the provider `tracing.setup_tracing` installed last, looked up
    at each call (a process may be re-pointed; channels outlive that), and the place
    where `tracing.call_attributes` reach the CLIENT spans."""

    def __init__(self, scope: str = _SCOPE) -> None:
        self._scope = scope

    def start_as_current_span(self, name, kind=SpanKind.INTERNAL, attributes=None, **kwargs):
        if kind == SpanKind.CLIENT:
            attributes = {**(attributes or {}), **tracing.pending_call_attributes()}
        return tracing.get_tracer(self._scope).start_as_current_span(name, kind=kind, attributes=attributes, **kwargs)

    def start_span(self, name, kind=SpanKind.INTERNAL, attributes=None, **kwargs):
        return tracing.get_tracer(self._scope).start_span(name, kind=kind, attributes=attributes, **kwargs)


class _CurrentTracerProvider:
    def __init__(self, scope: str = _SCOPE) -> None:
        self._scope = scope

    def get_tracer(self, *args, **kwargs) -> _CurrentTracer:
        return _CurrentTracer(self._scope)


def current_tracer_provider(scope: str) -> _CurrentTracerProvider:
    """A tracer provider for a standard instrumentation (the HTTP port's ASGI one):
    its spans come from the provider `tracing.setup_tracing` installed last, under
    `scope`."""
    return _CurrentTracerProvider(scope)


def _client_filter(details: grpc.aio.ClientCallDetails) -> bool:
    service, name = _split(details.method)
    if service in _UNTRACED_SERVICES:
        return False
    if name in _LOAD_POLLS:
        return trace.get_current_span().get_span_context().is_valid
    return True


def _call_status(call) -> tuple[grpc.StatusCode, str]:
    """The status of a finished call, read in its done callback: grpc.aio's accessors
    are coroutines, so this reads the status they would return where grpc.aio's own
    `__await__` reads it (grpcio is pinned)."""
    status = call._cython_call._status
    if status is None:  # not expected once done; never guess OK
        return grpc.StatusCode.UNKNOWN, "the call ended without a status"
    return CYGRPC_STATUS_CODE_TO_STATUS_CODE[status.code()], status.details() or ""


def _end_client_span(span: trace.Span, call) -> None:
    """Done callback of a traced call: its status on its CLIENT span, then the end."""
    if not span.is_recording():
        return
    code, details = _call_status(call)
    span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
    span.end()


class _ClientSpanEnd:
    """The library's aio client interceptors with the end of the span tied to the end
    of the call (module docstring). The call is returned as it is, not wrapped: its
    stream, `cancel()` and status are grpc's own."""

    def _traced(self, span: trace.Span, call):
        try:
            call.add_done_callback(functools.partial(_end_client_span, span))
        except NotImplementedError:  # a call object of another interceptor: the library's way
            return None
        return call

    def _failed(self, span: trace.Span, error: BaseException) -> None:
        """The call never started (the channel is closed, the task was cancelled)."""
        if isinstance(error, grpc.aio.AioRpcError):
            code, details = error.code(), error.details() or ""
        elif isinstance(error, asyncio.CancelledError):
            code, details = grpc.StatusCode.CANCELLED, "the caller was cancelled before the call started"
        else:
            code, details = grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"
        span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
        span.end()

    async def _intercept(self, continuation, details, request, unary_response: bool):
        if self.tracing_skipped(details):
            return await continuation(details, request)
        with self._start_interceptor_span(details.method) as span:
            try:
                call = await continuation(self.propagate_trace_in_details(details), request)
            except BaseException as err:
                self._failed(span, err)
                raise
            traced = self._traced(span, call)
            if traced is not None:
                return traced
            if unary_response:
                return await self._wrap_unary_response(lambda: _returned(call), span)
            return self._wrap_stream_response(span, call)


async def _returned(call):
    return call


class _UnaryUnary(_ClientSpanEnd, _aio_client.UnaryUnaryAioClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._intercept(continuation, client_call_details, request, unary_response=True)


class _UnaryStream(_ClientSpanEnd, _aio_client.UnaryStreamAioClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._intercept(continuation, client_call_details, request, unary_response=False)


class _StreamUnary(_ClientSpanEnd, _aio_client.StreamUnaryAioClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await self._intercept(continuation, client_call_details, request_iterator, unary_response=True)


class _StreamStream(_ClientSpanEnd, _aio_client.StreamStreamAioClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._intercept(continuation, client_call_details, request_iterator, unary_response=False)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The standard aio client interceptors (a CLIENT span and `traceparent` on every
    call), each span ending with its call's status (`_ClientSpanEnd`)."""
    tracer = trace.get_tracer(_SCOPE, tracer_provider=_CurrentTracerProvider())
    return [kind(tracer, filter_=_client_filter) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def server_interceptors(metrics: tracing.RpcMetrics | None) -> list[grpc.aio.ServerInterceptor]:
    return [ServerInterceptor(metrics)]

