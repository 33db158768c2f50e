"""Tracing, and the plumbing of metrics, shared by the gateway, the token server and
the codec workers.

One request must read as one trace across three processes, so every service builds
its tracer here. The RPC spans themselves (SERVER on every call a service answers,
CLIENT on every call it makes, W3C `traceparent` in the metadata between them) come
from the standard OpenTelemetry gRPC instrumentation, wired in `chorus.telemetry.grpc_instrumentation`;
Chorus adds the stages of a request (`record_stage`, `span`) under them, attributes
for retries and failovers (`call_attributes`) and the request id (`tag_request`).
Where spans go: Chorus's own `--otlp-endpoint` / `CHORUS_OTLP_ENDPOINT` when set, else
the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`
(the exporter reads those itself, with `OTEL_EXPORTER_OTLP_HEADERS`, certificates and
timeouts, which apply whichever endpoint won). `OTEL_SERVICE_NAME` (or `service.name`
in `OTEL_RESOURCE_ATTRIBUTES`) renames the service; the other resource attributes are
added. Without any endpoint the
SDK provider still mints real trace ids (responses report them to clients, who quote
them in bug reports) but exports nothing, so tracing costs nothing to leave on.

Chorus code takes its tracer from `get_tracer()`, not from OpenTelemetry's global,
because the global provider can be set only once per process: keeping our provider in
module state lets `setup_tracing` re-point a process (tests export to an in-process
receiver, then to another). The global is still set, once, for any library that
instruments through it.

Each service declares its own metrics in its own `metrics.py`, in a registry of its
own, named `chorus_<service>_*`: a token server's /metrics lists only token-server
names (besides the standard `process_*` ones every exporter has), and scrape configs
can tell the services apart by name. This module only
names them and serves a registry.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import start_http_server as _prometheus_http_server

from chorus.rpc.errors import StartupError
from chorus.telemetry.tiers import CODEC_WORKER, GATEWAY, SERVICES, TOKEN_SERVER

log = logging.getLogger(__name__)


INSTRUMENTATION_SCOPE = "chorus"

__all__ = [
    "GATEWAY", "TOKEN_SERVER", "CODEC_WORKER", "SERVICES",
    "setup_tracing", "shutdown_tracing", "flush_tracing", "get_tracer",
    "SpanKind", "span", "call_attributes", "pending_call_attributes", "tag_request", "REQUEST_ID",
    "current_trace_id", "record_stage", "LATENCY_BUCKETS", "metric_name", "RpcMetrics", "start_metrics_server",
    "service_registry", "api_of", "OTEL_ENV",
]


# --------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class _Tracing:
    service_name: str
    otlp_endpoint: str | None
    # The standard OTEL_* variables as they were when the provider was built: a change
    # (tests re-point a process) builds a new one.
    otel_env: tuple[tuple[str, str], ...]
    provider: TracerProvider


# The standard variables `setup_tracing` honours (the exporter reads the OTLP ones).
OTEL_ENV = (
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
)


_lock = threading.Lock()
_tracing: _Tracing | None = None
_global_set = False

_CALL_ATTRIBUTES: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "chorus_call_attributes", default={}
)
# The request a line of log is written for (see `tag_request`); "" outside requests.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("chorus_request_id", default="")


def setup_tracing(service_name: str, otlp_endpoint: str | None) -> TracerProvider:
    """Makes this process trace as `service_name`, exporting to `otlp_endpoint`
    ("host:port" of an OTLP/gRPC receiver such as Jaeger's 4317) when one is given,
    else where the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT says (module docstring).

    Calling it again with the same arguments (and environment) returns the same
    provider, so each service's `main` and the in-process stack can both call it.
    Different ones flush and shut down the previous provider and install a new one.
    """
    global _tracing, _global_set
    endpoint = otlp_endpoint or None
    otel_env = tuple((name, os.environ[name]) for name in OTEL_ENV if os.environ.get(name))
    with _lock:
        if _tracing and (_tracing.service_name, _tracing.otlp_endpoint, _tracing.otel_env) == (
                service_name, endpoint, otel_env):
            return _tracing.provider
        previous, _tracing = _tracing, None
    if previous:
        previous.provider.shutdown()

    provider = TracerProvider(resource=_resource(service_name))
    exporting_to = _exporter_endpoint(endpoint)
    if endpoint:
        # insecure=True unless the endpoint says https://, which the exporter honours
        # over this flag: in-cluster collectors listen in plaintext.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    elif exporting_to:
        # No argument: the exporter takes the endpoint, headers, TLS and timeout from
        # the standard variables, as every OpenTelemetry SDK does (an http:// endpoint
        # is plaintext, https:// is TLS).
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    with _lock:
        _tracing = _Tracing(service_name, endpoint, otel_env, provider)
        if not _global_set:
            trace.set_tracer_provider(provider)
            _global_set = True
    log.info("tracing as %s, exporting to %s", provider.resource.attributes.get(SERVICE_NAME),
             exporting_to or "nowhere")
    return provider


def _exporter_endpoint(endpoint: str | None) -> str | None:
    """Where spans go: Chorus's own setting wins over the standard variables."""
    return (endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def _resource(service_name: str) -> Resource:
    """Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, but the
    attributes passed to it win over both; Chorus's name is only the default here, so
    it is passed only when neither variable names the service."""
    detected = Resource.create()
    listed = {pair.partition("=")[0].strip() for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")}
    named = os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME in listed
    return detected if named else detected.merge(Resource({SERVICE_NAME: service_name}))


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


def get_tracer(scope: str = INSTRUMENTATION_SCOPE) -> trace.Tracer:
    """The tracer of the provider `setup_tracing` installed; a no-op one before that and
    after `shutdown_tracing` (not the global, which still holds the first provider)."""
    current = _tracing
    if current is None:
        return trace.NoOpTracer()
    return current.provider.get_tracer(scope)


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, object] | None = None,
    context: otel_context.Context | None = None,
) -> Iterator[trace.Span]:
    """A span that is current for the block: a stage of a request, or the root of a
    client's own trace (tools, tests). Exceptions mark it as an error. Not for a block
    that spans a `yield`: see chorus.telemetry.grpc_instrumentation on contexts across generators."""
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


@contextmanager
def call_attributes(**attributes: object) -> Iterator[None]:
    """Attributes for the CLIENT spans of the calls started in the block, such as
    `chorus.failover=True` on the call that resumes a stream on another codec worker.

    The standard gRPC client interceptor opens the span; it runs in a task that grpc.aio
    creates when the call is made, which copies this context variable, so the block
    only has to cover the line that makes the call.
    """
    token = _CALL_ATTRIBUTES.set({**_CALL_ATTRIBUTES.get(), **attributes})
    try:
        yield
    finally:
        _CALL_ATTRIBUTES.reset(token)


def pending_call_attributes() -> Mapping[str, object]:
    return _CALL_ATTRIBUTES.get()


def tag_request(request_id: str, **attributes: object) -> None:
    """Names the request being served: the current (server) span gets `chorus.request_id`
    and `attributes`, and every log line written for it from here on carries the id.

    A context variable, so it stays with the RPC's task and the tasks it starts, and
    never leaks to a neighbouring request.
    """
    REQUEST_ID.set(request_id)
    trace.get_current_span().set_attributes({"chorus.request_id": request_id, **attributes})


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


class RpcMetrics:
    """The RPC metrics every service exports under its own names, recorded by the
    server interceptor of `chorus.telemetry.grpc_instrumentation` for every call but health checks
    and reflection, and by the gateway's HTTP door (`gateway.frontends.openai_http.access`):

    - `chorus_<service>_requests_total{api, method, code}`: finished calls by gRPC status
      (`code="OK"`, `"INVALID_ARGUMENT"`, `"DEADLINE_EXCEEDED"`, `"CANCELLED"`...),
      so the error rate is the non-OK share;
    - `chorus_<service>_in_flight_requests{api, method}`: calls being served now;
    - `chorus_<service>_request_duration_seconds{api, method}`: from arrival to the status,
      a stream's whole length for streaming calls;
    - `chorus_<service>_refused_calls_total{reason}`: calls the access policy turned
      away before any work (`chorus.security.access` names the reasons).

    `api` is the door a call came through (`api_of`): `tts.v1` (Chorus's own API, the
    gateway's and the services' between them), `riva` (NVIDIA Riva's TTS API on the
    gateway's gRPC port), `openai` (the gateway's HTTP port). `method` is the RPC's
    short name (`Generate`, `Decode`, `Synthesize`...) or, on the HTTP port, the route
    (`POST /v1/audio/speech`): Riva's and tts.v1's `Synthesize` differ by `api`.
    """

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            metric_name(service, "requests"), "Finished requests by API, method and gRPC status code.",
            ["api", "method", "code"], registry=registry,
        )
        self.in_flight = Gauge(
            metric_name(service, "in_flight_requests"), "Requests being served now, by API and method.",
            ["api", "method"], registry=registry,
        )
        self.duration = Histogram(
            metric_name(service, "request_duration_seconds"),
            "Request duration from arrival to status, by API and method (a stream's whole length).",
            ["api", "method"], buckets=(*LATENCY_BUCKETS, 30.0, 60.0, 300.0), registry=registry,
        )
        self.refused_calls = Counter(
            metric_name(service, "refused_calls"),
            "Calls refused before any work, by reason: not_allowed (client certificate not allowed), "
            "client_limit (the client already holds its most streams); on the gateway also no_api_key, "
            "bad_api_key and key_limit (the API key already holds its most streams).",
            ["reason"], registry=registry,
        )


# The `api` label of gRPC services by package; any other service is labelled with its
# package (tests' services, say).
_APIS = {"tts.v1": "tts.v1", "nvidia.riva.tts": "riva"}
OPENAI = "openai"


def api_of(grpc_service: str) -> str:
    """The `api` label of a call to `grpc_service` ("tts.v1.SynthesisService" -> "tts.v1",
    "nvidia.riva.tts.RivaSpeechSynthesis" -> "riva")."""
    package = grpc_service.rpartition(".")[0]
    return _APIS.get(package, package or grpc_service)


def service_registry() -> CollectorRegistry:
    """A service's own registry, with the standard process metrics in it
    (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`...,
    from /proc on Linux; nothing elsewhere): prometheus_client puts them only in its
    default registry, which no Chorus service serves."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


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
            try:
                server, _thread = _prometheus_http_server(port, addr=addr, registry=registry)
            except OSError as err:
                raise StartupError(
                    f"cannot serve metrics on {addr}:{port}: {err.strerror or err} "
                    "(the port is in use, or the address is not this host's; choose another --metrics-port)"
                ) from None
            _metrics_servers[(addr, port)] = server
            log.info("metrics on %s:%d/metrics", addr, port)
        return server
