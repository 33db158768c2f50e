"""Tracing, and the plumbing of metrics, shared by the gateway, the token server and
the codec workers.

One request must read as one trace across three processes, so every service builds
its tracer here and carries W3C `traceparent` in gRPC metadata the same way: the
caller wraps its call in a CLIENT span and sends `inject_metadata()`, the callee opens
`server_span(...)`, which continues the caller's trace. Without an OTLP endpoint the
SDK provider still mints real trace ids (responses report them to clients, who quote
them in bug reports) but exports nothing, so tracing costs nothing to leave on.

Chorus code takes its tracer from `get_tracer()`, not from OpenTelemetry's global,
because the global provider can be set only once per process: keeping our provider in
module state lets `setup_tracing` re-point a process (tests export to an in-process
receiver, then to another). The global is still set, once, for any library that
instruments through it.

Each service declares its own metrics in its own `metrics.py`, in a registry of its
own, named `chorus_<service>_*`: a token server's /metrics lists only token-server
names, and scrape configs can tell the services apart by name. This module only
names them and serves a registry.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from prometheus_client import start_http_server as _prometheus_http_server

log = logging.getLogger(__name__)

GATEWAY = "chorus-gateway"
TOKEN_SERVER = "chorus-token-server"
CODEC_WORKER = "chorus-codec-worker"
SERVICES = (GATEWAY, TOKEN_SERVER, CODEC_WORKER)

INSTRUMENTATION_SCOPE = "chorus"

__all__ = [
    "GATEWAY", "TOKEN_SERVER", "CODEC_WORKER", "SERVICES",
    "setup_tracing", "shutdown_tracing", "flush_tracing", "get_tracer",
    "SpanKind", "span", "server_span", "set_call_attributes", "inject_metadata", "extract_context",
    "current_trace_id",
    "record_stage", "LATENCY_BUCKETS", "metric_name", "start_metrics_server",
]


# --------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class _Tracing:
    service_name: str
    otlp_endpoint: str | None
    provider: TracerProvider


_lock = threading.Lock()
_tracing: _Tracing | None = None
_global_set = False


def setup_tracing(service_name: str, otlp_endpoint: str | None) -> TracerProvider:
    """Makes this process trace as `service_name`, exporting to `otlp_endpoint`
    ("host:port" of an OTLP/gRPC receiver such as Jaeger's 4317) when one is given.

    Calling it again with the same arguments returns the same provider, so each
    service's `main` and the in-process stack can both call it. Different arguments
    flush and shut down the previous provider and install a new one.
    """
    global _tracing, _global_set
    endpoint = otlp_endpoint or None
    with _lock:
        if _tracing and (_tracing.service_name, _tracing.otlp_endpoint) == (service_name, endpoint):
            return _tracing.provider
        previous, _tracing = _tracing, None
    if previous:
        previous.provider.shutdown()

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if endpoint:
        # insecure=True unless the endpoint says https://, which the exporter honours
        # over this flag: in-cluster collectors listen in plaintext.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    with _lock:
        _tracing = _Tracing(service_name, endpoint, provider)
        if not _global_set:
            trace.set_tracer_provider(provider)
            _global_set = True
    log.info("tracing as %s, exporting to %s", service_name, endpoint or "nowhere")
    return provider


def flush_tracing(timeout_millis: int = 10_000) -> bool:
    """Exports every finished span now; False if the receiver did not take them in time."""
    current = _tracing
    return current.provider.force_flush(timeout_millis) if current else True


def shutdown_tracing() -> None:
    """Flushes and stops exporting; spans started afterwards have no valid trace id
    until `setup_tracing` is called again. Call it on the way out of `main`."""
    global _tracing
    with _lock:
        previous, _tracing = _tracing, None
    if previous:
        # The batch processor exports what it still holds before it stops.
        previous.provider.shutdown()


def get_tracer() -> trace.Tracer:
    """The tracer of the provider `setup_tracing` installed; a no-op one before that and
    after `shutdown_tracing` (not the global, which still holds the first provider)."""
    current = _tracing
    if current is None:
        return trace.NoOpTracer()
    return current.provider.get_tracer(INSTRUMENTATION_SCOPE)


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, object] | None = None,
    context: otel_context.Context | None = None,
) -> Iterator[trace.Span]:
    """A span that is current for the block: a stage of a request (queue wait,
    prefill, codec step) or, with kind=CLIENT, an outgoing call whose metadata comes
    from `inject_metadata()` inside the block. Exceptions mark it as an error."""
    with get_tracer().start_as_current_span(name, context=context, kind=kind, attributes=attributes) as current:
        yield current


_MONOTONIC_TO_EPOCH_NS = time.time_ns() - time.monotonic_ns()


def record_stage(name: str, start_monotonic: float | None, end_monotonic: float | None,
                 attributes: Mapping[str, object] | None = None) -> None:
    """A child span of the current span for a stage that already happened, timed by
    time.monotonic() readings taken where the work ran (the engine thread, the
    codec step), so the hot path only reads a clock. Skipped when either end is unknown."""
    if start_monotonic is None or end_monotonic is None:
        return
    stage = get_tracer().start_span(
        name, attributes=attributes, start_time=int(start_monotonic * 1e9) + _MONOTONIC_TO_EPOCH_NS
    )
    stage.end(end_time=int(end_monotonic * 1e9) + _MONOTONIC_TO_EPOCH_NS)


def inject_metadata(extra: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """gRPC call metadata carrying the current trace context (`traceparent`), after `extra`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*(extra or ()), *carrier.items()]


