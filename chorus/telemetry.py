"""Tracing and metrics shared by the gateway, the token server and the codec workers.

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

Metrics live in prometheus_client's default registry, one per process. Each service
exposes only its own names (`chorus_<service>_*`): the metric objects exist at import
so that code can observe them unconditionally, but they are registered by
`start_metrics_server(port, service)`, so a token server's /metrics does not list an
always-empty codec histogram and scrape configs can tell the services apart by name.
"""

from __future__ import annotations

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
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
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
    "SpanKind", "span", "server_span", "inject_metadata", "extract_context", "current_trace_id",
    "TTFA", "REAL_TIME_FACTOR", "UNDERRUNS",
    "SLOTS_BUSY", "QUEUE_DEPTH", "QUEUE_WAIT", "BATCH_TOKENS",
    "CODEC_STREAMS", "CODEC_BATCH_STREAMS",
    "register_metrics", "start_metrics_server",
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

# Time to first audio is dominated by prefill + ~2.3 frames of lookahead (~200 ms of
# audio) on the demo model; buckets resolve tens of ms there and still catch
# multi-second stalls under overload.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
# Below 1 is faster than real time; the interesting region is 0.3..1.5.
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 5.0)
# llama_decode batch sizes: one token per generating slot plus chunked prefill.
_BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_BATCH_STREAM_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def _name(service: str, metric: str) -> str:
    return f"{service.replace('-', '_')}_{metric}"


# Created unregistered (registry=None); see the module docstring.
TTFA = Histogram(
    _name(GATEWAY, "time_to_first_audio_seconds"),
    "From request arrival at the gateway to the first audio sent to the client.",
    buckets=_LATENCY_BUCKETS, registry=None,
)
REAL_TIME_FACTOR = Histogram(
    _name(GATEWAY, "real_time_factor"),
    "Synthesis wall time divided by audio duration, per request; below 1 is faster than real time.",
    buckets=_RTF_BUCKETS, registry=None,
)
UNDERRUNS = Counter(
    _name(GATEWAY, "underruns"),
    "Times a stream's audio fell behind real-time playback after its first audio.",
    registry=None,
)
SLOTS_BUSY = Gauge(
    _name(TOKEN_SERVER, "slots_busy"),
    "Backbone slots holding a request (prefilling or generating).",
    registry=None,
)
QUEUE_DEPTH = Gauge(
    _name(TOKEN_SERVER, "queue_depth"),
    "Requests admitted and waiting for a free slot.",
    registry=None,
)
QUEUE_WAIT = Histogram(
    _name(TOKEN_SERVER, "queue_wait_seconds"),
    "Time a request waited in the admission queue for a slot.",
    buckets=_LATENCY_BUCKETS, registry=None,
)
BATCH_TOKENS = Histogram(
    _name(TOKEN_SERVER, "batch_tokens"),
    "Tokens per llama_decode step (one per generating slot plus chunked prefill).",
    buckets=_BATCH_TOKEN_BUCKETS, registry=None,
)
CODEC_STREAMS = Gauge(
    _name(CODEC_WORKER, "streams"),
    "Decode streams open on this worker: the load signal the codec pool autoscales on.",
    registry=None,
)
CODEC_BATCH_STREAMS = Histogram(
    _name(CODEC_WORKER, "batch_streams"),
    "Streams decoded together in one codec step (cross-stream batching).",
    buckets=_BATCH_STREAM_BUCKETS, registry=None,
)

_SERVICE_METRICS = {
    GATEWAY: (TTFA, REAL_TIME_FACTOR, UNDERRUNS),
    TOKEN_SERVER: (SLOTS_BUSY, QUEUE_DEPTH, QUEUE_WAIT, BATCH_TOKENS),
    CODEC_WORKER: (CODEC_STREAMS, CODEC_BATCH_STREAMS),
}
# (registry, metric) pairs already registered; identity, not names, so that a test's
# private registry never counts as the process's.
_registered: list[tuple[CollectorRegistry, object]] = []
_metrics_servers: dict[tuple[str, int], object] = {}


def register_metrics(service: str, registry: CollectorRegistry = REGISTRY) -> None:
    """Exposes `service`'s metrics in `registry`; repeat calls are no-ops, so an
    in-process stack can register all three services in the one registry."""
    if service not in _SERVICE_METRICS:
        raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}")
    with _lock:
        for metric in _SERVICE_METRICS[service]:
            if not any(r is registry and m is metric for r, m in _registered):
                registry.register(metric)
                _registered.append((registry, metric))


def start_metrics_server(port: int | None, service: str, addr: str = "0.0.0.0"):
    """Registers `service`'s metrics and serves /metrics on `port` (all interfaces, so
    Prometheus can scrape the pod). Port 0 or None only registers: in tests and the
    local stack, several services share one process and cannot share one port.

    Returns the HTTP server, or None when disabled. A second call for the same
    address returns the same server: the in-process stack's services may all ask
    for it, and the one registry already holds everything they registered.
    """
    register_metrics(service)
    if not port:
        return None
    with _lock:
        server = _metrics_servers.get((addr, port))
        if server is None:
            server, _thread = _prometheus_http_server(port, addr=addr)
            _metrics_servers[(addr, port)] = server
            log.info("metrics on %s:%d/metrics", addr, port)
        return server
