"""The gateway's Prometheus metrics, in a registry of its own (`/metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from chorus.telemetry.tracing import GATEWAY, LATENCY_BUCKETS, RpcMetrics, metric_name, service_registry

# With the process metrics (CPU seconds, resident memory, open fds) beside the service's own.
REGISTRY = service_registry()

# Requests by API, method and status, in flight, their durations and refusals (telemetry.RpcMetrics).
RPC = RpcMetrics(GATEWAY, REGISTRY)

# Below 1 is faster than real time; the interesting region is 0.3..1.5.
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 5.0)

TTFA = Histogram(
    metric_name(GATEWAY, "time_to_first_audio_seconds"),
    "From request arrival at the gateway to the first audio sent to the client.",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
REAL_TIME_FACTOR = Histogram(
    metric_name(GATEWAY, "real_time_factor"),
    "Synthesis wall time divided by audio duration, per request; below 1 is faster than real time.",
    buckets=_RTF_BUCKETS, registry=REGISTRY,
)
UNDERRUNS = Counter(
    metric_name(GATEWAY, "underruns"),
    "Times a stream's audio was late for its listener's playback clock (each stall counts once).",
    registry=REGISTRY,
)
STALL_SECONDS = Counter(
    metric_name(GATEWAY, "stall_seconds"),
    "Seconds listeners waited for late audio, summed over streams.",
    registry=REGISTRY,
)
IN_FLIGHT_STREAMS = Gauge(
    metric_name(GATEWAY, "in_flight_streams"),
    "Synthesis streams the gateway is serving now. The signal gateways autoscale on.",
    registry=REGISTRY,
)
