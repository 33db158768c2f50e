"""An in-process OTLP trace receiver (opentelemetry-proto's TraceServiceServicer on a
real gRPC server), standing in for Jaeger's port 4317 in tests."""

from __future__ import annotations

import contextlib
import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from chorus.telemetry import tracing


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every OTLP export request it is sent."""

    def __init__(self):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> dict[str, tuple[dict[str, str], object]]:
        """Span name -> (resource attributes, span)."""
        out = {}
        with self._lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for s in scope_spans.spans:
                            out[s.name] = (attrs, s)
        return out


@contextlib.contextmanager
def running_receiver(kind: type[Receiver] | None = None):
    """A Receiver (or a subclass, `kind`) on a real gRPC server at 127.0.0.1:<free
    port>; `.endpoint` says where."""
    servicer = (kind or Receiver)()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    servicer.endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield servicer
    finally:
        server.stop(None)


@pytest.fixture
def receiver():
    with running_receiver() as servicer:
        yield servicer
        # Before the receiver goes: a failed test's unflushed spans would otherwise retry
        # against a closed port for seconds.
        tracing.shutdown_tracing()

