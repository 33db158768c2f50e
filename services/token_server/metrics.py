"""The token server's Prometheus metrics, in a registry of its own (`/metrics`)."""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

from chorus.telemetry.tracing import LATENCY_BUCKETS, RpcMetrics, TOKEN_SERVER, metric_name, service_registry

# With the process metrics (CPU seconds, resident memory, open fds) beside the service's own.
REGISTRY = service_registry()

# Requests by API, method and status, in flight, their durations and refusals (telemetry.RpcMetrics).
RPC = RpcMetrics(TOKEN_SERVER, REGISTRY)

# llama_decode batch sizes: one token per generating slot plus chunked prefill.
_BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

SLOTS_BUSY = Gauge(
    metric_name(TOKEN_SERVER, "slots_busy"),
    "Backbone slots holding a request (prefilling or generating).",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    metric_name(TOKEN_SERVER, "queue_depth"),
    "Requests admitted and waiting for a free slot.",
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    metric_name(TOKEN_SERVER, "queue_wait_seconds"),
    "Time a request waited in the admission queue for a slot.",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
BATCH_TOKENS = Histogram(
    metric_name(TOKEN_SERVER, "batch_tokens"),
    "Tokens per llama_decode step (one per generating slot plus chunked prefill).",
    buckets=_BATCH_TOKEN_BUCKETS, registry=REGISTRY,
)
CAPACITY_STREAMS = Gauge(
    metric_name(TOKEN_SERVER, "capacity_streams"),
    "Streams this token server can hold at real time, with its margin, from measured step times "
    "and its codec workers' decode rate.",
    registry=REGISTRY,
)
ACTIVE_STREAMS = Gauge(
    metric_name(TOKEN_SERVER, "active_streams"),
    "Streams admitted and generating (in a slot).",
    registry=REGISTRY,
)
CAPACITY_HEADROOM = Gauge(
    metric_name(TOKEN_SERVER, "capacity_headroom_streams"),
    "Capacity minus active and queued streams; negative when requests wait for capacity. "
    "The signal token servers autoscale on.",
    registry=REGISTRY,
)
