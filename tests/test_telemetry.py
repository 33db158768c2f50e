"""chorus.telemetry against real gRPC: a trace crosses a grpc.aio call and reaches an
OTLP receiver as one trace, the way Jaeger would get it from the three services.

The receiver is opentelemetry-proto's TraceServiceServicer on a real gRPC server, so
the exporter, its serialisation and the W3C propagation are all the production code.
"""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request

import grpc
import pytest
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from chorus import telemetry

SERVICE = "chorus-test-service"
METHOD = "/chorus.test.Echo/TraceId"
FAILING_METHOD = "/chorus.test.Echo/Fail"
OTLP_SPAN_KIND = {SpanKind.CLIENT: 3, SpanKind.SERVER: 2}


@pytest.fixture(autouse=True)
def no_tracing_left_over():
    telemetry.shutdown_tracing()
    yield
    telemetry.shutdown_tracing()


async def _trace_id_handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    with telemetry.server_span("Echo/TraceId", context, {"test.attr": "server"}):
        return telemetry.current_trace_id().encode()


async def _failing_handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    with telemetry.server_span("Echo/Fail", context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "frame 3 is malformed")


def _handlers():
    identity = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler(
        "chorus.test.Echo",
        {
            "TraceId": grpc.unary_unary_rpc_method_handler(_trace_id_handler, **identity),
            "Fail": grpc.unary_unary_rpc_method_handler(_failing_handler, **identity),
        },
    )


async def _call(method: str, metadata) -> bytes:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
    finally:
        await server.stop(None)


def test_one_trace_across_a_grpc_call_reaches_the_otlp_receiver(receiver):
    telemetry.setup_tracing(SERVICE, receiver.endpoint)

    async def client() -> tuple[str, str, list]:
        with telemetry.span("client call", kind=SpanKind.CLIENT):
            metadata = telemetry.inject_metadata([("x-request-id", "r-1")])
            returned = (await _call(METHOD, metadata)).decode()
            return telemetry.current_trace_id(), returned, metadata

    client_trace_id, server_trace_id, metadata = asyncio.run(client())

    assert metadata[0] == ("x-request-id", "r-1")
    assert [key for key, _ in metadata].count("traceparent") == 1
    # Sampled (01), with the random-trace-id flag (02) that newer SDKs also set.
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[13]", dict(metadata)["traceparent"])
    # What a response's summary would carry is the caller's trace.
    assert server_trace_id == client_trace_id

    assert telemetry.flush_tracing(10_000)
    spans = receiver.spans()
    assert set(spans) == {"client call", "Echo/TraceId"}
    (client_resource, client), (server_resource, server) = spans["client call"], spans["Echo/TraceId"]
    assert client_resource["service.name"] == server_resource["service.name"] == SERVICE
    assert client.trace_id.hex() == server.trace_id.hex() == client_trace_id
    assert server.parent_span_id == client.span_id
    assert client.parent_span_id == b""
    assert (client.kind, server.kind) == (OTLP_SPAN_KIND[SpanKind.CLIENT], OTLP_SPAN_KIND[SpanKind.SERVER])
    server_attrs = {a.key: a.value for a in server.attributes}
    assert server_attrs["test.attr"].string_value == "server"


def test_server_span_without_traceparent_starts_a_trace_and_records_the_abort(receiver):
    telemetry.setup_tracing(SERVICE, receiver.endpoint)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        asyncio.run(_call(FAILING_METHOD, metadata=None))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert telemetry.flush_tracing(10_000)
    _, server = receiver.spans()["Echo/Fail"]
    assert server.parent_span_id == b""
    assert len(server.trace_id) == 16 and any(server.trace_id)
    attrs = {a.key: a.value for a in server.attributes}
    assert attrs["rpc.grpc.status_code"].int_value == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_without_endpoint_trace_ids_are_real_but_nothing_is_exported(receiver):
    assert telemetry.current_trace_id() == ""
    telemetry.setup_tracing(SERVICE, None)
    assert telemetry.current_trace_id() == ""
    with telemetry.span("stage"):
        trace_id = telemetry.current_trace_id()
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != "0" * 32
        with telemetry.span("inner"):
            assert telemetry.current_trace_id() == trace_id
    assert telemetry.current_trace_id() == ""
    assert telemetry.flush_tracing(1_000)
    assert receiver.requests == []


def test_setup_is_idempotent_and_can_be_repointed(receiver):
    first = telemetry.setup_tracing(SERVICE, None)
    assert telemetry.setup_tracing(SERVICE, None) is first
    assert telemetry.setup_tracing(SERVICE, "") is first

    second = telemetry.setup_tracing("chorus-other", receiver.endpoint)
    assert second is not first
    with telemetry.span("after re-point"):
        pass
    assert telemetry.flush_tracing(10_000)
    resource, _ = receiver.spans()["after re-point"]
    assert resource["service.name"] == "chorus-other"

    telemetry.shutdown_tracing()
    with telemetry.span("after shutdown"):
        assert telemetry.current_trace_id() == ""


def test_inject_without_a_current_span_adds_nothing():
    telemetry.setup_tracing(SERVICE, None)
    assert telemetry.inject_metadata() == []
    assert telemetry.inject_metadata([("a", "b")]) == [("a", "b")]


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
        assert all(name.startswith(prefixes[registry]) for name in samples), samples

    token_metrics.QUEUE_WAIT.observe(0.042)
    assert token_metrics.REGISTRY.get_sample_value("chorus_token_server_queue_wait_seconds_bucket", {"le": "0.05"}) >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_server_serves_the_service_registry_on_its_address():
    registry = CollectorRegistry()
    gauge = Gauge("chorus_test_streams", "test", registry=registry)
    assert telemetry.start_metrics_server(0, registry) is None
    assert telemetry.start_metrics_server(None, registry) is None

    port = _free_port()
    server = telemetry.start_metrics_server(port, registry, addr="127.0.0.1")
    assert server is not None
    assert telemetry.start_metrics_server(port, registry, addr="127.0.0.1") is server
    gauge.set(3)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "chorus_test_streams 3.0" in body
