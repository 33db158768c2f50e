"""The codec worker's Prometheus metrics, in a registry of its own (`/metrics`)."""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

from chorus.telemetry.tracing import CODEC_WORKER, RpcMetrics, metric_name, service_registry

# With the process metrics (CPU seconds, resident memory, open fds) beside the service's own.
REGISTRY = service_registry()

# Requests by API, method and status, in flight, their durations and refusals (telemetry.RpcMetrics).
RPC = RpcMetrics(CODEC_WORKER, REGISTRY)

_BATCH_STREAM_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

STREAMS = Gauge(
    metric_name(CODEC_WORKER, "streams"),
    "Decode streams open on this worker.",
    registry=REGISTRY,
)
BATCH_STREAMS = Histogram(
    metric_name(CODEC_WORKER, "batch_streams"),
    "Streams decoded together in one codec step (cross-stream batching).",
    buckets=_BATCH_STREAM_BUCKETS, registry=REGISTRY,
)
BUSY_RATIO = Gauge(
    metric_name(CODEC_WORKER, "busy_ratio"),
    "Fraction of recent wall time the decode thread spent decoding (decode utilization).",
    registry=REGISTRY,
)
LAG_SECONDS = Gauge(
    metric_name(CODEC_WORKER, "lag_seconds"),
    "Largest time any open stream's audio is behind its listener's playback clock; 0 when all are ahead. "
    "The signal the codec pool autoscales on.",
    registry=REGISTRY,
)
