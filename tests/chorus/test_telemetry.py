"""Tracing and request metrics against real gRPC: Chorus servers and channels
(`new_server`, `new_channel`, the standard OpenTelemetry gRPC interceptors) make one
trace of a call, with CLIENT and SERVER spans that reach an OTLP receiver the way
Jaeger would get them; failed, expired and cancelled calls are errors with their
message; calls are counted by status; log lines carry the ids; reflection answers
both protocols.

The receiver is opentelemetry-proto's TraceServiceServicer on a real gRPC server, so
the exporter, its serialisation and the W3C propagation are all the production code.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from chorus.rpc.serving import log_handler, new_channel, new_server, serve_with_health
from chorus.telemetry import tracing

SERVICE = "chorus-test-service"
OTLP_SPAN_KIND = {SpanKind.CLIENT: 3, SpanKind.SERVER: 2}
OTLP_STATUS_ERROR = 2
ECHO = "chorus.test.Echo"


pytestmark = pytest.mark.usefixtures("no_tracing_left_over")


class Echo:
    """Handlers of a test service: what a Chorus servicer does, minus the work."""

    def __init__(self) -> None:
        self.cleaned_up = 0

    async def trace_id(self, request: bytes, context) -> bytes:
        tracing.tag_request("r-1", **{"test.attr": "server"})
        logging.getLogger("chorus.test").info("serving %s", request.decode())
        return tracing.current_trace_id().encode()

    async def fail(self, request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "frame 3 is malformed")

    async def stream(self, request: bytes, context):
        """Endless, like a stream whose client must stop it (cancel) or its deadline."""
        try:
            while True:
                yield b"chunk"
                await asyncio.sleep(0.01)
        finally:
            self.cleaned_up += 1

    def handlers(self):
        identity = dict(request_deserializer=None, response_serializer=None)
        return grpc.method_handlers_generic_handler(ECHO, {
            "TraceId": grpc.unary_unary_rpc_method_handler(self.trace_id, **identity),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail, **identity),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream, **identity),
        })


@contextlib.asynccontextmanager
async def echo_server(metrics=None):
    """The Echo service on a Chorus server (`new_server`: standard interceptors), and a
    Chorus channel to it (`new_channel`: standard client interceptors)."""
    echo = Echo()
    server = new_server(metrics)
    server.add_generic_rpc_handlers((echo.handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = new_channel(f"127.0.0.1:{port}")
    try:
        yield echo, channel
    finally:
        await channel.close()
        await server.stop(None)


def _attributes(span) -> dict[str, object]:
    out = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = list(v.string_value for v in a.value.array_value.values) if kind == "array_value" \
            else getattr(a.value, kind)
    return out


def _by_kind(receiver, name: str) -> dict[int, object]:
    """The spans called `name`, by OTLP kind (one client, one server per call here)."""
    out = {}
    for request in receiver.requests:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    if s.name == name:
                        out[s.kind] = s
    return out


def test_one_trace_across_a_grpc_call_has_standard_client_and_server_spans(receiver):
    tracing.setup_tracing(SERVICE, receiver.endpoint)

    async def client() -> tuple[str, str]:
        async with echo_server() as (_, channel):
            with tracing.span("client work"):
                with tracing.call_attributes(**{"chorus.retry": True}):
                    returned = await channel.unary_unary(f"/{ECHO}/TraceId")(b"hello", timeout=10)
                return tracing.current_trace_id(), returned.decode()

    client_trace_id, server_trace_id = asyncio.run(client())
    # What a response's summary would carry is the caller's trace.
    assert server_trace_id == client_trace_id

    assert tracing.flush_tracing(10_000)
    calls = _by_kind(receiver, f"/{ECHO}/TraceId")
    client, server = calls[OTLP_SPAN_KIND[SpanKind.CLIENT]], calls[OTLP_SPAN_KIND[SpanKind.SERVER]]
    _, root = receiver.spans()["client work"]
    assert client.trace_id.hex() == server.trace_id.hex() == client_trace_id
    assert (client.parent_span_id, server.parent_span_id) == (root.span_id, client.span_id)
    for span in (client, server):
        attrs = _attributes(span)
        assert (attrs["rpc.system"], attrs["rpc.service"], attrs["rpc.method"]) == ("grpc", ECHO, "TraceId")
        assert attrs["rpc.grpc.status_code"] == 0
        assert span.status.code != OTLP_STATUS_ERROR
    assert _attributes(client)["chorus.retry"] is True
    assert "chorus.retry" not in _attributes(server)
    assert _attributes(server)["chorus.request_id"] == "r-1"
    assert _attributes(server)["test.attr"] == "server"
    assert tracing.REQUEST_ID.get() == ""  # the request id never leaks out of its request


def test_invalid_argument_is_an_error_with_its_message_and_is_counted(receiver):
    tracing.setup_tracing(SERVICE, receiver.endpoint)
    metrics = tracing.RpcMetrics("chorus-test-service", CollectorRegistry())

    async def call():
        async with echo_server(metrics) as (_, channel):
            await channel.unary_unary(f"/{ECHO}/Fail")(b"", timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        asyncio.run(call())
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert tracing.flush_tracing(10_000)
    calls = _by_kind(receiver, f"/{ECHO}/Fail")
    server = calls[OTLP_SPAN_KIND[SpanKind.SERVER]]
    assert server.parent_span_id == calls[OTLP_SPAN_KIND[SpanKind.CLIENT]].span_id
    assert server.status.code == OTLP_STATUS_ERROR
    assert server.status.message == "INVALID_ARGUMENT: frame 3 is malformed"
    assert "Locally aborted" not in str(server)
    assert _attributes(server)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    client = calls[OTLP_SPAN_KIND[SpanKind.CLIENT]]
    assert client.status.code == OTLP_STATUS_ERROR and "frame 3 is malformed" in client.status.message

    sample = metrics.requests.labels("chorus.test", "Fail", "INVALID_ARGUMENT")._value.get()
    assert sample == 1
    assert metrics.in_flight.labels("chorus.test", "Fail")._value.get() == 0


def test_deadline_and_cancel_end_server_spans_with_error_status(receiver, caplog):
    """grpc.aio ends such calls by cancelling the handler's task, which the standard
    interceptor alone exported as OK; and a stream dropped at a yield must not log
    "Failed to detach context" (many at once, as under load)."""
    tracing.setup_tracing(SERVICE, receiver.endpoint)
    metrics = tracing.RpcMetrics("chorus-test-service", CollectorRegistry())
    streams = 12

    async def scenario():
        async with echo_server(metrics) as (echo, channel):
            stream = channel.unary_stream(f"/{ECHO}/Stream")
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                async for _ in stream(b"", timeout=0.3):
                    pass
            calls = [stream(b"", timeout=30) for _ in range(streams)]
            for call in calls:
                await anext(aiter(call))  # the handler is running (or parked at its yield)
            for call in calls:
                call.cancel()
            for _ in range(200):
                if echo.cleaned_up == streams + 1 and not metrics.in_flight.labels("chorus.test", "Stream")._value.get():
                    break
                await asyncio.sleep(0.02)
            gc.collect()
            await asyncio.sleep(0.1)
            return expired.value, echo.cleaned_up

    with caplog.at_level(logging.ERROR):
        expired, cleaned_up = asyncio.run(scenario())
    assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cleaned_up == streams + 1
    assert not [r for r in caplog.records if "detach" in r.getMessage()]

    assert tracing.flush_tracing(10_000)
    server_spans = [s for request in receiver.requests for rs in request.resource_spans
                    for ss in rs.scope_spans for s in ss.spans
                    if s.name == f"/{ECHO}/Stream" and s.kind == OTLP_SPAN_KIND[SpanKind.SERVER]]
    assert len(server_spans) == streams + 1
    statuses = sorted((s.status.code, s.status.message.split(":")[0]) for s in server_spans)
    assert statuses == sorted([(OTLP_STATUS_ERROR, "DEADLINE_EXCEEDED")] + [(OTLP_STATUS_ERROR, "CANCELLED")] * streams)
    codes = {s.status.message.split(":")[0]: _attributes(s)["rpc.grpc.status_code"] for s in server_spans}
    assert codes == {"DEADLINE_EXCEEDED": 4, "CANCELLED": 1}

    assert metrics.requests.labels("chorus.test", "Stream", "DEADLINE_EXCEEDED")._value.get() == 1
    assert metrics.requests.labels("chorus.test", "Stream", "CANCELLED")._value.get() == streams
    assert metrics.in_flight.labels("chorus.test", "Stream")._value.get() == 0


def test_health_checks_are_neither_traced_nor_counted(receiver):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tracing.setup_tracing(SERVICE, receiver.endpoint)
    registry = CollectorRegistry()
    metrics = tracing.RpcMetrics("chorus-test-service", registry)

    async def scenario():
        running = await serve_with_health(new_server(metrics), [ECHO], 0)
        await running.set_serving(True)
        channel = new_channel(running.address)
        try:
            with tracing.span("probe"):
                return await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        finally:
            await channel.close()
            await running.stop(None)

    assert asyncio.run(scenario()).status == health_pb2.HealthCheckResponse.SERVING
    assert tracing.flush_tracing(10_000)
    assert set(receiver.spans()) == {"probe"}
    assert "Check" not in generate_latest(registry).decode()


def test_json_log_lines_carry_the_trace_and_request_ids(receiver):
    tracing.setup_tracing(SERVICE, receiver.endpoint)
    out = io.StringIO()
    handler = log_handler("json", SERVICE, stream=out)
    logger = logging.getLogger("chorus.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    async def call() -> str:
        async with echo_server() as (_, channel):
            return (await channel.unary_unary(f"/{ECHO}/TraceId")(b"json", timeout=10)).decode()

    try:
        trace_id = asyncio.run(call())
        logger.info("outside any request")
    finally:
        logger.removeHandler(handler)
    inside, outside = [json.loads(line) for line in out.getvalue().splitlines()]
    assert inside["message"] == "serving json" and inside["level"] == "INFO" and inside["logger"] == "chorus.test"
    assert (inside["trace_id"], inside["request_id"], inside["service"]) == (trace_id, "r-1", SERVICE)
    assert re.fullmatch(r"[0-9a-f]{16}", inside["span_id"])
    assert (outside["trace_id"], outside["request_id"]) == ("", "")
    with pytest.raises(ValueError, match="log format"):
        log_handler("xml")


def _reflect(address: str, method: str) -> list[str]:
    """list_services over the raw reflection protocol `method` (v1 or v1alpha)."""
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (response,) = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [s.name for s in response.list_services_response.service]


@contextlib.contextmanager
def _reflected_server():
    async def start():
        # Services reflected must have descriptors: health and reflection itself here.
        running = await serve_with_health(new_server(), [], 0)
        await running.set_serving(True)
        return running

    loop = asyncio.new_event_loop()
    running = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield running.address
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_reflection_answers_v1_and_v1alpha():
    with _reflected_server() as address:
        v1 = _reflect(address, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        v1alpha = _reflect(address, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        assert v1 == v1alpha
        assert set(v1) == {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                           "grpc.reflection.v1alpha.ServerReflection"}

        buf = Path(sys.executable).parent / "buf"
        if not buf.exists():
            pytest.skip("buf not installed (pip install buf-bin, in the dev extra)")
        # buf curl reflects with grpc-v1 only, then calls the method it learnt about.
        done = subprocess.run(
            [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1",
             f"http://{address}/grpc.health.v1.Health/Check"],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"status": "SERVING"}
        described = subprocess.run(
            [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1",
             "--list-methods", f"http://{address}"],
            capture_output=True, text=True, timeout=60,
        )
        assert described.returncode == 0, described.stderr
        assert "grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in described.stdout


def test_without_endpoint_trace_ids_are_real_but_nothing_is_exported(receiver):
    assert tracing.current_trace_id() == ""
    tracing.setup_tracing(SERVICE, None)
    assert tracing.current_trace_id() == ""
    with tracing.span("stage"):
        trace_id = tracing.current_trace_id()
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != "0" * 32
        with tracing.span("inner"):
            assert tracing.current_trace_id() == trace_id
    assert tracing.current_trace_id() == ""
    assert tracing.flush_tracing(1_000)
    assert receiver.requests == []


def test_setup_is_idempotent_and_can_be_repointed(receiver):
    first = tracing.setup_tracing(SERVICE, None)
    assert tracing.setup_tracing(SERVICE, None) is first
    assert tracing.setup_tracing(SERVICE, "") is first

    second = tracing.setup_tracing("chorus-other", receiver.endpoint)
    assert second is not first
    with tracing.span("after re-point"):
        pass
    assert tracing.flush_tracing(10_000)
    resource, _ = receiver.spans()["after re-point"]
    assert resource["service.name"] == "chorus-other"

    tracing.shutdown_tracing()
    with tracing.span("after shutdown"):
        assert tracing.current_trace_id() == ""


def _samples(registry) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in generate_latest(registry).decode().splitlines()
            if not line.startswith("#")}


def test_each_service_renders_only_its_own_metrics():
    from gateway import metrics as gateway_metrics
    from services.codec_worker import metrics as codec_metrics
    from services.token_server import metrics as token_metrics

    expected = {
        gateway_metrics.REGISTRY: {
            "chorus_gateway_time_to_first_audio_seconds_bucket",
            "chorus_gateway_real_time_factor_bucket",
            "chorus_gateway_underruns_total",
            "chorus_gateway_stall_seconds_total",
            "chorus_gateway_in_flight_streams",
        },
        token_metrics.REGISTRY: {
            "chorus_token_server_slots_busy",
            "chorus_token_server_queue_depth",
            "chorus_token_server_queue_wait_seconds_bucket",
            "chorus_token_server_batch_tokens_bucket",
            "chorus_token_server_capacity_streams",
            "chorus_token_server_capacity_headroom_streams",
        },
        codec_metrics.REGISTRY: {
            "chorus_codec_worker_streams",
            "chorus_codec_worker_batch_streams_bucket",
            "chorus_codec_worker_busy_ratio",
            "chorus_codec_worker_lag_seconds",
        },
    }
    prefixes = {gateway_metrics.REGISTRY: "chorus_gateway_", token_metrics.REGISTRY: "chorus_token_server_",
                codec_metrics.REGISTRY: "chorus_codec_worker_"}
    for registry, names in expected.items():
        samples = _samples(registry)
        assert names <= samples
        # Besides the standard process metrics, only the service's own names.
        assert all(name.startswith((prefixes[registry], "process_")) for name in samples), samples

    token_metrics.QUEUE_WAIT.observe(0.042)
    assert token_metrics.REGISTRY.get_sample_value("chorus_token_server_queue_wait_seconds_bucket", {"le": "0.05"}) >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_server_serves_the_service_registry_on_its_address():
    registry = CollectorRegistry()
    gauge = Gauge("chorus_test_streams", "test", registry=registry)
    assert tracing.start_metrics_server(0, registry) is None
    assert tracing.start_metrics_server(None, registry) is None

    port = _free_port()
    server = tracing.start_metrics_server(port, registry, addr="127.0.0.1")
    assert server is not None
    assert tracing.start_metrics_server(port, registry, addr="127.0.0.1") is server
    gauge.set(3)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "chorus_test_streams 3.0" in body