def extract_context(servicer_context) -> otel_context.Context:
    """The caller's trace context from a (grpc or grpc.aio) servicer context's metadata.

    An empty context when the caller sent none, so the server span starts a new trace.
    """
    if servicer_context is None:
        return otel_context.Context()
    metadata = servicer_context.invocation_metadata() or ()
    # Binary (-bin) entries arrive as bytes and are never trace context.
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    # On an empty base, not the current context: in the in-process stack a handler's
    # task can inherit its caller's context, which would hide a missing traceparent.
    return propagate.extract(carrier, context=otel_context.Context())


# Who is calling (client, API key id): set by chorus.auth's check before the handler
# runs, in the call's own task, so the handler's server span names its caller.
_call_attributes: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "chorus_call_attributes", default={}
)


def set_call_attributes(attributes: Mapping[str, object]) -> None:
    """Attributes every server span of the current call carries."""
    _call_attributes.set(dict(attributes))


@contextmanager
def server_span(
    name: str,
    servicer_context,
    attributes: Mapping[str, object] | None = None,
) -> Iterator[trace.Span]:
    """The SERVER span of one RPC, continuing the caller's trace, current for the block.

    Records the gRPC status the handler set or aborted with, so that a failed stream
    shows as failed in the trace even though grpc.aio reports it outside the handler.
    """
    attributes = {**_call_attributes.get(), **(attributes or {})}
    with span(name, kind=SpanKind.SERVER, attributes=attributes, context=extract_context(servicer_context)) as current:
        try:
            yield current
        finally:
            code = servicer_context.code() if servicer_context is not None else None
            if code is not None:
                current.set_attribute("rpc.grpc.status_code", code.value[0])


def current_trace_id() -> str:
    """The current trace id as 32 hex digits; "" outside any span or with tracing off."""
    span_context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""


# --------------------------------------------------------------------------- metrics

# Latency buckets shared by every service's histograms of seconds: time to first
# audio is dominated by prefill + ~2.3 frames of lookahead (~200 ms of audio) on the
# demo model; the buckets resolve tens of ms there and still catch multi-second
# stalls under overload.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)

_metrics_servers: dict[tuple[str, int], object] = {}


def metric_name(service: str, metric: str) -> str:
    """`chorus_<service>_<metric>`: each service's names are its own, so scrape
    configs and dashboards can tell the services apart by name."""
    return f"{service.replace('-', '_')}_{metric}"


def start_metrics_server(port: int | None, registry: CollectorRegistry, addr: str = "127.0.0.1"):
    """Serves `registry` (one service's metrics) on `addr:port`/metrics. Port 0 or
    None serves nothing (tests run several services in one process).

    `addr` is the service's own bind address: a metrics port must not be reachable
    where the service's gRPC port is not. A second call for the same address
    returns the same server.
    """
    if not port:
        return None
    with _lock:
        server = _metrics_servers.get((addr, port))
        if server is None:
            server, _thread = _prometheus_http_server(port, addr=addr, registry=registry)
            _metrics_servers[(addr, port)] = server
            log.info("metrics on %s:%d/metrics", addr, port)
        return server
